"""Quantizers: FSQ / iFSQ (pure functions and a Linen layer) and the VQ, KL and AE baselines."""

from ifsq_jax.quantizers.bottleneck import BottleneckOutput, FSQBottleneck, IdentityBottleneck
from ifsq_jax.quantizers.fsq import ACTIVATIONS, FSQ, round_ste, scaled_sigmoid
from ifsq_jax.quantizers.kl import GaussianBottleneck, diagonal_gaussian_kl
from ifsq_jax.quantizers.stats import channel_histograms, distinct_codes, entropy_bits, fsq_stats
from ifsq_jax.quantizers.vq import VectorQuantizer, nearest_code

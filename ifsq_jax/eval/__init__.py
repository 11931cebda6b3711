"""Evaluation metrics: PSNR, SSIM, Frechet distances and feature statistics, CKNNA.

``from ifsq_jax import eval as ev``; ``ev.psnr(a, b, data_range=1.0)`` and
``ev.ssim(a, b, data_range=1.0)`` on NHWC float batches (one value per image),
``ev.frechet_distance(mu1, sigma1, mu2, sigma2)``, ``ev.cknna(feats_a, feats_b, topk=10)``.
"""

from ifsq_jax.eval.cknna import cknna, hsic_unbiased
from ifsq_jax.eval.fid import (FeatureStats, fd_vgg16, frechet_distance, load_stats, save_samples_npz, to_uint8,
                               vgg16_features)
from ifsq_jax.eval.image_metrics import psnr, ssim

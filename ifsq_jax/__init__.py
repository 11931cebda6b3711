"""ifsq_jax: iFSQ ("Improving FSQ for Image Generation with 1 Line of Code") in JAX / Flax."""

from ifsq_jax.quantizers import (
    ACTIVATIONS,
    FSQ,
    BottleneckOutput,
    FSQBottleneck,
    GaussianBottleneck,
    IdentityBottleneck,
    VectorQuantizer,
    round_ste,
    scaled_sigmoid,
)

from ifsq_jax.models.loading import load_model
from ifsq_jax.models.pretrained import load_tokenizer

__version__ = "0.1.0"

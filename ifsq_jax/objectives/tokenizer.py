"""The tokenizer's loss terms, as the reference's ``LPIPSWithDiscriminator2D``.

Reconstruction (L1 or L2) plus a perceptual term, the hinge GAN losses and the
adaptive weight of the generator's GAN term. Every term is a mean over the batch,
so gradients accumulated over micro-batches equal the full batch's.

B batch, H W image size.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

ADAPTIVE_WEIGHT_MAX = 1e6  # the reference's clamp (taming uses 1e4)
REC_TYPES = ("l1", "l2")


def reconstruction_loss(x: jax.Array, recon: jax.Array, rec_type: str = "l1") -> jax.Array:
  """``mean |x - x_hat|`` (l1) or ``mean (x - x_hat)^2`` (l2) over (B, H, W, 3), in float32."""
  if rec_type not in REC_TYPES:
    raise ValueError(f"rec_type={rec_type!r} is not valid; use one of {REC_TYPES}.")
  d = x.astype(jnp.float32) - recon.astype(jnp.float32)
  return jnp.mean(jnp.abs(d) if rec_type == "l1" else jnp.square(d))


def hinge_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
  """``0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x_hat)))``."""
  return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def generator_loss(logits_fake: jax.Array) -> jax.Array:
  """``-mean D(x_hat)``."""
  return -jnp.mean(logits_fake)


def adaptive_weight(nll_grad: jax.Array, g_grad: jax.Array, disc_weight: float) -> jax.Array:
  """``clip(|grad nll| / (|grad g| + 1e-6), 0, 1e6) * disc_weight``, gradients at the decoder's last layer."""
  w = jnp.linalg.norm(nll_grad) / (jnp.linalg.norm(g_grad) + 1e-6)
  return jax.lax.stop_gradient(jnp.clip(w, 0.0, ADAPTIVE_WEIGHT_MAX) * disc_weight)

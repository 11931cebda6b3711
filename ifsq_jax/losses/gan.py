"""The tokenizer's GAN terms, as the reference's ``LPIPSWithDiscriminator2D`` (hinge, adaptive weight)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

ADAPTIVE_WEIGHT_MAX = 1e6  # the reference's clamp (taming uses 1e4)


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

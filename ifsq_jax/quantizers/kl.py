"""The KL bottleneck: a diagonal Gaussian posterior, as the reference's ImageVAE.

The latent carries the mean and the log-variance side by side on the channel
axis, ``[mean | logvar]`` (the reference splits channels-first tensors the same
way). The log-variance is clamped to [-30, 20] as in the reference.

Dimension letters: B batch, ``...`` other leading axes (H, W), D latent channels.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from ifsq_jax.quantizers.bottleneck import BottleneckOutput

LOGVAR_MIN = -30.0
LOGVAR_MAX = 20.0


def split_moments(moments: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(B, ..., 2D) -> mean (B, ..., D), clamped logvar (B, ..., D), in float32."""
  if moments.shape[-1] % 2:
    raise ValueError(
        f"moments have shape {tuple(moments.shape)}; the last axis must be even ([mean | logvar]).")
  mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
  return mean, jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)


def diagonal_gaussian_kl(mean: jax.Array, logvar: jax.Array) -> jax.Array:
  """KL(N(mean, exp(logvar)) || N(0, 1)) per example, summed over all but axis 0.

  Args:
    mean: (B, ...) posterior mean.
    logvar: (B, ...) posterior log-variance.

  Returns:
    (B,) ``0.5 * sum(mean**2 + var - 1 - logvar)``.
  """
  kl = 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
  return jnp.sum(kl.reshape(kl.shape[0], -1), axis=-1)


class GaussianBottleneck(nn.Module):
  """Samples the posterior in training (rng stream ``"sample"``), takes its mean otherwise.

  The loss is the batch mean of the per-example KL, as the reference's
  ``LPIPSWithDiscriminator2D``; the trainer weights it (``kl_weight``).
  """

  def __call__(self, moments: jax.Array, train: bool = False, sample: bool | None = None) -> BottleneckOutput:
    """moments (B, ..., 2D) -> codes (B, ..., D)."""
    mean, logvar = split_moments(moments)
    sample = train if sample is None else sample
    if sample:
      eps = jax.random.normal(self.make_rng("sample"), mean.shape, jnp.float32)
      z = mean + jnp.exp(0.5 * logvar) * eps
    else:
      z = mean
    kl = diagonal_gaussian_kl(mean, logvar)
    stats = {"kl": jnp.mean(kl), "posterior_std": jnp.mean(jnp.exp(0.5 * logvar))}
    return BottleneckOutput(codes=z.astype(moments.dtype), loss=jnp.mean(kl), stats=stats)

"""PSNR and SSIM on batches of NHWC float images, one value per image.

Both follow the reference's tokenizer evaluation: PSNR on [0, 1] floats,
``20 log10(data_range / sqrt(mean((a - b)^2)))`` over (H, W, C); SSIM as
``skimage.metrics.structural_similarity`` with its defaults (7x7 uniform window,
K1 = 0.01, K2 = 0.03, sample covariance, the mean over the window-valid
interior, averaged over channels) and an explicit ``data_range``.

B batch, H W size, C channels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _check(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
  a, b = jnp.asarray(a), jnp.asarray(b)
  if a.shape != b.shape or a.ndim != 4:
    raise ValueError(f"expected two NHWC batches of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}.")
  return a.astype(jnp.float32), b.astype(jnp.float32)


def psnr(a: jax.Array, b: jax.Array, data_range: float = 1.0) -> jax.Array:
  """Peak signal-to-noise ratio in dB: (B, H, W, C) x 2 -> (B,)."""
  a, b = _check(a, b)
  mse = jnp.mean(jnp.square(a - b), axis=(1, 2, 3))
  return 20.0 * jnp.log10(data_range / jnp.sqrt(mse))


def _box(x: jax.Array, win: int) -> jax.Array:
  """Mean over win x win windows, 'valid' positions only: (B, H, W, C) -> (B, H-win+1, W-win+1, C)."""
  s = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, win, win, 1), (1, 1, 1, 1), "VALID")
  return s / (win * win)


def ssim(a: jax.Array, b: jax.Array, data_range: float = 1.0, win_size: int = 7, k1: float = 0.01,
         k2: float = 0.03) -> jax.Array:
  """Structural similarity as skimage's defaults: (B, H, W, C) x 2 -> (B,)."""
  a, b = _check(a, b)
  if min(a.shape[1:3]) < win_size:
    raise ValueError(f"images of size {a.shape[1:3]} are smaller than the SSIM window {win_size}.")
  n = win_size * win_size
  cov_norm = n / (n - 1.0)
  ux, uy = _box(a, win_size), _box(b, win_size)
  vx = cov_norm * (_box(a * a, win_size) - ux * ux)
  vy = cov_norm * (_box(b * b, win_size) - uy * uy)
  vxy = cov_norm * (_box(a * b, win_size) - ux * uy)
  c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
  s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
  return jnp.mean(s, axis=(1, 2, 3))  # mean over the interior, then over channels (equal sizes)

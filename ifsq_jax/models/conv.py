"""A stride-1 "SAME" convolution whose kernel gradient is fast on CPU for large feature maps.

XLA's CPU backend computes the kernel gradient of a 3x3 convolution as a
convolution with an image-sized "kernel", which runs far below the matmul peak on
large maps: for (4, 128, 128, 128) -> 128 it takes about 8 times the forward
pass (about 0.95 s against 0.12 s on 2 cores; (2, 256, 256, 128): 2.3 s), and it
dominates the tokenizer's training step. Here the kernel gradient is instead
``kh * kw`` batched matmuls, one per kernel tap, each contracting a shifted
view of the input with the output gradient per image (about 0.26 s and 0.49 s
for the same cases).
Other backends, small maps (where XLA's own gradient is faster) and the input
gradient keep XLA's convolution.

:class:`Conv` is a drop-in for ``nn.Conv(features, (k, k))`` with stride 1 and
"SAME" padding: same parameter names, shapes and initialisation.

B batch, H W spatial, C input channels, O output channels.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

_DIMS = ("NHWC", "HWIO", "NHWC")
# Measured on CPU: below 64x64 pixels, or for a handful of output channels, XLA's gradient is faster.
MIN_PIXELS = 64 * 64
MIN_OUT_CHANNELS = 32


def _xla_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=_DIMS)


@jax.custom_vjp
def _conv_tap_grad(x: jax.Array, kernel: jax.Array) -> jax.Array:
  return _xla_conv(x, kernel)


def _fwd(x, kernel):
  return _xla_conv(x, kernel), (x, kernel)


def _bwd(res, g):
  x, kernel = res
  dx = jax.vjp(lambda x_: _xla_conv(x_, kernel), x)[1](g)[0]
  kh, kw = kernel.shape[:2]
  h, w = x.shape[1:3]
  b, c, o = x.shape[0], x.shape[-1], g.shape[-1]
  xp = jnp.pad(x, ((0, 0), ((kh - 1) // 2, kh // 2), ((kw - 1) // 2, kw // 2), (0, 0)))  # XLA's SAME split
  g = g.reshape(b, h * w, o)
  # Each shifted view is copied on its own (the barrier keeps XLA from fusing the slice into the
  # transpose the matmul needs, which runs several times slower); per-image matmuls parallelise.
  taps = [jnp.einsum("brc,bro->bco", jax.lax.optimization_barrier(xp[:, i:i + h, j:j + w, :]).reshape(b, h * w, c),
                     g, preferred_element_type=jnp.float32).sum(0)
          for i in range(kh) for j in range(kw)]
  dk = jnp.stack(taps).reshape(kernel.shape).astype(kernel.dtype)
  return dx, dk


_conv_tap_grad.defvjp(_fwd, _bwd)


def conv_same(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """(B, H, W, C) * (kh, kw, C, O) -> (B, H, W, O), stride 1, "SAME" padding (as ``nn.Conv``)."""
  big = x.shape[1] * x.shape[2] >= MIN_PIXELS and kernel.shape[-1] >= MIN_OUT_CHANNELS
  if jax.default_backend() == "cpu" and big and kernel.shape[0] * kernel.shape[1] > 1:
    return _conv_tap_grad(x, kernel)
  return _xla_conv(x, kernel)


class Conv(nn.Module):
  """``nn.Conv(features, (kernel_size, kernel_size))`` with stride 1 and "SAME" padding (same parameters).

  Attributes:
    features: Output channels O.
    kernel_size: Odd or even square kernel size k.
    dtype: Compute dtype (inputs, kernel and bias are cast to it, as ``nn.Conv``).
  """

  features: int
  kernel_size: int = 3
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k = self.kernel_size
    kernel = self.param("kernel", nn.linear.default_kernel_init, (k, k, x.shape[-1], self.features))
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    return conv_same(x, kernel) + bias

"""A stride-1 "SAME" convolution whose kernel gradient is fast on CPU.

XLA's CPU backend computes the kernel gradient of a 3x3 convolution as a
convolution with an image-sized "kernel", which runs far below the matmul peak:
for (4, 128, 128, 128) -> 128 it takes about 6 times the forward pass (0.78 s
against 0.12 s on 2 cores; (2, 256, 256, 128): 2.0 s), and it dominated the
tokenizer's training step. Here the kernel gradient is instead ``kh * kw``
matmuls, one per kernel tap: the output gradient, transposed once to (O, BHW),
times the shifted view of the input, (BHW, C). That operand layout runs on
XLA's fastest CPU matmul path (0.15 s and 0.34 s for the cases above; from 16x16
maps of 512 channels on, it also beats XLA's gradient for the small maps).
Other backends, smaller maps, a handful of output channels and the input
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
# Measured on CPU: below 16x16 pixels, or for a handful of output channels, XLA's gradient is as fast.
MIN_PIXELS = 16 * 16
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
  return dx, _kernel_grad(x, g, kernel.shape).astype(kernel.dtype)


def _kernel_grad(x: jax.Array, g: jax.Array, kernel_shape: tuple[int, ...]) -> jax.Array:
  """(B, H, W, C), (B, H, W, O) -> (kh, kw, C, O): one (O, BHW) x (BHW, C) matmul per kernel tap."""
  kh, kw, c, o = kernel_shape
  b, h, w = x.shape[:3]
  xp = jnp.pad(x, ((0, 0), ((kh - 1) // 2, kh // 2), ((kw - 1) // 2, kw // 2), (0, 0)))  # XLA's SAME split
  # g transposed once, kept apart from the matmuls (folded into them, XLA would take a slower matmul path).
  gt = jax.lax.optimization_barrier(g.reshape(b * h * w, o).T)
  taps = [jnp.matmul(gt, xp[:, i:i + h, j:j + w, :].reshape(b * h * w, c), preferred_element_type=jnp.float32)
          for i in range(kh) for j in range(kw)]
  return jnp.stack(taps).reshape(kh, kw, o, c).transpose(0, 1, 3, 2)


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

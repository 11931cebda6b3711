"""XLA's 2-D convolution with its kernel gradient taken as matmuls, for XLA's CPU backend.

XLA's CPU backend computes the kernel gradient of a convolution as another
convolution, with an image-sized "kernel", which runs far below the matmul peak:
for (4, 128, 128, 128) -> 128, 3x3, it takes about 5 times the forward pass
(0.36 s against 0.07 s on 2 cores), a 1x1 convolution's takes 10 times a matmul
of the same FLOPs ((4, 32, 32, 256) -> 512: 54 ms against 6 ms), and a stride-2
one transposes its input first ((4, 129, 129, 128) -> 64x64: 104 ms). Here the
kernel gradient is a sum over pixels of outer products, taken as matmuls:

* per kernel tap: the output gradient, transposed once to (O, BHoWo), times the
  input view that tap sees, (BHoWo, C) (shifted, and strided for a strided
  convolution). That operand layout runs on XLA's fastest CPU matmul path
  (0.15 s for the case above);
* on small outputs (at most 16x16 pixels per image) or with a handful of input
  channels: the views of all taps side by side, (BHoWo, kh*kw*C), times the
  output gradient in one matmul: a longer matmul beats nine short ones there
  ((4, 8, 8, 512) -> 512: 5.5 ms against 6.6 ms for XLA's gradient and 8.7 ms per tap).

The forward pass and the input gradient are XLA's own. This is the ``"xla"``
convolution of :func:`ifsq_jax.models.conv.conv2d` on CPU; other backends run
XLA's convolution with its own gradients.

B batch, H W input size, Ho Wo output size, C input channels, O output channels.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp

DIMENSIONS = ("NHWC", "HWIO", "NHWC")
# Measured on CPU: up to this many output pixels per image, all taps in one matmul beat one matmul per tap.
MAX_IM2COL_PIXELS = 16 * 16
MAX_IM2COL_CHANNELS = 8  # kh * kw * C at most 72 columns: the first layer on RGB images

Pads = Sequence[tuple[int, int]]


def xla_conv(x: jax.Array, kernel: jax.Array, stride: int, pads: Pads) -> jax.Array:
  """(B, H, W, C) * (kh, kw, C, O) -> (B, Ho, Wo, O): XLA's convolution, with XLA's gradients."""
  return jax.lax.conv_general_dilated(x, kernel, (stride, stride), pads, dimension_numbers=DIMENSIONS)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv(x: jax.Array, kernel: jax.Array, stride: int, pads: Pads) -> jax.Array:
  """XLA's convolution whose kernel gradient is :func:`kernel_grad`; ``pads`` a tuple (hashable)."""
  return xla_conv(x, kernel, stride, pads)


def _fwd(x, kernel, stride, pads):
  return xla_conv(x, kernel, stride, pads), (x, kernel)


def _bwd(stride, pads, res, g):
  x, kernel = res
  dx = jax.vjp(lambda x_: xla_conv(x_, kernel, stride, pads), x)[1](g)[0]
  return dx, kernel_grad(x, g, kernel.shape, stride, pads).astype(kernel.dtype)


conv.defvjp(_fwd, _bwd)


def kernel_grad(x: jax.Array, g: jax.Array, kernel_shape: Sequence[int], stride: int, pads: Pads) -> jax.Array:
  """(B, H, W, C) input, (B, Ho, Wo, O) output gradient -> (kh, kw, C, O) kernel gradient, in float32."""
  kh, kw, c, o = kernel_shape
  b, ho, wo = g.shape[:3]
  xp = jnp.pad(x, ((0, 0), tuple(pads[0]), tuple(pads[1]), (0, 0)))
  views = [xp[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride, :].reshape(b * ho * wo, c)
           for i in range(kh) for j in range(kw)]
  g = g.reshape(b * ho * wo, o)
  if kh * kw > 1 and (ho * wo <= MAX_IM2COL_PIXELS or c <= MAX_IM2COL_CHANNELS):
    cols = jnp.concatenate(views, axis=-1)  # (BHoWo, kh*kw*C)
    dk = jax.lax.dot_general(cols, g, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return dk.reshape(kh, kw, c, o)
  # g transposed once, kept apart from the matmuls (folded into them, XLA would take a slower matmul path).
  gt = jax.lax.optimization_barrier(g.T)
  taps = [jnp.matmul(gt, v, preferred_element_type=jnp.float32) for v in views]  # (O, C) each
  return jnp.stack(taps).reshape(kh, kw, o, c).transpose(0, 1, 3, 2)

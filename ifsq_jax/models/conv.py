"""The tokenizer's 2-D convolution, whose implementation is a visible field.

:func:`conv2d` and :class:`Conv` take ``impl``, one of :data:`IMPLS`:

* ``"xla"``: XLA's convolution. On CPU its kernel gradient is taken as matmuls
  (:mod:`ifsq_jax.kernels.cpu.conv_grad`: XLA's own runs far below the matmul peak).
* ``"onednn"``: oneDNN's forward pass, input gradient and kernel gradient
  (:mod:`ifsq_jax.kernels.cpu.onednn`), float32 or bfloat16 operands of one dtype,
  on the CPU backend, whatever the number of devices. Where oneDNN does not load
  (no compiler, no oneDNN wheel, not x86-64 Linux, ``IFSQ_JAX_ONEDNN=0``), or on
  another backend, or for other dtypes, tracing raises an error saying why.
* ``"auto"`` (the default): ``"onednn"`` in a CPU process with a single device
  where oneDNN loads, for float32 / bfloat16 operands; ``"xla"`` otherwise (with
  one warning from the loader when oneDNN fails to load).

For both ``"auto"`` and ``"onednn"``, a convolution that oneDNN cannot build on
this processor (oneDNN 3.2 builds no bfloat16 convolution without AVX-512; see
:func:`ifsq_jax.kernels.cpu.onednn.build_error`) runs as ``"xla"``, with one
logged warning per dtype: a config that asks for oneDNN still runs everywhere.

The choice is made when a function is traced, from the field, the shapes and
the platform traced for (:func:`ifsq_jax.parallel.platform`: the mesh's devices,
so a TPU topology compiled on a CPU host gets XLA's convolutions).

:class:`Conv` is ``nn.Conv(features, (k, k), strides, padding)`` with the same
parameter names and shapes; its parameters carry logical axis names
(``KERNEL_H, KERNEL_W, CONV_IN, CONV_OUT`` for the kernel, ``CONV_OUT`` for the
bias) and its default initialisation is PyTorch's ``nn.Conv2d``'s.

B batch, H W input size, Ho Wo output size, C input channels, O output channels.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ifsq_jax.kernels.cpu import conv_grad, onednn
from ifsq_jax import parallel
from ifsq_jax.parallel import CONV_IN, CONV_OUT, KERNEL_H, KERNEL_W

IMPLS = ("auto", "xla", "onednn")
KERNEL_AXES = (KERNEL_H, KERNEL_W, CONV_IN, CONV_OUT)
BIAS_AXES = (CONV_OUT,)

Padding = str | Sequence[tuple[int, int]]
_warned_dtypes: set[str] = set()  # dtypes whose oneDNN fallback was logged (one warning each per process)


def check_impl(impl: str) -> str:
  """Returns ``impl`` if it is one of :data:`IMPLS`; otherwise a ValueError naming it and the valid ones."""
  if impl not in IMPLS:
    raise ValueError(f"conv impl={impl!r} is not valid; use one of {IMPLS}.")
  return impl


# PyTorch's default initialisation of nn.Conv2d / nn.Linear: kaiming_uniform(a=sqrt(5)) gives
# U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (variance 1 / (3 fan_in)), fan_in = kh * kw * C (C for a Linear).
torch_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_bias_init(fan_in: int) -> Callable[..., jax.Array]:
  """PyTorch's default bias initialisation, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in of the layer's kernel."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def _pads(x_shape, kernel_shape, stride: int, padding: Padding) -> tuple[tuple[int, int], ...]:
  if isinstance(padding, str):
    if padding not in ("SAME", "VALID"):
      raise ValueError(f"padding={padding!r}: use 'SAME', 'VALID' or ((top, bottom), (left, right)).")
    return tuple(jax.lax.padtype_to_pads(x_shape[1:3], kernel_shape[:2], (stride, stride), padding))
  pads = tuple((int(lo), int(hi)) for lo, hi in padding)
  if len(pads) != 2:
    raise ValueError(f"padding={padding!r}: give ((top, bottom), (left, right)).")
  return pads


def _onednn_runs(impl: str, x: jax.Array, kernel: jax.Array, stride: int, pads) -> bool:
  """Whether this convolution goes to oneDNN (``impl`` "auto" or "onednn"); raises for an impossible "onednn"."""
  explicit = impl == "onednn"
  if explicit:
    if parallel.platform() != "cpu":
      raise RuntimeError(f"conv impl='onednn' runs on the CPU backend only, not {parallel.platform()!r}; "
                         "use impl='auto' or 'xla'.")
    if not onednn.load():
      raise RuntimeError(f"conv impl='onednn': oneDNN convolutions are not available here "
                         f"({onednn.unavailable_reason()}); use impl='auto' or 'xla'.")
  elif parallel.platform() != "cpu" or not onednn.usable():
    return False
  dtype = jnp.dtype(x.dtype)
  if dtype != kernel.dtype or dtype not in onednn.DTYPES:
    if explicit:
      raise ValueError(f"conv impl='onednn' takes float32 or bfloat16 input and kernel of one dtype, not "
                       f"{dtype.name} and {jnp.dtype(kernel.dtype).name}; use impl='auto' or 'xla'.")
    return False
  error = onednn.build_error(dtype, tuple(x.shape), tuple(kernel.shape), stride, pads)
  if error is not None:
    if dtype.name not in _warned_dtypes:
      _warned_dtypes.add(dtype.name)
      logging.warning("oneDNN cannot build %s convolutions on this processor (first: %s * %s, stride %d): %s. "
                      "XLA's convolutions run instead.", dtype.name, tuple(x.shape), tuple(kernel.shape), stride,
                      error)
    return False
  return True


def conv2d(x: jax.Array, kernel: jax.Array, stride: int = 1, padding: Padding = "SAME",
           impl: str = "auto") -> jax.Array:
  """(B, H, W, C) * (kh, kw, C, O) -> (B, Ho, Wo, O), as ``nn.Conv`` (no bias).

  Args:
    x: Input.
    kernel: Kernel, HWIO.
    stride: The same stride along both axes.
    padding: ``"SAME"``, ``"VALID"`` or ((top, bottom), (left, right)).
    impl: ``"auto"``, ``"xla"`` or ``"onednn"`` (see the module docstring).

  Raises:
    ValueError: a bad ``padding`` or ``impl``, or dtypes ``impl="onednn"`` does not take.
    RuntimeError: ``impl="onednn"`` off the CPU backend or where oneDNN does not load.
  """
  check_impl(impl)
  pads = _pads(x.shape, kernel.shape, stride, padding)
  if impl != "xla" and _onednn_runs(impl, x, kernel, stride, pads):
    return onednn.conv(x, kernel, stride, pads)
  if parallel.platform() == "cpu":
    return conv_grad.conv(x, kernel, stride, pads)
  return conv_grad.xla_conv(x, kernel, stride, pads)


class Conv(nn.Module):
  """``nn.Conv(features, (kernel_size, kernel_size), strides, padding)`` (same parameter names and shapes).

  Attributes:
    features: Output channels O.
    kernel_size: Square kernel size k.
    strides: The same stride along both axes.
    padding: ``"SAME"``, ``"VALID"`` or ((top, bottom), (left, right)).
    use_bias: Whether to add a bias.
    impl: The convolution, ``"auto"``, ``"xla"`` or ``"onednn"`` (see the module docstring).
    kernel_init: Kernel initializer (default PyTorch's: U(+-1/sqrt(k*k*C))).
    bias_init: Bias initializer; None for PyTorch's default, U(+-1/sqrt(k*k*C)).
    dtype: Compute dtype (inputs, kernel and bias are cast to it, as ``nn.Conv``).
  """

  features: int
  kernel_size: int = 3
  strides: int = 1
  padding: Padding = "SAME"
  use_bias: bool = True
  impl: str = "auto"
  kernel_init: Callable[..., jax.Array] = torch_kernel_init
  bias_init: Callable[..., jax.Array] | None = None
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    check_impl(self.impl)
    k, c = self.kernel_size, x.shape[-1]
    kernel = self.param("kernel", nn.with_logical_partitioning(self.kernel_init, KERNEL_AXES),
                        (k, k, c, self.features))
    bias = None
    if self.use_bias:
      bias_init = self.bias_init or torch_bias_init(k * k * c)
      bias = self.param("bias", nn.with_logical_partitioning(bias_init, BIAS_AXES), (self.features,))
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    y = conv2d(x, kernel, self.strides, self.padding, self.impl)
    return y if bias is None else y + bias

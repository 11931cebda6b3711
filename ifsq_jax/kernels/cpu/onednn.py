"""oneDNN convolutions for XLA's CPU backend, called through the XLA FFI.

XLA's CPU convolutions run below its own matmul peak, and their kernel gradient
far below it. oneDNN (Intel's deep-learning kernels, which PyTorch uses on CPU)
runs the same convolutions faster; for a (4, 128, 128, 128) -> 128 3x3
convolution on 2 AVX-512 cores, forward / input gradient / kernel gradient take
56 / 56 / 61 ms against XLA's 78 / 71 ms and 187 ms for the kernel gradient as
per-tap matmuls.

``onednn_conv.cc`` (beside this file) holds the three FFI handlers and a probe.
It is compiled on first use with the C++ compiler (``$CXX``, else ``g++``)
against the oneDNN wheels (``onednn-cpu-gomp`` and ``onednn-devel-cpu-gomp``,
installed with this package on x86-64 Linux) and jaxlib's FFI headers, into
``$IFSQ_JAX_CACHE`` (default ``~/.cache/ifsq_jax``): a few seconds, once per
source, jaxlib and oneDNN version. Without a compiler or oneDNN, or with
``IFSQ_JAX_ONEDNN=0``, :func:`load` is False (with one warning saying why,
:func:`unavailable_reason`).

Even where it loads, oneDNN builds no convolution for some dtypes on some
processors (oneDNN 3.2: no bfloat16 convolution without AVX-512).
:func:`build_error` asks it, through the probe, before a convolution is traced.

Which convolution a model runs is chosen by :func:`ifsq_jax.models.conv.conv2d`'s
``impl`` field; this module only provides the kernels and the facts it decides on.

B batch, H W input size, Ho Wo output size, C input channels, O output channels.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.metadata
import logging
import os
import pathlib
import shutil
import subprocess
import tempfile
from typing import Sequence

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

SOURCE = pathlib.Path(__file__).with_name("onednn_conv.cc")
_TARGETS = {"ifsq_conv_forward": "IfsqConvForward", "ifsq_conv_backward_data": "IfsqConvBackwardData",
            "ifsq_conv_backward_weights": "IfsqConvBackwardWeights"}

Pads = Sequence[tuple[int, int]]
DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))  # what the kernels take; index = the probe's code


def _installed_file(dist: str, suffix: str) -> pathlib.Path:
  """The file of an installed distribution whose path ends with ``suffix``."""
  for f in importlib.metadata.files(dist) or ():
    if str(f).endswith(suffix):
      return pathlib.Path(f.locate()).resolve()
  raise FileNotFoundError(f"{dist} has no file ending in {suffix}")


def cache_dir() -> pathlib.Path:
  return pathlib.Path(os.environ.get("IFSQ_JAX_CACHE") or pathlib.Path.home() / ".cache" / "ifsq_jax")


def build() -> pathlib.Path:
  """Compiles ``onednn_conv.cc`` into the cache (unless already there) and returns the shared library's path.

  Raises:
    FileNotFoundError: oneDNN or the compiler is missing.
    RuntimeError: the compiler failed (its message is included).
  """
  include = _installed_file("onednn-devel-cpu-gomp", "oneapi/dnnl/dnnl.hpp").parents[2]
  lib_dir = _installed_file("onednn-cpu-gomp", "/libdnnl.so").parent
  compiler = shutil.which(os.environ.get("CXX") or "g++")
  if compiler is None:
    raise FileNotFoundError(f"no C++ compiler: {os.environ.get('CXX') or 'g++'} is not on PATH (set CXX)")
  command = [compiler, "-O2", "-std=c++17", "-shared", "-fPIC", f"-I{jax.ffi.include_dir()}", f"-I{include}",
             str(SOURCE), f"-L{lib_dir}", "-ldnnl", f"-Wl,-rpath,{lib_dir}"]
  versions = [jaxlib.__version__, importlib.metadata.version("onednn-cpu-gomp")]
  key = hashlib.sha256("\0".join([SOURCE.read_text(), *versions, *command]).encode()).hexdigest()[:16]
  out = cache_dir() / f"onednn_conv-{key}.so"
  if out.exists():
    return out
  out.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
    partial = pathlib.Path(tmp) / out.name
    result = subprocess.run([*command, "-o", str(partial)], capture_output=True, text=True)
    if result.returncode:
      raise RuntimeError(f"compiling {SOURCE.name} failed:\n{result.stderr[-4000:]}")
    os.replace(partial, out)  # atomic: processes building at once each leave a whole file
  return out


@functools.cache
def _library() -> tuple[ctypes.CDLL | None, str | None]:
  """(the loaded library with its FFI targets registered, None) or (None, why not); once per process."""
  if os.environ.get("IFSQ_JAX_ONEDNN", "1") == "0":
    return None, "turned off with IFSQ_JAX_ONEDNN=0"
  try:
    lib = ctypes.cdll.LoadLibrary(str(build()))
  except (OSError, RuntimeError, importlib.metadata.PackageNotFoundError) as e:
    logging.warning("oneDNN convolutions are not available, XLA's are used instead: %s", e)
    return None, str(e)
  for target, symbol in _TARGETS.items():
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
  lib.IfsqConvCanBuild.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_int64), ctypes.c_char_p, ctypes.c_int64]
  lib.IfsqConvCanBuild.restype = ctypes.c_int
  return lib, None


def load() -> bool:
  """Builds and registers the FFI targets once per process; False (and one warning) where that is not possible."""
  return _library()[0] is not None


def unavailable_reason() -> str | None:
  """Why oneDNN convolutions cannot load here (no compiler, no oneDNN, ``IFSQ_JAX_ONEDNN=0``); None if they load."""
  return _library()[1]


def usable() -> bool:
  """Whether ``impl="auto"`` convolutions go through oneDNN: a CPU process with a single device where it loads.

  With several devices in a process (simulated CPU devices) their oneDNN thread
  teams would share the same cores, and a batch sharded over them would be
  gathered for each foreign call: XLA's convolutions are used. Processes with one
  device each (``jax.distributed``) use oneDNN, so per-process work (encoding,
  extraction) computes the same numbers whatever the number of processes; a
  computation sharded across such processes gathers each convolution's operands
  (correct, but slow: set ``IFSQ_JAX_ONEDNN=0``, or ``conv_impl="xla"``, to train
  across CPU processes).
  """
  return jax.default_backend() == "cpu" and jax.local_device_count() == 1 and load()


@functools.cache
def build_error(dtype, x_shape: tuple[int, ...], kernel_shape: tuple[int, ...], stride: int,
                pads: tuple[tuple[int, int], ...]) -> str | None:
  """Why oneDNN cannot build this convolution's three passes on this processor; None when it can.

  Asks oneDNN (``IfsqConvCanBuild`` in ``onednn_conv.cc``) to create the forward,
  backward-data and backward-weights primitive descriptors; the answer is cached
  per dtype and geometry.

  Args:
    dtype: float32 or bfloat16 (activations and kernel).
    x_shape: (B, H, W, C).
    kernel_shape: (kh, kw, C, O).
    stride: The same stride along both axes.
    pads: ((top, bottom), (left, right)).

  Raises:
    RuntimeError: oneDNN does not load (:func:`unavailable_reason`).
  """
  lib = _library()[0]
  if lib is None:
    raise RuntimeError(f"oneDNN convolutions are not available: {unavailable_reason()}")
  dtype = jnp.dtype(dtype)
  if dtype not in DTYPES:
    return f"oneDNN convolutions take float32 or bfloat16, not {dtype.name}"
  b, h, w, c = x_shape
  kh, kw, _, o = kernel_shape
  (top, bottom), (left, right) = pads
  ho, wo = (h + top + bottom - kh) // stride + 1, (w + left + right - kw) // stride + 1
  dims = (ctypes.c_int64 * 14)(b, h, w, c, kh, kw, o, ho, wo, stride, top, bottom, left, right)
  why = ctypes.create_string_buffer(512)
  if lib.IfsqConvCanBuild(DTYPES.index(dtype), dims, why, len(why)):
    return None
  return why.value.decode(errors="replace") or "oneDNN refused the convolution"


def _attributes(stride: int, pads: Pads) -> dict[str, np.int64]:
  (top, bottom), (left, right) = pads
  return dict(stride=np.int64(stride), pad_top=np.int64(top), pad_bottom=np.int64(bottom), pad_left=np.int64(left),
              pad_right=np.int64(right))


def _call(target: str, shape: Sequence[int], dtype, a: jax.Array, b: jax.Array, stride: int, pads: Pads):
  if not load():
    raise RuntimeError(f"oneDNN convolutions are not available: {unavailable_reason()}")
  out = jax.ShapeDtypeStruct(tuple(shape), dtype)
  return jax.ffi.ffi_call(target, out, vmap_method="sequential")(a, b, **_attributes(stride, pads))


# The three passes are bilinear and each one's gradients are the other passes, so
# each is a custom_vjp over the others: gradients of any order run on oneDNN.


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv(x: jax.Array, kernel: jax.Array, stride: int, pads: Pads) -> jax.Array:
  """(B, H, W, C) * (kh, kw, C, O) -> (B, Ho, Wo, O), differentiable; x and kernel both float32 or bfloat16.

  Args:
    x: Input.
    kernel: Kernel, HWIO.
    stride: The same stride along both axes.
    pads: ((top, bottom), (left, right)) zero padding, as a tuple (hashable).
  """
  kh, kw, _, o = kernel.shape
  ho = (x.shape[1] + sum(pads[0]) - kh) // stride + 1
  wo = (x.shape[2] + sum(pads[1]) - kw) // stride + 1
  return _call("ifsq_conv_forward", (x.shape[0], ho, wo, o), x.dtype, x, kernel, stride, pads)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def input_grad(dy: jax.Array, kernel: jax.Array, x_shape: tuple[int, ...], stride: int, pads: Pads) -> jax.Array:
  """(B, Ho, Wo, O) output gradient, (kh, kw, C, O) kernel -> (B, H, W, C) input gradient of :func:`conv`."""
  return _call("ifsq_conv_backward_data", x_shape, dy.dtype, dy, kernel, stride, pads)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def kernel_grad(x: jax.Array, dy: jax.Array, kernel_shape: tuple[int, ...], stride: int, pads: Pads) -> jax.Array:
  """(B, H, W, C) input, (B, Ho, Wo, O) output gradient -> (kh, kw, C, O) kernel gradient of :func:`conv`, float32."""
  return _call("ifsq_conv_backward_weights", kernel_shape, jnp.float32, x, dy, stride, pads)


def _conv_fwd(x, kernel, stride, pads):
  return conv(x, kernel, stride, pads), (x, kernel)


def _conv_bwd(stride, pads, res, dy):
  x, kernel = res
  dy = dy.astype(x.dtype)
  return (input_grad(dy, kernel, x.shape, stride, pads),
          kernel_grad(x, dy, kernel.shape, stride, pads).astype(kernel.dtype))


def _input_grad_fwd(dy, kernel, x_shape, stride, pads):
  return input_grad(dy, kernel, x_shape, stride, pads), (dy, kernel)


def _input_grad_bwd(x_shape, stride, pads, res, ct):
  dy, kernel = res
  ct = ct.astype(dy.dtype)
  return conv(ct, kernel, stride, pads), kernel_grad(ct, dy, kernel.shape, stride, pads).astype(kernel.dtype)


def _kernel_grad_fwd(x, dy, kernel_shape, stride, pads):
  return kernel_grad(x, dy, kernel_shape, stride, pads), (x, dy)


def _kernel_grad_bwd(kernel_shape, stride, pads, res, ct):
  x, dy = res
  ct = ct.astype(x.dtype)
  return input_grad(dy, ct, x.shape, stride, pads), conv(x, ct, stride, pads).astype(dy.dtype)


conv.defvjp(_conv_fwd, _conv_bwd)
input_grad.defvjp(_input_grad_fwd, _input_grad_bwd)
kernel_grad.defvjp(_kernel_grad_fwd, _kernel_grad_bwd)

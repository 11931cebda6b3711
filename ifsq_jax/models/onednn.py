"""oneDNN convolutions for XLA's CPU backend, called through the XLA FFI.

XLA's CPU convolutions run below its own matmul peak, and their kernel gradient
far below it. oneDNN (Intel's deep-learning kernels, which PyTorch uses on CPU)
runs the same convolutions faster; for a (4, 128, 128, 128) -> 128 3x3
convolution on 2 AVX-512 cores, forward / input gradient / kernel gradient take
56 / 56 / 61 ms against XLA's 78 / 71 ms and 187 ms for the kernel gradient as
per-tap matmuls.

``onednn_conv.cc`` (beside this file) holds the three FFI handlers. It is
compiled on first use with the C++ compiler (``$CXX``, else ``g++``) against the
oneDNN wheels (``onednn-cpu-gomp`` and ``onednn-devel-cpu-gomp``, installed with
this package on x86-64 Linux) and jaxlib's FFI headers, into ``$IFSQ_JAX_CACHE``
(default ``~/.cache/ifsq_jax``): a few seconds, once per source, jaxlib and
oneDNN version. Without a compiler or oneDNN, or with ``IFSQ_JAX_ONEDNN=0``,
:func:`usable` is False (with one warning saying why) and convolutions stay XLA's.

B batch, H W input size, Ho Wo output size, C input channels, O output channels.
"""

from __future__ import annotations

import contextlib
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
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

SOURCE = pathlib.Path(__file__).with_name("onednn_conv.cc")
_TARGETS = {"ifsq_conv_forward": "IfsqConvForward", "ifsq_conv_backward_data": "IfsqConvBackwardData",
            "ifsq_conv_backward_weights": "IfsqConvBackwardWeights"}

Pads = Sequence[tuple[int, int]]
_forced: bool | None = None


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
def load() -> bool:
  """Builds and registers the FFI targets once per process; False (and a warning) where that is not possible."""
  if os.environ.get("IFSQ_JAX_ONEDNN", "1") == "0":
    return False
  try:
    lib = ctypes.cdll.LoadLibrary(str(build()))
  except (OSError, RuntimeError, importlib.metadata.PackageNotFoundError) as e:
    logging.warning("oneDNN convolutions are not available, XLA's are used instead: %s", e)
    return False
  for target, symbol in _TARGETS.items():
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
  return True


def usable() -> bool:
  """Whether CPU convolutions go through oneDNN: it loads, and this process has a single device.

  With several devices in a process (simulated CPU devices) their oneDNN thread
  teams would share the same cores, and a batch sharded over them would be
  gathered for each foreign call: XLA's convolutions are used. Processes with one
  device each (``jax.distributed``) use oneDNN, so per-process work (encoding,
  extraction) computes the same numbers whatever the number of processes; a
  computation sharded across such processes gathers each convolution's operands
  (correct, but slow: set ``IFSQ_JAX_ONEDNN=0`` to train across CPU processes).
  :func:`forced` overrides this while functions are traced.
  """
  if _forced is not None:
    return _forced and load()
  return jax.local_device_count() == 1 and load()


@contextlib.contextmanager
def forced(on: bool) -> Iterator[None]:
  """Functions traced inside use oneDNN convolutions (if it loads) or not, whatever the device count.

  Only tracing sees this: clear JAX's caches (``jax.clear_caches()``) to retrace a
  function already compiled outside.
  """
  global _forced
  previous, _forced = _forced, on
  try:
    yield
  finally:
    _forced = previous


def _attributes(stride: int, pads: Pads) -> dict[str, np.int64]:
  (top, bottom), (left, right) = pads
  return dict(stride=np.int64(stride), pad_top=np.int64(top), pad_bottom=np.int64(bottom), pad_left=np.int64(left),
              pad_right=np.int64(right))


def _call(target: str, shape: Sequence[int], dtype, a: jax.Array, b: jax.Array, stride: int, pads: Pads):
  if not load():
    raise RuntimeError("oneDNN convolutions are not available (see the warning above, or IFSQ_JAX_ONEDNN=0)")
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

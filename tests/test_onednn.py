"""oneDNN convolutions through the XLA FFI: XLA's results and gradients, the impl field, the build probe, the
build cache and the fallbacks.

Where oneDNN cannot load (no C++ compiler, no oneDNN wheel, not x86-64 Linux) each test that needs it asserts the
fallback instead: XLA's convolutions and XLA's numbers.
"""

import logging
import os
import platform
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import subprocess_env
from ifsq_jax.kernels.cpu import onednn
from ifsq_jax.models import conv
from ifsq_jax.models.tokenizer import Tokenizer, TokenizerConfig

# (input shape, kernel shape, stride, pads)
CASES = [
    ((2, 9, 9, 5), (3, 3, 5, 7), 1, ((1, 1), (1, 1))),
    ((2, 9, 9, 6), (3, 3, 6, 4), 2, ((0, 1), (0, 1))),    # the tokenizer's downsampling
    ((2, 8, 8, 3), (4, 4, 3, 5), 2, ((1, 1), (1, 1))),    # the discriminator's
    ((2, 7, 7, 8), (4, 4, 8, 1), 1, ((1, 2), (1, 2))),    # its last layer: one logit per patch
    ((1, 16, 16, 32), (1, 1, 32, 16), 1, ((0, 0), (0, 0))),  # 1x1 skip
    ((2, 12, 10, 16), (3, 3, 16, 3), 1, ((1, 1), (1, 1))),  # not square, to RGB
    ((2, 6, 6, 4), (3, 3, 4, 4), 1, ((0, 0), (0, 0))),    # VALID
]
TARGETS = ("ifsq_conv_forward", "ifsq_conv_backward_data", "ifsq_conv_backward_weights")


def _prerequisites_installed():
  """What oneDNN needs to build and load: x86-64 Linux, the oneDNN wheels and a C++ compiler."""
  import importlib.metadata  # pylint: disable=g-import-not-at-top
  try:
    importlib.metadata.version("onednn-devel-cpu-gomp")
  except importlib.metadata.PackageNotFoundError:
    return False
  return (sys.platform.startswith("linux") and platform.machine() == "x86_64"
          and shutil.which(os.environ.get("CXX") or "g++") is not None)


def _loads_here():
  """Whether this process's oneDNN should load: its prerequisites, and not turned off with IFSQ_JAX_ONEDNN=0."""
  return _prerequisites_installed() and os.environ.get("IFSQ_JAX_ONEDNN", "1") != "0"


def _xla(x, k, stride, pads):
  return jax.lax.conv_general_dilated(x, k, (stride, stride), pads, dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _operands(x_shape, k_shape, stride, pads, dtype=jnp.float32):
  kx, kk, kg = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, x_shape).astype(dtype)
  k = (0.3 * jax.random.normal(kk, k_shape)).astype(dtype)
  dy = jax.random.normal(kg, _xla(x, k, stride, pads).shape).astype(dtype)
  return x, k, dy


def _close(a, b, tol):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  np.testing.assert_allclose(a, b, rtol=tol, atol=tol * float(np.abs(b).max()))


def _grad_jaxpr(impl, x, k, stride=1, pads=((1, 1), (1, 1))):
  fn = lambda k, x: jnp.sum(conv.conv2d(x, k, stride, pads, impl=impl).astype(jnp.float32))
  return str(jax.make_jaxpr(jax.grad(fn))(k, x))


def _assert_xla_convolution(impl, x, k, stride, pads, tol=1e-5):
  """``conv2d(impl=impl)`` traces to XLA's convolution (no oneDNN call) and computes XLA's forward pass."""
  jaxpr = _grad_jaxpr(impl, x, k, stride, pads)
  assert "ffi_call" not in jaxpr and "conv_general_dilated" in jaxpr
  f32 = lambda a: a.astype(jnp.float32)
  _close(conv.conv2d(x, k, stride, pads, impl=impl), _xla(f32(x), f32(k), stride, pads), tol)


def _onednn_or_assert_fallback(x, k, stride, pads, tol=1e-5):
  """True where oneDNN loads; otherwise asserts that "auto" runs XLA's convolution and "onednn" says why."""
  if onednn.load():
    return True
  _assert_xla_convolution("auto", x, k, stride, pads, tol)
  with pytest.raises(RuntimeError, match="oneDNN convolutions are not available"):
    conv.conv2d(x, k, stride, pads, impl="onednn")
  return False


def test_loads_where_its_prerequisites_are_installed():
  if _loads_here():
    assert onednn.load(), f"oneDNN must build and load here: {onednn.unavailable_reason()}"
    assert onednn.unavailable_reason() is None
  else:
    assert not onednn.load() and onednn.unavailable_reason()
    x, k, _ = _operands(*CASES[0])
    assert not _onednn_or_assert_fallback(x, k, *CASES[0][2:])


@pytest.mark.parametrize("x_shape,k_shape,stride,pads", CASES)
def test_three_passes_match_xla(x_shape, k_shape, stride, pads):
  x, k, dy = _operands(x_shape, k_shape, stride, pads)
  if not _onednn_or_assert_fallback(x, k, stride, pads):
    return
  assert onednn.build_error(jnp.float32, x_shape, k_shape, stride, pads) is None
  y, pullback = jax.vjp(lambda x, k: _xla(x, k, stride, pads), x, k)
  dx, dk = pullback(dy)
  _close(jax.jit(lambda x, k: onednn.conv(x, k, stride, pads))(x, k), y, 1e-5)
  _close(jax.jit(lambda dy, k: onednn.input_grad(dy, k, x.shape, stride, pads))(dy, k), dx, 1e-5)
  got = jax.jit(lambda x, dy: onednn.kernel_grad(x, dy, k.shape, stride, pads))(x, dy)
  assert got.dtype == jnp.float32
  _close(got, dk, 1e-5)


@pytest.mark.parametrize("x_shape,k_shape,stride,pads", CASES[:3])
def test_bfloat16_passes_match_xla_in_float32_or_fall_back_where_onednn_cannot_build_them(
    x_shape, k_shape, stride, pads, monkeypatch, caplog):
  x, k, dy = _operands(x_shape, k_shape, stride, pads, jnp.bfloat16)
  if not _onednn_or_assert_fallback(x, k, stride, pads, tol=1e-2):
    return
  f32 = lambda a: a.astype(jnp.float32)
  y, pullback = jax.vjp(lambda x, k: _xla(x, k, stride, pads), f32(x), f32(k))
  dx, dk = pullback(f32(dy))
  if onednn.build_error(jnp.bfloat16, x_shape, k_shape, stride, pads) is not None:
    # This processor (no AVX-512: oneDNN 3.2 has no bfloat16 convolution) -> XLA's, with one warning.
    monkeypatch.setattr(conv, "_warned_dtypes", set())
    with caplog.at_level(logging.WARNING):
      _assert_xla_convolution("onednn", x, k, stride, pads, tol=1e-2)
    assert "oneDNN cannot build bfloat16 convolutions" in caplog.text
    return
  got = onednn.conv(x, k, stride, pads)
  assert got.dtype == jnp.bfloat16
  _close(got, y, 1e-2)  # bf16 outputs: 8 mantissa bits
  _close(onednn.input_grad(dy, k, x.shape, stride, pads), dx, 1e-2)
  _close(onednn.kernel_grad(x, dy, k.shape, stride, pads), dk, 1e-4)  # float32 accumulation and result
  assert "ffi_call" in _grad_jaxpr("onednn", x, k, stride, pads)


@pytest.mark.parametrize("impl", ["auto", "onednn"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_a_convolution_onednn_cannot_build_runs_as_xla_with_one_warning(impl, dtype, monkeypatch, caplog):
  """The probe says no (as for bfloat16 on AVX2-only processors): XLA's convolution, XLA's numbers, one warning."""
  monkeypatch.setattr(onednn, "usable", lambda: True)  # as in a one-device CPU process, wherever oneDNN loads
  monkeypatch.setattr(onednn, "build_error", lambda *a: "could not create a primitive descriptor (test)")
  monkeypatch.setattr(conv, "_warned_dtypes", set())
  if impl == "onednn" and not onednn.load():
    with pytest.raises(RuntimeError, match="not available"):
      conv.conv2d(jnp.zeros((1, 8, 8, 4), dtype), jnp.zeros((3, 3, 4, 8), dtype), impl=impl)
    return
  tol = 1e-5 if dtype == jnp.float32 else 1e-2
  with caplog.at_level(logging.WARNING):
    for x_shape, k_shape, stride, pads in CASES[:3]:
      x, k, dy = _operands(x_shape, k_shape, stride, pads, dtype)
      _assert_xla_convolution(impl, x, k, stride, pads, tol)
      got = jax.grad(lambda x, k: jnp.sum(conv.conv2d(x, k, stride, pads, impl=impl) * dy), argnums=(0, 1))(x, k)
      want = jax.grad(lambda x, k: jnp.sum(_xla(x, k, stride, pads) * dy), argnums=(0, 1))(x, k)
      for a, b in zip(got, want):
        _close(a, b, tol)
  warnings = [r for r in caplog.records if "oneDNN cannot build" in r.getMessage()]
  assert len(warnings) == 1 and jnp.dtype(dtype).name in warnings[0].getMessage()
  assert "test" in warnings[0].getMessage()  # oneDNN's reason


@pytest.mark.parametrize("x_shape,k_shape,stride,pads", CASES[:4])
def test_gradients_of_every_pass_to_second_order_match_xla(x_shape, k_shape, stride, pads):
  x, k, dy = _operands(x_shape, k_shape, stride, pads)
  if not _onednn_or_assert_fallback(x, k, stride, pads):
    return

  def second_order(conv_fn):
    # d/d(x, k) of |grad_x L|^2 + |grad_k L|^2 with L = sum(sin(conv(x, k)) * dy): runs every pass's gradient.
    def penalty(x, k):
      gx, gk = jax.grad(lambda x, k: jnp.sum(jnp.sin(conv_fn(x, k)) * dy), argnums=(0, 1))(x, k)
      return jnp.sum(gx**2) + jnp.sum(gk**2)
    return jax.jit(jax.value_and_grad(penalty, argnums=(0, 1)))(x, k)

  (got, (gx, gk)) = second_order(lambda x, k: onednn.conv(x, k, stride, pads))
  (want, (wx, wk)) = second_order(lambda x, k: _xla(x, k, stride, pads))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  _close(gx, wx, 1e-4)
  _close(gk, wk, 1e-4)


def test_impl_field_chooses_the_convolution():
  k, x = jnp.zeros((3, 3, 4, 8)), jnp.zeros((1, 8, 8, 4))
  assert jax.local_device_count() == 8 and not onednn.usable()  # the suite's 8 simulated devices: "auto" is XLA
  for impl in ("auto", "xla"):
    jaxpr = _grad_jaxpr(impl, x, k)
    assert "ffi_call" not in jaxpr and "conv_general_dilated" in jaxpr
  if not _onednn_or_assert_fallback(x, k, 1, ((1, 1), (1, 1))):
    return
  jaxpr = _grad_jaxpr("onednn", x, k)
  assert "conv_general_dilated" not in jaxpr
  for target in ("ifsq_conv_forward", "ifsq_conv_backward_weights"):
    assert target in jaxpr
  with pytest.raises(ValueError, match="impl='onednn' takes float32 or bfloat16.*float16"):
    _grad_jaxpr("onednn", x.astype(jnp.float16), k.astype(jnp.float16))
  assert "ffi_call" not in _grad_jaxpr("auto", x.astype(jnp.float16), k.astype(jnp.float16))


def test_a_bad_impl_names_the_value_and_the_valid_ones():
  x, k = jnp.zeros((1, 8, 8, 4)), jnp.zeros((3, 3, 4, 8))
  message = r"impl='cudnn' is not valid; use one of \('auto', 'xla', 'onednn'\)"
  with pytest.raises(ValueError, match=message):
    conv.conv2d(x, k, impl="cudnn")
  with pytest.raises(ValueError, match=message):
    conv.Conv(8, impl="cudnn").init(jax.random.key(0), x)
  with pytest.raises(ValueError, match=r"conv_impl='cudnn' is not valid; use one of \('auto', 'xla', 'onednn'\)"):
    TokenizerConfig(conv_impl="cudnn")


def _small_tokenizer(conv_impl):
  return Tokenizer(TokenizerConfig(hidden_size=32, hidden_size_mult=(1, 2), num_res_blocks=1, downsample=(True, False),
                                   upsample=(False, True), levels=(5, 5, 5, 5), resolution=16, conv_impl=conv_impl))


def test_tokenizer_conv_impl_reaches_every_convolution_and_gradients_match_xla():
  x = jax.random.uniform(jax.random.key(0), (2, 16, 16, 3), minval=-1, maxval=1)
  params = _small_tokenizer("xla").init(jax.random.key(1), x)["params"]
  loss = lambda model: lambda p: jnp.mean(jnp.abs(model.apply({"params": p}, x)[0] - x))
  assert "ffi_call" not in str(jax.make_jaxpr(loss(_small_tokenizer("xla")))(params))
  if not onednn.load():
    with pytest.raises(RuntimeError, match="oneDNN convolutions are not available"):
      jax.make_jaxpr(loss(_small_tokenizer("onednn")))(params)
    return
  jaxpr = str(jax.make_jaxpr(jax.grad(loss(_small_tokenizer("onednn"))))(params))
  assert "conv_general_dilated" not in jaxpr  # quant_conv and post_quant_conv included
  got, got_grads = jax.jit(jax.value_and_grad(loss(_small_tokenizer("onednn"))))(params)
  want, want_grads = jax.jit(jax.value_and_grad(loss(_small_tokenizer("xla"))))(params)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(want_grads))
  for a, b in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5 * scale)


def _in_subprocess(code, tmp_path, **env):
  base = {k: v for k, v in subprocess_env(1).items() if k != "IFSQ_JAX_ONEDNN"}  # each test sets it itself
  return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                        env={**base, "IFSQ_JAX_CACHE": str(tmp_path / "cache"), **env})


def test_builds_into_the_cache_once_and_a_single_device_uses_it(tmp_path):
  code = ("import jax, jax.numpy as jnp; from ifsq_jax.kernels.cpu import onednn; from ifsq_jax.models import conv; "
          "print(onednn.usable()); "
          "print('ffi_call' in str(jax.make_jaxpr(conv.conv2d)(jnp.zeros((1, 8, 8, 4)), jnp.zeros((3, 3, 4, 8)))))")
  first = _in_subprocess(code, tmp_path)
  assert first.returncode == 0, first.stderr
  built = list((tmp_path / "cache").iterdir()) if (tmp_path / "cache").exists() else []
  if not _prerequisites_installed():  # "auto" falls back to XLA's convolutions, with one warning saying why
    assert first.stdout.split() == ["False", "False"] and "oneDNN convolutions are not available" in first.stderr
    return
  assert first.stdout.split() == ["True", "True"]
  assert len(built) == 1 and built[0].name.startswith("onednn_conv-") and built[0].suffix == ".so"
  mtime = built[0].stat().st_mtime_ns
  second = _in_subprocess(code, tmp_path)
  assert second.returncode == 0 and second.stdout == first.stdout
  assert built[0].stat().st_mtime_ns == mtime  # not rebuilt


def test_without_a_compiler_or_when_turned_off_xla_convolutions_run(tmp_path):
  code = ("import jax.numpy as jnp; from ifsq_jax.kernels.cpu import onednn; from ifsq_jax.models import conv; "
          "print(onednn.usable()); print(float(conv.conv2d(jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 2, 1))).sum())); "
          "conv.conv2d(jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 2, 1)), impl='onednn')")
  no_compiler = _in_subprocess(code, tmp_path, CXX="/nonexistent/c++")
  assert no_compiler.returncode == 1
  assert no_compiler.stdout.split() == ["False", "200.0"]  # 4 corners of 8, 8 edges of 12, 4 inside of 18
  assert "oneDNN convolutions are not available" in no_compiler.stderr and "/nonexistent/c++" in no_compiler.stderr
  assert "RuntimeError: conv impl='onednn': oneDNN convolutions are not available here" in no_compiler.stderr
  assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())
  off = _in_subprocess(code, tmp_path, IFSQ_JAX_ONEDNN="0")
  assert off.returncode == 1 and off.stdout.split() == ["False", "200.0"]
  assert "not available here (turned off with IFSQ_JAX_ONEDNN=0)" in off.stderr


def test_on_a_processor_without_bfloat16_convolutions_they_run_as_xla_and_float32_ones_on_onednn(tmp_path):
  """oneDNN limited to AVX2 (as the 2-core AMD EPYC hosts): the real probe refuses bfloat16, accepts float32."""
  code = ("import jax, jax.numpy as jnp; from ifsq_jax.models import conv\n"
          "jaxpr = lambda dt: str(jax.make_jaxpr(jax.grad(lambda k, x: jnp.sum(conv.conv2d(x, k).astype(jnp.float32))))"
          "(jnp.ones((3, 3, 4, 8), dt), jnp.ones((2, 8, 8, 4), dt)))\n"
          "print('ffi_call' in jaxpr(jnp.bfloat16), 'ffi_call' in jaxpr(jnp.float32))\n"
          "y = jax.jit(conv.conv2d)(jnp.ones((1, 4, 4, 2), jnp.bfloat16), jnp.ones((3, 3, 2, 1), jnp.bfloat16))\n"
          "print(float(y.astype(jnp.float32).sum()))")
  proc = _in_subprocess(code, tmp_path, ONEDNN_MAX_CPU_ISA="AVX2", IFSQ_JAX_CACHE=str(onednn.cache_dir()))
  assert proc.returncode == 0, proc.stderr[-3000:]
  if not _prerequisites_installed():
    assert proc.stdout.split() == ["False", "False", "200.0"]
    return
  assert proc.stdout.split() == ["False", "True", "200.0"]
  assert proc.stderr.count("oneDNN cannot build bfloat16 convolutions on this processor") == 1


def test_a_batch_sharded_over_devices_gives_xla_results():
  """impl="onednn" on several devices: XLA gathers the foreign call's operands; slower, but the same numbers."""
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  x = jax.device_put(jax.random.normal(jax.random.key(0), (16, 8, 8, 4)),
                     jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
  k = jax.random.normal(jax.random.key(1), (3, 3, 4, 8))
  if not _onednn_or_assert_fallback(x, k, 1, ((1, 1), (1, 1))):
    return

  def run(impl):
    loss = lambda k, x: jnp.sum(jnp.sin(conv.conv2d(x, k, impl=impl)))
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(k, x)

  for a, b in zip(jax.tree.leaves(run("onednn")), jax.tree.leaves(run("xla"))):
    _close(a, b, 1e-5)

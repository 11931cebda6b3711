"""oneDNN convolutions through the XLA FFI: XLA's results and gradients, routing, build, cache and fallback."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import subprocess_env
from ifsq_jax.models import conv, onednn
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


def test_loads_here():
  assert onednn.load(), "oneDNN must build and load where the project's dependencies are installed"


@pytest.mark.parametrize("x_shape,k_shape,stride,pads", CASES)
def test_three_passes_match_xla(x_shape, k_shape, stride, pads):
  x, k, dy = _operands(x_shape, k_shape, stride, pads)
  y, pullback = jax.vjp(lambda x, k: _xla(x, k, stride, pads), x, k)
  dx, dk = pullback(dy)
  _close(jax.jit(lambda x, k: onednn.conv(x, k, stride, pads))(x, k), y, 1e-5)
  _close(jax.jit(lambda dy, k: onednn.input_grad(dy, k, x.shape, stride, pads))(dy, k), dx, 1e-5)
  got = jax.jit(lambda x, dy: onednn.kernel_grad(x, dy, k.shape, stride, pads))(x, dy)
  assert got.dtype == jnp.float32
  _close(got, dk, 1e-5)


@pytest.mark.parametrize("x_shape,k_shape,stride,pads", CASES[:3])
def test_bfloat16_passes_match_xla_in_float32(x_shape, k_shape, stride, pads):
  x, k, dy = _operands(x_shape, k_shape, stride, pads, jnp.bfloat16)
  f32 = lambda a: a.astype(jnp.float32)
  y, pullback = jax.vjp(lambda x, k: _xla(x, k, stride, pads), f32(x), f32(k))
  dx, dk = pullback(f32(dy))
  got = onednn.conv(x, k, stride, pads)
  assert got.dtype == jnp.bfloat16
  _close(got, y, 1e-2)  # bf16 outputs: 8 mantissa bits
  _close(onednn.input_grad(dy, k, x.shape, stride, pads), dx, 1e-2)
  _close(onednn.kernel_grad(x, dy, k.shape, stride, pads), dk, 1e-4)  # float32 accumulation and result


@pytest.mark.parametrize("x_shape,k_shape,stride,pads", CASES[:4])
def test_gradients_of_every_pass_to_second_order_match_xla(x_shape, k_shape, stride, pads):
  x, k, dy = _operands(x_shape, k_shape, stride, pads)

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


def test_routing_follows_devices_and_forced():
  grad = lambda *a: jax.grad(lambda k, x: jnp.sum(conv.conv2d(x, k)))(*a)  # a new function: traced anew
  args = jnp.zeros((3, 3, 4, 8)), jnp.zeros((1, 8, 8, 4))
  assert jax.local_device_count() == 8 and not onednn.usable()  # the suite's 8 simulated devices: XLA's convolutions
  jaxpr = str(jax.make_jaxpr(lambda *a: grad(*a))(*args))
  assert "ffi_call" not in jaxpr and "conv_general_dilated" in jaxpr
  with onednn.forced(True):
    assert onednn.usable()
    jaxpr = str(jax.make_jaxpr(lambda *a: grad(*a))(*args))
  assert "conv_general_dilated" not in jaxpr
  for target in ("ifsq_conv_forward", "ifsq_conv_backward_weights"):
    assert target in jaxpr
  with onednn.forced(True):  # other dtypes stay on XLA
    assert "ffi_call" not in str(jax.make_jaxpr(lambda *a: grad(*a))(*(a.astype(jnp.float16) for a in args)))


def test_tokenizer_gradients_with_onednn_match_xla():
  cfg = TokenizerConfig(hidden_size=32, hidden_size_mult=(1, 2), num_res_blocks=1, downsample=(True, False),
                        upsample=(False, True), levels=(5, 5, 5, 5), resolution=16)
  model = Tokenizer(cfg)
  x = jax.random.uniform(jax.random.key(0), (2, 16, 16, 3), minval=-1, maxval=1)
  params = model.init(jax.random.key(1), x)["params"]
  loss = lambda p: jnp.mean(jnp.abs(model.apply({"params": p}, x)[0] - x))
  with onednn.forced(True):
    got, got_grads = jax.jit(jax.value_and_grad(loss))(params)
  with onednn.forced(False):
    want, want_grads = jax.jit(jax.value_and_grad(loss))(params)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(want_grads))
  for a, b in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5 * scale)


def _in_subprocess(code, tmp_path, **env):
  return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                        env={**subprocess_env(1), "IFSQ_JAX_CACHE": str(tmp_path / "cache"), **env})


def test_builds_into_the_cache_once_and_a_single_device_uses_it(tmp_path):
  code = ("import jax, jax.numpy as jnp; from ifsq_jax.models import conv, onednn; "
          "print(onednn.usable(), onednn.build().name); "
          "print('ffi_call' in str(jax.make_jaxpr(conv.conv2d)(jnp.zeros((1, 8, 8, 4)), jnp.zeros((3, 3, 4, 8)))))")
  first = _in_subprocess(code, tmp_path)
  assert first.returncode == 0, first.stderr
  usable, name = first.stdout.split("\n")[0].split()
  assert usable == "True" and first.stdout.split("\n")[1] == "True"
  built = list((tmp_path / "cache").iterdir())
  assert [p.name for p in built] == [name]
  mtime = built[0].stat().st_mtime_ns
  second = _in_subprocess(code, tmp_path)
  assert second.returncode == 0 and second.stdout == first.stdout
  assert built[0].stat().st_mtime_ns == mtime  # not rebuilt


def test_without_a_compiler_or_when_turned_off_xla_convolutions_run(tmp_path):
  code = ("import jax.numpy as jnp; from ifsq_jax.models import conv, onednn; print(onednn.usable()); "
          "print(float(conv.conv2d(jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 2, 1))).sum()))")
  no_compiler = _in_subprocess(code, tmp_path, CXX="/nonexistent/c++")
  assert no_compiler.returncode == 0, no_compiler.stderr
  assert no_compiler.stdout.split() == ["False", "200.0"]  # 4 corners of 8, 8 edges of 12, 4 inside of 18
  assert "oneDNN convolutions are not available" in no_compiler.stderr and "/nonexistent/c++" in no_compiler.stderr
  assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())
  off = _in_subprocess(code, tmp_path, IFSQ_JAX_ONEDNN="0")
  assert off.returncode == 0 and off.stdout.split() == ["False", "200.0"]


def test_a_batch_sharded_over_devices_gives_xla_results():
  """Forced on several devices, XLA gathers the foreign call's operands: slower, but the same numbers."""
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  x = jax.device_put(jax.random.normal(jax.random.key(0), (16, 8, 8, 4)),
                     jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
  k = jax.random.normal(jax.random.key(1), (3, 3, 4, 8))

  def run():
    return jax.jit(jax.value_and_grad(lambda k, x: jnp.sum(jnp.sin(conv.conv2d(x, k))), argnums=(0, 1)))(k, x)

  with onednn.forced(True):
    got = run()
  with onednn.forced(False):
    want = run()
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    _close(a, b, 1e-5)

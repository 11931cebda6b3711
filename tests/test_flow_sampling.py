"""Flow samplers: closed forms, convergence orders, guidance (the reference's quirk included), SDE marginals,
one compiled loop, and the same samples on 1 or 8 devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import GOLDEN
from ifsq_jax import parallel
from ifsq_jax.sampling import flow


def nhwc(a):
  return np.transpose(a, (0, 2, 3, 1))


def never_at_one(v, t):
  """NaN if the model is ever called at t = 1 (the final state would be NaN)."""
  return jnp.where(t[:, None, None, None] >= 1.0, jnp.nan, v)


def gaussian_velocity(m, s):
  """Exact v(x, t) = E[x1 - x0 | x_t = x] for data N(m, s^2) per element and noise N(0, 1)."""

  def fn(x, t, y):
    del y
    t = t[:, None, None, None]
    var = t**2 * s**2 + (1 - t) ** 2
    return never_at_one(m + (t * s**2 - (1 - t)) / var * (x - t * m), t[:, 0, 0, 0])

  return fn


LABELS8 = jnp.arange(8, dtype=jnp.int32)


def test_time_grid_is_linspace_remapped_by_the_shift():
  np.testing.assert_array_equal(flow.time_grid(4), np.array([0, 0.25, 0.5, 0.75, 1], np.float32))
  t = np.linspace(0, 1, 11)
  np.testing.assert_allclose(flow.time_grid(10, shift=3.0), 3 * t / (1 + 2 * t), rtol=1e-7)
  g = flow.time_grid(250, shift=0.5)
  assert g.dtype == np.float32 and g.shape == (251,) and g[0] == 0 and g[-1] == 1 and np.all(np.diff(g) > 0)
  for bad in [dict(num_steps=0), dict(num_steps=2.5), dict(num_steps=4, shift=-1.0)]:
    with pytest.raises(ValueError):
      flow.time_grid(**bad)


def test_euler_on_a_linear_field_matches_its_closed_form():
  a, b, n = -0.7, 0.3, 10
  x0 = np.linspace(-2, 2, 8, dtype=np.float32).reshape(8, 1, 1, 1)
  fn = lambda x, t, y: never_at_one(a * x + b, t)
  out = jax.jit(lambda x: flow.sample(fn, x, LABELS8, num_steps=n))(x0)
  g = (1 + a / n) ** n  # x_{k+1} = (1 + a h) x_k + b h
  np.testing.assert_allclose(out, g * x0 + b / a * (g - 1), atol=2e-6)


@pytest.mark.parametrize("method, shift", [("euler", 0.0), ("euler", 3.0), ("heun", 0.3)])
def test_straight_path_to_one_point_is_integrated_exactly(method, shift):
  """With data a single point c the flow is a straight line, which Euler and Heun follow exactly."""
  c = 1.25
  x0 = np.asarray(jax.random.normal(jax.random.key(0), (8, 2, 2, 3)))
  fn = lambda x, t, y: never_at_one((c - x) / (1 - t[:, None, None, None]), t)
  out = jax.jit(lambda x: flow.sample(fn, x, LABELS8, num_steps=7, method=method, shift=shift))(x0)
  np.testing.assert_allclose(out, np.full_like(x0, c), atol=2e-5)


def convergence_ratios(method):
  """Error ratios at N = 16, 32, 64 on dx/dt = -(1 + t) x^2, whose solution is 1 / (1 / x0 + t + t^2 / 2)."""
  x0 = np.linspace(0.5, 2, 8, dtype=np.float32).reshape(8, 1, 1, 1)
  fn = lambda x, t, y: never_at_one(-(1 + t[:, None, None, None]) * x * x, t)
  exact = 1 / (1 / x0.astype(np.float64) + 1.5)
  errs = [np.abs(np.asarray(jax.jit(lambda x: flow.sample(fn, x, LABELS8, num_steps=n, method=method))(x0)) - exact)
          .max() for n in (16, 32, 64)]
  return errs, [errs[0] / errs[1], errs[1] / errs[2]]


def test_euler_converges_at_first_order_and_heun_at_second():
  euler_errs, euler = convergence_ratios("euler")
  heun_errs, heun = convergence_ratios("heun")
  assert all(1.8 < r < 2.2 for r in euler), euler
  assert all(3.5 < r < 4.6 for r in heun), heun  # the Euler step into t = 1 keeps the order
  assert heun_errs[-1] < euler_errs[-1] / 100


def label_velocity(x, t, y):
  """A velocity that depends on the label (null = 10): v = x * 0.1 + (y + 1)."""
  return 0.1 * x + (y.astype(jnp.float32) + 1)[:, None, None, None] + 0 * t[:, None, None, None]


def test_cfg_scale_one_is_the_unguided_sampler_exactly():
  x0 = jax.random.normal(jax.random.key(1), (8, 4, 4, 4))
  shapes = []

  def fn(x, t, y):
    shapes.append(x.shape)
    return label_velocity(x, t, y)

  plain = jax.jit(lambda x: flow.sample(fn, x, LABELS8, num_steps=5))(x0)
  one = jax.jit(lambda x: flow.sample(fn, x, LABELS8, num_steps=5, cfg_scale=1.0, null_label=10))(x0)
  np.testing.assert_array_equal(plain, one)
  assert shapes == [(8, 4, 4, 4)] * 2  # one call per trace on the plain batch: no doubled batch


def test_guidance_is_v_u_plus_s_times_v_c_minus_v_u_on_every_channel():
  x = jax.random.normal(jax.random.key(2), (8, 4, 4, 4))
  t = jnp.full((8,), 0.3)
  v = flow.guided_velocity(label_velocity, x, t, LABELS8, cfg_scale=4.0, null_label=10)
  v_c, v_u = label_velocity(x, t, LABELS8), label_velocity(x, t, jnp.full((8,), 10))
  np.testing.assert_allclose(v, v_u + 4.0 * (v_c - v_u), atol=1e-5)


@pytest.fixture(scope="module")
def cfg_golden():
  g = np.load(GOLDEN / "dit_small.npz")
  return {k[len("cfg/"):]: nhwc(g[k]) if g[k].ndim == 4 else g[k] for k in g.files if k.startswith("cfg/")}


def test_three_channel_quirk_reproduces_the_reference_forward_with_cfg(cfg_golden):
  """``cfg/out`` rows 0..1 (the kept half) from the stored raw forward ``cfg/model_out``."""
  g = cfg_golden
  x = g["x"][:2]  # forward_with_cfg duplicates the first half and ignores the rest
  y = g["y"][:2]

  def fake_model(xx, tt, yy):
    np.testing.assert_array_equal(xx, np.concatenate([x, x]))
    np.testing.assert_array_equal(yy, g["y"])  # [3, 7 | 10, 10]
    np.testing.assert_allclose(tt, g["t"])
    return jnp.asarray(g["model_out"])

  v = flow.guided_velocity(fake_model, x, g["t"][:2], y, cfg_scale=4.0, null_label=10, cfg_channels=3)
  np.testing.assert_allclose(v, g["out"][:2], atol=1e-6, rtol=0)
  full = flow.guided_velocity(fake_model, x, g["t"][:2], y, cfg_scale=4.0, null_label=10)
  np.testing.assert_allclose(full[..., :3], g["out"][:2, ..., :3], atol=1e-6, rtol=0)
  assert np.abs(np.asarray(full[..., 3]) - g["out"][:2, ..., 3]).max() > 1e-2  # all-channel guidance differs

  # Through the sampler: one Euler step of size 1 from x.
  fake_any_t = lambda xx, tt, yy: jnp.asarray(g["model_out"]) + 0 * xx
  out = flow.sample(fake_any_t, x, y, num_steps=1, cfg_scale=4.0, null_label=10, cfg_channels=3)
  np.testing.assert_allclose(out, x + g["out"][:2], atol=1e-6, rtol=0)


def test_guidance_interval_uses_the_conditional_prediction_outside_it():
  """v is constant in x here, so the result is noise + sum_i h (guided or conditional v at t_i)."""
  x0 = np.zeros((8, 2, 2, 1), np.float32)
  fn = lambda x, t, y: (y.astype(jnp.float32) + 1)[:, None, None, None] + 0 * x + 0 * t[:, None, None, None]
  s, null = 3.0, 10
  v_c = (np.arange(8) + 1.0)[:, None, None, None]
  v_g = (null + 1) + s * (v_c - (null + 1))
  # grid 0, .25, .5, .75: steps at t = 0, 0.25 outside [0.5, 1], at 0.5, 0.75 inside (inclusive)
  out = jax.jit(lambda x: flow.sample(fn, x, LABELS8, num_steps=4, cfg_scale=s, null_label=null,
                                      cfg_interval=(0.5, 1.0)))(x0)
  np.testing.assert_allclose(out, 0.5 * v_c + 0.5 * v_g + 0 * x0, rtol=1e-6)
  always = flow.sample(fn, x0, LABELS8, num_steps=4, cfg_scale=s, null_label=null)
  np.testing.assert_allclose(always, v_g + 0 * x0, rtol=1e-6)


@pytest.mark.parametrize("method, last_step", [("euler", "mean"), ("heun", "euler"), ("euler", "none")])
def test_sde_samples_a_gaussian_with_the_right_mean_and_std(method, last_step):
  m, s = 1.5, 0.5
  noise = jax.random.normal(jax.random.key(3), (16, 8, 8, 4))  # 4096 samples
  labels = jnp.zeros(16, jnp.int32)
  run = jax.jit(lambda x, k: flow.sample(gaussian_velocity(m, s), x, labels, num_steps=100, mode="sde", key=k,
                                         method=method, last_step=last_step))
  out = np.asarray(run(noise, jax.random.key(4)))
  assert abs(out.mean() - m) < 0.025 and abs(out.std() - s) < 0.02, (out.mean(), out.std())
  # The noise is fresh: a different key gives different samples with the same law.
  other = np.asarray(run(noise, jax.random.key(5)))
  assert np.abs(other - out).mean() > 0.05
  assert abs(other.mean() - m) < 0.025 and abs(other.std() - s) < 0.02


def test_ode_maps_noise_to_the_gaussian_deterministically():
  m, s = -0.5, 2.0
  noise = jax.random.normal(jax.random.key(6), (16, 8, 8, 4))
  out = np.asarray(jax.jit(lambda x: flow.sample(gaussian_velocity(m, s), x, jnp.zeros(16, jnp.int32),
                                                 num_steps=32, method="heun"))(noise))
  # The exact flow is the affine map x0 -> m + s x0.
  np.testing.assert_allclose(out, m + s * np.asarray(noise), atol=5e-3)


def count_loops(jaxpr):
  return sum(e.primitive.name in ("while", "scan") for e in jaxpr.jaxpr.eqns)


@pytest.mark.parametrize("kwargs, calls", [
    (dict(), 1),
    (dict(method="heun"), 3),  # predictor + corrector in the loop, the final Euler step after it
    (dict(mode="sde", key=jax.random.key(0), cfg_scale=2.0, null_label=10), 2),  # loop + last step
])
def test_whole_time_loop_is_one_compiled_loop(kwargs, calls):
  traced = []

  def fn(x, t, y):
    traced.append(x.shape)  # runs at trace time only
    return label_velocity(x, t, y)

  x0 = jnp.ones((8, 2, 2, 4))
  jitted = jax.jit(lambda x: flow.sample(fn, x, LABELS8, num_steps=50, **kwargs))
  jitted(x0).block_until_ready()
  jitted(x0 + 1).block_until_ready()
  assert len(traced) == calls  # 50 steps, traced once, run twice without retracing
  assert count_loops(jax.make_jaxpr(lambda x: flow.sample(fn, x, LABELS8, num_steps=50, **kwargs))(x0)) == 1


def test_batch_sharded_over_eight_devices_gives_the_one_device_samples():
  assert jax.device_count() == 8
  noise = jax.random.normal(jax.random.key(7), (16, 4, 4, 4))
  labels = jnp.arange(16, dtype=jnp.int32) % 10
  key = jax.random.key(8)
  kwargs = dict(num_steps=12, mode="sde", method="heun", cfg_scale=2.5, null_label=10, cfg_interval=(0.2, 0.9))
  fn = lambda x, t, y: label_velocity(x, t, y) * jnp.cos(t)[:, None, None, None]
  run = lambda x, y, k: flow.sample(fn, x, y, key=k, **kwargs)

  one = jax.jit(run)(jax.device_put(noise, jax.devices()[0]), labels, key)
  mesh = parallel.make_mesh(data=-1)
  with parallel.sharding_context(mesh, parallel.DEFAULT_RULES):
    x = jax.device_put(noise, parallel.batch_sharding(mesh, 4))
    y = jax.device_put(labels, parallel.batch_sharding(mesh, 1))
    eight = jax.jit(run, out_shardings=parallel.batch_sharding(mesh, 4))(x, y, key)
  assert len(eight.sharding.device_set) == 8
  np.testing.assert_allclose(eight, one, atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    (dict(method="rk4"), "method"),
    (dict(mode="probability"), "mode"),
    (dict(num_steps=0), "num_steps"),
    (dict(mode="sde", num_steps=1, key=jax.random.key(0)), "num_steps"),
    (dict(mode="sde"), "key"),
    (dict(cfg_scale=2.0), "null_label"),
    (dict(cfg_scale=2.0, null_label=10, cfg_channels=5), "cfg_channels"),
    (dict(cfg_interval=(0.6, 0.4)), "cfg_interval"),
    (dict(mode="sde", key=jax.random.key(0), sde_diffusion="SBDM"), "sde_diffusion"),
    (dict(mode="sde", key=jax.random.key(0), last_step="tweedie"), "last_step"),
    (dict(mode="sde", key=jax.random.key(0), last_step_size=1.0), "last_step_size"),
    (dict(shift=-2.0), "shift"),
])
def test_bad_options_raise_value_errors(kwargs, match):
  kwargs = dict(num_steps=4) | kwargs
  with pytest.raises(ValueError, match=match):
    flow.sample(label_velocity, jnp.zeros((8, 2, 2, 4)), LABELS8, **kwargs)


def test_to_uint8_truncates_127_5_x_plus_128():
  x = np.array([-1.0, -0.99, 0.0, 0.5, 1.0, 2.0, -3.0], np.float32)
  np.testing.assert_array_equal(flow.to_uint8(x), np.array([0, 1, 128, 191, 255, 255, 0], np.uint8))

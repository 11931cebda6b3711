"""The flow-matching objective against the official transport's golden outputs (tests/golden/README.md, section 4)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import GOLDEN
from ifsq_jax.objectives import transport


def nhwc(a):
  return np.transpose(a, (0, 2, 3, 1))


@pytest.fixture(scope="module")
def golden():
  g = np.load(GOLDEN / "dit_small.npz")
  return {k[len("transport/"):]: g[k] for k in g.files if k.startswith("transport/")} | {"zs0": g["zs0"]}


def torch_repa(pred, target):
  """The reference's REPA term, written with torch's F.normalize (eps 1e-12)."""
  z, zt = F.normalize(torch.tensor(target), dim=-1), F.normalize(torch.tensor(pred), dim=-1)
  return float(-(z * zt).sum(-1).mean())


def test_interpolate_matches_reference_path(golden):
  xt, ut = transport.interpolate(nhwc(golden["x0"]), nhwc(golden["x1"]), golden["t"])
  np.testing.assert_allclose(xt, nhwc(golden["xt"]), atol=1e-6, rtol=0)
  np.testing.assert_allclose(ut, nhwc(golden["ut"]), atol=1e-6, rtol=0)


def test_per_sample_mse_and_cosine_match_reference(golden):
  pred, ut = nhwc(golden["pred"]), nhwc(golden["ut"])
  np.testing.assert_allclose(transport.mse(pred, ut), golden["mse"], atol=1e-5, rtol=0)
  np.testing.assert_allclose(transport.cosine_loss(pred, ut), golden["cos_loss"], atol=1e-5, rtol=0)


def test_loss_with_stored_prediction_matches_reference_total(golden):
  """The model's prediction is the stored one, so everything but the model is checked.

  The golden REPA term uses the projector output for x_t, which is not stored; the
  stored ``zs0`` (the projector output for other inputs) stands in, and its REPA term
  comes from torch. Without it, loss + 0.5 proj_loss(golden) must give the golden total.
  """
  seen = {}

  def velocity_fn(x, t, y):
    seen.update(x=x, t=t, y=y)
    return jnp.asarray(nhwc(golden["pred"])), jnp.asarray(golden["zs0"])

  x0, x1, t, y = nhwc(golden["x0"]), nhwc(golden["x1"]), golden["t"], golden["y"]
  loss, terms = transport.flow_matching_terms(velocity_fn, x0, x1, t, y, repa_target=golden["zs_target"])
  np.testing.assert_allclose(seen["x"], nhwc(golden["xt"]), atol=1e-6, rtol=0)
  np.testing.assert_array_equal(seen["t"], t)
  np.testing.assert_array_equal(seen["y"], y)
  proj = torch_repa(golden["zs0"], golden["zs_target"])
  assert abs(float(terms["proj"]) - proj) < 1e-6
  assert abs(float(terms["mse"]) - golden["mse"].mean()) < 1e-5
  assert abs(float(terms["cos"]) - golden["cos_loss"].mean()) < 1e-5
  assert abs(float(loss) - (golden["mse"].mean() + golden["cos_loss"].mean() + 0.5 * proj)) < 1e-5
  assert loss.dtype == jnp.float32

  plain = lambda x, t, y: jnp.asarray(nhwc(golden["pred"]))
  loss_no_repa, terms = transport.flow_matching_terms(plain, x0, x1, t, y)
  assert float(terms["proj"]) == 0.0
  total = float(loss_no_repa) + 0.5 * float(golden["proj_loss"])
  assert abs(total - float(golden["total_loss"])) < 1e-5


def test_repa_loss_is_torch_normalize_cosine_including_tiny_vectors():
  rng = np.random.default_rng(0)
  pred = rng.normal(size=(2, 5, 8)).astype(np.float32)
  target = rng.normal(size=(2, 5, 8)).astype(np.float32)
  pred[0, 0] = 1e-14  # below F.normalize's eps: the norm is clamped, not divided by
  np.testing.assert_allclose(transport.repa_loss(pred, target), torch_repa(pred, target), atol=1e-7)
  # bfloat16 features are normalised in float32.
  bf = transport.repa_loss(jnp.asarray(pred, jnp.bfloat16), jnp.asarray(target, jnp.bfloat16))
  assert bf.dtype == jnp.float32


def test_cosine_loss_clamps_each_norm_like_torch():
  a = np.array([[[[1e-9, 0.0]], [[3.0, 4.0]]]], np.float32)  # (1, 2, 1, 2)
  b = np.array([[[[1e-9, 0.0]], [[1.0, 0.0]]]], np.float32)
  ref = 1 - F.cosine_similarity(torch.tensor(a), torch.tensor(b), dim=-1, eps=1e-8).mean()
  np.testing.assert_allclose(transport.cosine_loss(a, b), [float(ref)], atol=1e-7)


def test_logit_normal_time_has_the_right_logit_moments():
  t = transport.sample_time(jax.random.key(0), (100_000,), "lognorm", mu=0.3, sigma=1.5)
  logit = np.log(t) - np.log1p(-t)
  assert abs(logit.mean() - 0.3) < 0.02 and abs(logit.std() - 1.5) < 0.02
  t = np.asarray(transport.sample_time(jax.random.key(0), (100_000,)))
  logit = np.log(t) - np.log1p(-t)
  assert abs(logit.mean()) < 0.02 and abs(logit.std() - 1.0) < 0.02


def test_uniform_time_covers_the_unit_interval():
  t = np.asarray(transport.sample_time(jax.random.key(1), (100_000,), "uniform"))
  assert t.dtype == np.float32 and t.min() >= 0.0 and t.max() < 1.0
  assert abs(t.mean() - 0.5) < 0.005 and t.min() < 1e-3 and t.max() > 1 - 1e-3


def test_shifted_time_is_the_sampler_shift_of_the_unshifted_draw():
  key = jax.random.key(2)
  t = transport.sample_time(key, (1000,), "uniform")
  ts = transport.sample_time(key, (1000,), "uniform", shift=3.0)
  np.testing.assert_allclose(ts, 3 * t / (1 + 2 * t), rtol=1e-6)
  assert float(jnp.median(ts)) > 0.7  # s > 1 moves t towards the data end (median 0.75)


@pytest.mark.parametrize("kwargs, match", [
    (dict(kind="beta"), "time kind"),
    (dict(sigma=0.0), "sigma"),
    (dict(shift=0.0), "shift"),
])
def test_sample_time_rejects_bad_options(kwargs, match):
  with pytest.raises(ValueError, match=match):
    transport.sample_time(jax.random.key(0), (4,), **kwargs)


def test_loss_is_zero_for_the_exact_velocity_and_aligned_features():
  key = jax.random.key(3)
  x1 = jax.random.normal(jax.random.key(4), (4, 4, 4, 3))
  target = jax.random.normal(jax.random.key(5), (4, 16, 8))
  # The same draws as the loss makes: t from the first half of the split, x0 from the second.
  key_t, key_x0 = jax.random.split(key)
  x0 = jax.random.normal(key_x0, x1.shape)

  def exact(x, t, y):
    return x1 - x0, 2.0 * target  # the cosine ignores the scale

  loss, terms = transport.flow_matching_loss(exact, key, x1, jnp.zeros(4, jnp.int32), repa_target=target)
  assert abs(float(terms["mse"])) < 1e-10 and abs(float(terms["cos"])) < 1e-6
  assert abs(float(terms["proj"]) + 1.0) < 1e-6
  assert abs(float(loss) + 0.5) < 1e-6  # the REPA minimum is -proj_coef
  t = transport.sample_time(key_t, (4,))
  np.testing.assert_allclose(terms["t_mean"], jnp.mean(t), rtol=1e-6)


def test_loss_is_float32_and_differentiable_with_a_bfloat16_model():
  x1 = jax.random.normal(jax.random.key(6), (2, 4, 4, 3))
  y = jnp.zeros(2, jnp.int32)

  def loss(scale):
    fn = lambda x, t, y: (scale * x).astype(jnp.bfloat16)
    return transport.flow_matching_loss(fn, jax.random.key(7), x1, y, time_kind="uniform")[0]

  value, grad = jax.value_and_grad(loss)(1.0)
  assert value.dtype == jnp.float32 and np.isfinite(grad) and grad != 0


def test_missing_repa_features_is_an_error():
  x1 = jnp.zeros((2, 4, 4, 3))
  with pytest.raises(ValueError, match="REPA features"):
    transport.flow_matching_loss(lambda x, t, y: x, jax.random.key(0), x1, jnp.zeros(2, jnp.int32),
                                 repa_target=jnp.zeros((2, 16, 8)))


def test_gradients_are_finite_when_the_prediction_is_zero():
  """A DiT's final layer starts at zero: the cosine and REPA terms must still give finite gradients."""
  x1 = jnp.ones((2, 4, 4, 3))
  target = jnp.ones((2, 16, 8))

  def loss(w):
    def velocity(x, t, y):
      del t, y
      return x * w, jnp.zeros((2, 16, 8)) + w
    return transport.flow_matching_loss(velocity, jax.random.key(0), x1, jnp.zeros((2,), jnp.int32),
                                        repa_target=target)[0]

  g = jax.grad(loss)(jnp.float32(0.0))
  assert np.isfinite(float(g))

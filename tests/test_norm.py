"""GroupNorm with per-channel statistics: nn.GroupNorm's parameters, outputs and gradients."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ifsq_jax.models.norm import GroupNorm
from ifsq_jax.parallel import NORM


@pytest.mark.parametrize("shape,groups", [((2, 16, 16, 64), 32), ((3, 8, 12, 96), 32), ((2, 5, 7, 8), 4),
                                          ((4, 64), 8)])
def test_group_norm_matches_flax_in_init_output_and_gradients(shape, groups):
  # An offset mean and a spread of scales per channel, as in a trained network.
  x = 1.0 + jax.random.normal(jax.random.key(0), shape) * jnp.linspace(0.5, 2.0, shape[-1])
  ours, ref = GroupNorm(groups, 1e-6), nn.GroupNorm(num_groups=groups, epsilon=1e-6)
  p, q = nn.meta.unbox(ours.init(jax.random.key(1), x)), ref.init(jax.random.key(1), x)
  assert jax.tree.structure(p) == jax.tree.structure(q)
  for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(q)):
    np.testing.assert_array_equal(a, b)
  p = jax.tree.map(lambda v: v + 0.3 * jax.random.normal(jax.random.key(2), v.shape), p)
  np.testing.assert_allclose(ours.apply(p, x), ref.apply(p, x), rtol=1e-5, atol=1e-5)
  loss = lambda m: jax.grad(lambda p, x: jnp.sum(jnp.sin(2.0 * m.apply(p, x))), argnums=(0, 1))
  (gp, gx), (rp, rx) = loss(ours)(p, x), loss(ref)(p, x)
  np.testing.assert_allclose(gx, rx, rtol=1e-4, atol=1e-4)
  for a, b in zip(jax.tree.leaves(gp), jax.tree.leaves(rp)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_group_norm_is_at_least_as_accurate_as_flax_against_float64():
  # A large mean and small spreads: the one-pass variance E[x^2] - E[x]^2 of both layers loses digits.
  x = 3.0 + jax.random.normal(jax.random.key(0), (2, 16, 16, 64)) * jnp.linspace(0.1, 4.0, 64)
  p = nn.meta.unbox(GroupNorm(32).init(jax.random.key(1), x))
  p = jax.tree.map(lambda v: v + 0.3 * jax.random.normal(jax.random.key(2), v.shape), p)
  xd = np.asarray(x, np.float64).reshape(2, -1, 32, 2)
  mean, var = xd.mean(axis=(1, 3), keepdims=True), xd.var(axis=(1, 3), keepdims=True)
  exact = ((xd - mean) / np.sqrt(var + 1e-6)).reshape(x.shape) * np.asarray(p["params"]["scale"], np.float64)
  exact += np.asarray(p["params"]["bias"], np.float64)
  ours = np.abs(np.asarray(GroupNorm(32, 1e-6).apply(p, x)) - exact).max()
  flax = np.abs(np.asarray(nn.GroupNorm(32, epsilon=1e-6).apply(p, x)) - exact).max()
  assert ours <= max(flax, 1e-5) and ours < 5e-4


def test_group_norm_normalises_each_group_of_each_sample():
  x = jax.random.normal(jax.random.key(0), (3, 6, 6, 16)) * 5.0 + jnp.arange(16.0)
  y = GroupNorm(4).apply({"params": {"scale": jnp.ones(16), "bias": jnp.zeros(16)}}, x)
  groups = np.asarray(y).reshape(3, 36, 4, 4).transpose(0, 2, 1, 3).reshape(3, 4, -1)
  np.testing.assert_allclose(groups.mean(-1), 0.0, atol=1e-5)
  np.testing.assert_allclose(groups.std(-1), 1.0, atol=1e-4)


def test_bf16_compute_keeps_float32_statistics_and_returns_bf16():
  x = 2.0 + jax.random.normal(jax.random.key(0), (2, 8, 8, 64))
  ours, ref = GroupNorm(32, 1e-6, dtype=jnp.bfloat16), nn.GroupNorm(32, epsilon=1e-6, dtype=jnp.bfloat16)
  p = nn.meta.unbox(ours.init(jax.random.key(1), x))
  y, r = ours.apply(p, x.astype(jnp.bfloat16)), ref.apply(p, x.astype(jnp.bfloat16))
  assert y.dtype == r.dtype == jnp.bfloat16
  np.testing.assert_allclose(y.astype(jnp.float32), r.astype(jnp.float32), atol=0.02)


def test_channels_not_divisible_by_groups_are_refused():
  with pytest.raises(ValueError, match="num_groups=32"):
    GroupNorm(32).init(jax.random.key(0), jnp.zeros((1, 4, 4, 48)))


def test_scale_and_bias_carry_the_norm_axis_name():
  boxed = GroupNorm(4).init(jax.random.key(0), jnp.zeros((1, 4, 4, 8)))["params"]
  for name in ("scale", "bias"):
    assert isinstance(boxed[name], nn.LogicallyPartitioned) and boxed[name].names == (NORM,)

"""The CPU-fast convolution: nn.Conv's parameters and outputs, XLA's gradients."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ifsq_jax.models import conv


@pytest.mark.parametrize("size,channels,kernel", [(64, 32, 3), (64, 32, 4), (24, 32, 2), (8, 16, 3)])
def test_conv_matches_nn_conv_in_init_output_and_gradients(size, channels, kernel):
  x = jax.random.normal(jax.random.key(0), (2, size, size, 8))
  ours, ref = conv.Conv(channels, kernel), nn.Conv(channels, (kernel, kernel))
  p, q = ours.init(jax.random.key(1), x), ref.init(jax.random.key(1), x)
  assert jax.tree.structure(p) == jax.tree.structure(q)
  for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(q)):
    np.testing.assert_array_equal(a, b)
  p = jax.tree.map(lambda v: v + 0.01 * jax.random.normal(jax.random.key(2), v.shape), p)  # a non-zero bias
  np.testing.assert_allclose(ours.apply(p, x), ref.apply(p, x), rtol=1e-5, atol=1e-5)
  loss = lambda m: jax.grad(lambda p, x: jnp.sum(jnp.sin(m.apply(p, x))), argnums=(0, 1))
  (gp, gx), (rp, rx) = loss(ours)(p, x), loss(ref)(p, x)
  np.testing.assert_allclose(gx, rx, rtol=1e-4, atol=1e-4)
  for a, b in zip(jax.tree.leaves(gp), jax.tree.leaves(rp)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3 * float(jnp.max(jnp.abs(b))))


def test_large_maps_take_the_per_tap_gradient_and_small_ones_xla():
  big = jax.make_jaxpr(jax.grad(lambda k, x: jnp.sum(conv.conv_same(x, k))))(
      jnp.zeros((3, 3, 4, 32)), jnp.zeros((1, 64, 64, 4)))
  small = jax.make_jaxpr(jax.grad(lambda k, x: jnp.sum(conv.conv_same(x, k))))(
      jnp.zeros((3, 3, 4, 32)), jnp.zeros((1, 8, 8, 4)))
  assert "dot_general" in str(big) and "dot_general" not in str(small)  # the per-tap matmuls


def test_bf16_gradient_accumulates_in_float32():
  x = jax.random.normal(jax.random.key(0), (2, 64, 64, 8))
  m = conv.Conv(32, dtype=jnp.bfloat16)
  p = m.init(jax.random.key(1), x)
  g = jax.grad(lambda p: jnp.sum(m.apply(p, x).astype(jnp.float32) ** 2))(p)
  r = jax.grad(lambda p: jnp.sum(nn.Conv(32, (3, 3), dtype=jnp.bfloat16).apply(p, x).astype(jnp.float32) ** 2))(p)
  assert g["params"]["kernel"].dtype == jnp.float32
  np.testing.assert_allclose(g["params"]["kernel"], r["params"]["kernel"], rtol=0.05,
                             atol=0.02 * float(jnp.max(jnp.abs(r["params"]["kernel"]))))

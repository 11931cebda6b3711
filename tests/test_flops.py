"""FLOPs counted on the jaxpr: loops times their length, gradients and rematerialisation included."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ifsq_jax import flops


def test_a_matmul_counts_two_flops_per_multiply_add():
  x, w = jnp.ones((8, 16)), jnp.ones((16, 4))
  assert flops.count(jnp.matmul, x, w) == 2 * 8 * 16 * 4
  assert flops.count(jax.jit(lambda a, b: jnp.einsum("bk,kn->bn", a, b)), x, w) == 2 * 8 * 16 * 4


def test_scan_counts_its_body_length_times_and_cond_its_largest_branch():
  x, w = jnp.ones((8, 16)), jnp.ones((5, 16, 16))
  scanned = lambda x, w: jax.lax.scan(lambda h, wi: (h @ wi, None), x, w)[0]
  assert flops.count(scanned, x, w) == 5 * 2 * 8 * 16 * 16
  branch = lambda p, x: jax.lax.cond(p, lambda v: v @ v.T @ v, lambda v: v, x)
  assert flops.count(branch, True, x) == 2 * 8 * 16 * 8 + 2 * 8 * 8 * 16


def test_gradients_count_their_matmuls_and_remat_its_recomputation():
  x, w = jnp.ones((8, 16)), jnp.ones((16, 16))
  matmul = 2 * 8 * 16 * 16
  f = lambda w, x: jnp.sum(jnp.tanh(x @ w) @ w)
  # Forward 2; backward: dW of x @ w (x is not differentiated), dW and dh of h @ w.
  assert flops.count(jax.grad(f), w, x) == 5 * matmul
  g = lambda w, x: jnp.sum(jax.checkpoint(lambda w: jnp.tanh(x @ w))(w) @ w)
  assert flops.count(jax.value_and_grad(g), w, x) == 6 * matmul  # + x @ w recomputed in the backward pass


def test_convolutions_count_window_times_input_channels_per_output():
  module = nn.Conv(8, (3, 3), feature_group_count=2)
  x = np.ones((2, 10, 10, 4), np.float32)
  params = module.init(jax.random.key(0), x)
  assert flops.count(module.apply, params, x) == 2 * (2 * 10 * 10 * 8) * (3 * 3 * 2)

"""Agreement with vector-quantize-pytorch's FSQ, run side by side on the same inputs.

What is compared: that peer's ``FSQ.bound`` is the original FSQ bound
``tanh(z + atanh(offset / half_l)) * half_l - offset`` with ``eps = 1e-3`` (our
``bound="tanh"``), rounded half to even and divided by ``L // 2``; its indices are
mixed radix with channel 0 least significant. We compare the codes and indices of
its forward pass exactly, for odd and even level counts, and its gradient.

Two float implementations of tanh may round the last bit differently, which can
flip a value lying exactly on a rounding tie; inputs are therefore nudged at least
1e-4 level units away from ties (as the reference fixtures are), computed in float64.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import vector_quantize_pytorch as vqp

from ifsq_jax import FSQ


def _away_from_ties(z, levels, eps=1e-3, margin=1e-4):
  lv = np.asarray(levels, np.float64)
  half_l = (lv - 1) * (1 + eps) / 2
  offset = np.where(lv % 2 == 0, 0.5, 0.0)
  shift = np.arctanh(offset / half_l)
  z = z.astype(np.float64)
  for _ in range(100):
    b = np.tanh(z + shift) * half_l - offset
    near = np.abs(np.abs(b - np.floor(b)) - 0.5) < margin
    if not near.any():
      return z.astype(np.float32)
    z = np.where(near, z + 0.01, z)
  raise AssertionError("could not move inputs away from ties")


@pytest.mark.parametrize("levels", [(8, 5, 5, 5), (8, 8, 8, 5, 5, 5), (7, 5, 5, 5, 5), (6, 6, 3), (17, 17, 17, 17)])
def test_codes_and_indices_equal_vector_quantize_pytorch(levels):
  rng = np.random.default_rng(sum(levels))
  z = rng.standard_normal((4, 512, len(levels))) * rng.choice([0.25, 1.0, 3.0], size=(4, 512, len(levels)))
  z = _away_from_ties(z, levels)

  peer = vqp.FSQ(levels=list(levels))
  zt = torch.tensor(z, requires_grad=True)
  out, idx = peer(zt)
  w = rng.standard_normal(z.shape).astype(np.float32)
  (out * torch.tensor(w)).sum().backward()

  fsq = FSQ(levels, bound="tanh")
  codes = jax.jit(fsq.quantize)(z)
  np.testing.assert_array_equal(np.asarray(codes), out.detach().numpy())
  np.testing.assert_array_equal(np.asarray(fsq.codes_to_indices(codes)), idx.numpy())
  grad = jax.grad(lambda z: jnp.sum(w * fsq.quantize(z)))(z)
  np.testing.assert_allclose(np.asarray(grad), zt.grad.numpy(), rtol=0, atol=2e-6)
  # The peer's own inverse agrees with ours over its whole codebook.
  all_idx = np.arange(fsq.codebook_size)
  np.testing.assert_array_equal(
      np.asarray(fsq.indices_to_codes(all_idx)), peer.indices_to_codes(torch.tensor(all_idx)).numpy())

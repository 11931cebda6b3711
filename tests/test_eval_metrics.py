"""PSNR / SSIM against scikit-image, Frechet distance and streaming statistics, CKNNA against the reference."""

import numpy as np
import pytest
import scipy.linalg
import skimage.data
import skimage.metrics

from conftest import GOLDEN
from ifsq_jax import eval as ev


def _pairs():
  rng = np.random.default_rng(0)
  noise = rng.uniform(0, 1, (3, 40, 48, 3)).astype(np.float32)
  photo = skimage.data.astronaut()[100:164, 200:264].astype(np.float32) / 255.0
  photos = np.stack([photo, photo[::-1], photo[:, ::-1]])
  noisy = np.clip(photos + rng.normal(0, 0.05, photos.shape), 0, 1).astype(np.float32)
  blurred = (photos + np.roll(photos, 1, axis=1) + np.roll(photos, 1, axis=2)) / 3
  return [(noise, rng.uniform(0, 1, noise.shape).astype(np.float32)), (photos, noisy), (photos, blurred)]


@pytest.mark.parametrize("case", range(3))
def test_psnr_and_ssim_match_skimage(case):
  a, b = _pairs()[case]
  p, s = np.asarray(ev.psnr(a, b, data_range=1.0)), np.asarray(ev.ssim(a, b, data_range=1.0))
  assert p.shape == s.shape == (a.shape[0],)
  for i in range(a.shape[0]):
    np.testing.assert_allclose(p[i], skimage.metrics.peak_signal_noise_ratio(a[i], b[i], data_range=1.0), rtol=1e-5)
    ref = skimage.metrics.structural_similarity(a[i].astype(np.float64), b[i].astype(np.float64), data_range=1.0,
                                                channel_axis=-1)
    np.testing.assert_allclose(s[i], ref, atol=2e-5)


def test_ssim_of_identical_images_is_one_and_data_range_matters():
  a = _pairs()[1][0]
  np.testing.assert_allclose(np.asarray(ev.ssim(a, a)), 1.0, atol=1e-6)
  b, n = a * 2 - 1, _pairs()[1][1] * 2 - 1  # the same images on [-1, 1]
  ours = np.asarray(ev.ssim(b, n, data_range=2.0))
  for i in range(len(b)):
    ref = skimage.metrics.structural_similarity(b[i].astype(np.float64), n[i].astype(np.float64), data_range=2.0,
                                                channel_axis=-1)
    np.testing.assert_allclose(ours[i], ref, atol=2e-5)
  with pytest.raises(ValueError, match="same shape"):
    ev.psnr(a, a[:, :10])


def test_frechet_distance_matches_direct_scipy_and_the_1d_closed_form():
  rng = np.random.default_rng(1)
  x, y = rng.normal(size=(500, 16)), rng.normal(0.3, 1.5, size=(400, 16)) @ rng.normal(size=(16, 16)) * 0.3
  mu1, s1, mu2, s2 = x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False)
  root = scipy.linalg.sqrtm(s1 @ s2).real
  direct = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * root)
  np.testing.assert_allclose(ev.frechet_distance(mu1, s1, mu2, s2), direct, rtol=1e-8)
  assert abs(ev.frechet_distance(mu1, s1, mu1, s1)) < 1e-6
  np.testing.assert_allclose(ev.frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]), 4 + 4 + 9 - 2 * 6, rtol=1e-12)
  with pytest.raises(ValueError, match="mismatched"):
    ev.frechet_distance(mu1, s1, mu2[:3], s2[:3, :3])


def test_streaming_statistics_equal_the_in_memory_ones(tmp_path):
  rng = np.random.default_rng(2)
  feats = rng.normal(2.0, 3.0, size=(1000, 32)).astype(np.float32)
  stats = ev.FeatureStats(32)
  for chunk in np.array_split(feats, 7):
    stats.update(chunk)
  np.testing.assert_allclose(stats.mu, feats.astype(np.float64).mean(0), rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(stats.sigma, np.cov(feats.astype(np.float64), rowvar=False), rtol=1e-9, atol=1e-9)
  halves = ev.FeatureStats(32), ev.FeatureStats(32)
  halves[0].update(feats[:300])
  halves[1].update(feats[300:])
  np.testing.assert_allclose(halves[0].merge(halves[1]).sigma, stats.sigma, rtol=1e-9)
  stats.save(tmp_path / "ref.npz")
  mu, sigma = ev.load_stats(tmp_path / "ref.npz")
  np.testing.assert_array_equal(mu, stats.mu)
  np.save(tmp_path / "bad.npy", mu)
  np.savez(tmp_path / "bad.npz", m=mu)
  with pytest.raises(ValueError, match="holds 'mu' and 'sigma'"):
    ev.load_stats(tmp_path / "bad.npz")


def test_samples_npz_is_uint8_nhwc_arr_0(tmp_path):
  imgs = np.linspace(-1, 1, 2 * 4 * 4 * 3).reshape(2, 4, 4, 3)
  ev.save_samples_npz(tmp_path / "s.npz", imgs)
  with np.load(tmp_path / "s.npz") as f:
    assert f.files == ["arr_0"] and f["arr_0"].dtype == np.uint8 and f["arr_0"].shape == (2, 4, 4, 3)
    assert f["arr_0"].min() == 0 and f["arr_0"].max() == 255
  np.testing.assert_array_equal(ev.to_uint8(np.array([0.0, 0.999, -1.0])), [128, 255, 0])


def _hsic_by_formula(k, l):
  m = k.shape[0]
  k, l = k.copy(), l.copy()
  np.fill_diagonal(k, 0)
  np.fill_diagonal(l, 0)
  one = np.ones(m)
  return (np.trace(k @ l) + (one @ k @ one) * (one @ l @ one) / ((m - 1) * (m - 2))
          - 2 / (m - 2) * (one @ k @ l @ one)) / (m * (m - 3))


@pytest.mark.parametrize("pair", ["p0", "p1", "p2"])
def test_cknna_matches_the_reference_outputs(pair):
  g = np.load(GOLDEN / "cknna.npz")
  a, b = g[f"{pair}/A"], g[f"{pair}/B"]
  np.testing.assert_allclose(ev.cknna(a, b, topk=10), g[f"{pair}/cknna"], atol=2e-5)
  k, l = a.astype(np.float64) @ a.T.astype(np.float64), b.astype(np.float64) @ b.T.astype(np.float64)
  np.testing.assert_allclose(ev.hsic_unbiased(k, l), g[f"{pair}/hsic_unbiased_KL"], rtol=1e-4)
  np.testing.assert_allclose(ev.hsic_unbiased(k, l), _hsic_by_formula(k, l), rtol=1e-10)


def test_cknna_rejects_bad_topk():
  a = np.random.default_rng(0).normal(size=(8, 3))
  with pytest.raises(ValueError, match="topk=8"):
    ev.cknna(a, a, topk=8)


_ALLGATHER = r"""
import sys, numpy as np, jax
jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
from ifsq_jax import eval as ev
feats = np.random.default_rng(0).normal(size=(300, 8))
mine = feats[:100] if jax.process_index() == 0 else feats[100:]
stats = ev.FeatureStats(8)
stats.update(mine)
total = stats.allgather()
assert total.count == 300
np.testing.assert_allclose(total.mu, feats.mean(0), rtol=1e-10)
np.testing.assert_allclose(total.sigma, np.cov(feats, rowvar=False), rtol=1e-9)
print("ok", jax.process_index())
"""


def test_feature_statistics_gather_over_processes(tmp_path):
  import socket  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from conftest import subprocess_env  # pylint: disable=g-import-not-at-top
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  procs = [subprocess.Popen([sys.executable, "-c", _ALLGATHER, f"127.0.0.1:{port}", str(i)], env=subprocess_env(1),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outs = [p.communicate(timeout=180)[0] for p in procs]
  for i, (p, out) in enumerate(zip(procs, outs)):
    assert p.returncode == 0 and f"ok {i}" in out, out[-2000:]


def test_fd_vgg16_is_zero_for_the_same_images_and_grows_with_distortion():
  rng = np.random.default_rng(3)
  photo = skimage.data.astronaut().astype(np.float32) / 127.5 - 1
  crops = np.stack([photo[i:i + 64, j:j + 64] for i in range(0, 400, 40) for j in range(0, 400, 80)])
  noisy = np.clip(crops + rng.normal(0, 0.5, crops.shape), -1, 1).astype(np.float32)
  real, same, fake = ev.FeatureStats(512), ev.FeatureStats(512), ev.FeatureStats(512)
  real.update(ev.vgg16_features(crops))
  same.update(ev.vgg16_features(crops))
  fake.update(ev.vgg16_features(noisy))
  assert abs(ev.fd_vgg16(real, same)) < 1e-3
  assert ev.fd_vgg16(real, fake) > 1.0

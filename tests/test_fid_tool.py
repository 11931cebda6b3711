"""The FID Inception's ADM features (logits, sFID spatial features, TF1 resize) and the ``ifsq_jax.tools.fid`` CLI."""

import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ifsq_jax.convert import inception as conv
from ifsq_jax.convert import torch_io
from ifsq_jax.eval import fid, generative
from ifsq_jax.nets import inception
from ifsq_jax.tools import fid as tool
from test_inception import _reference


def _random_variables(seed=0, classifier=True):
  """Random Inception variables in the converted layout (no compiled init: shapes, then numpy draws)."""
  outputs = inception.OUTPUTS if classifier else ("pool",)
  shapes = jax.eval_shape(lambda: inception.InceptionV3FID().init(
      jax.random.key(0), jnp.zeros((1, 299, 299, 3)), outputs=outputs))
  rng = np.random.default_rng(seed)

  def draw(path, s):
    name = path[-1].key
    if name == "kernel":
      return rng.normal(0, math.sqrt(2 / math.prod(s.shape[:-1])), s.shape).astype(np.float32)
    if name in ("scale", "var"):
      return rng.uniform(0.5, 1.5, s.shape).astype(np.float32)
    return rng.normal(0, 0.1, s.shape).astype(np.float32)  # bias, mean

  return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(scope="module")
def inception_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("inception") / "converted"
  torch_io.save_converted(str(path), _random_variables(), {"kind": "inception"})
  return str(path)


def _tf1_resize_reference(x, size):
  """TF1 ResizeBilinear (align_corners=False, half_pixel_centers=False), pixel by pixel as its kernel computes."""
  _, h, w, _ = x.shape
  out = np.zeros((x.shape[0], size, size, x.shape[3]), np.float32)
  sy, sx = np.float32(h) / np.float32(size), np.float32(w) / np.float32(size)
  for i in range(size):
    fy = np.float32(i) * sy
    y0, y1, dy = int(np.floor(fy)), min(int(np.ceil(fy)), h - 1), fy - np.float32(np.floor(fy))
    for j in range(size):
      fx = np.float32(j) * sx
      x0, x1, dx = int(np.floor(fx)), min(int(np.ceil(fx)), w - 1), fx - np.float32(np.floor(fx))
      top = x[:, y0, x0] + (x[:, y0, x1] - x[:, y0, x0]) * dx
      bottom = x[:, y1, x0] + (x[:, y1, x1] - x[:, y1, x0]) * dx
      out[:, i, j] = top + (bottom - top) * dy
  return out


def test_adm_preprocessing_resizes_as_tf1_without_half_pixel_centres():
  x = np.random.default_rng(0).integers(0, 256, (2, 13, 21, 3)).astype(np.float32)
  ours = np.asarray(inception.resize_tf_legacy(jnp.asarray(x), 37))
  np.testing.assert_allclose(ours, _tf1_resize_reference(x, 37), atol=1e-4)
  half_pixel = np.asarray(jax.image.resize(x, (2, 37, 37, 3), "bilinear", antialias=False))
  assert np.abs(ours - half_pixel).max() > 1.0  # the two conventions differ: the choice matters


def test_logits_and_spatial_features_match_pytorch_fc_and_mixed_6d_branch1x1():
  model = _reference(seed=1)
  captured = {}
  model.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: captured.update(spatial=o))
  x = torch.rand(2, 3, 32, 32)
  with torch.no_grad():
    pool = model(x)
    logits_unbiased = pool @ model.fc.weight.T
    logits = model.fc(pool)
  variables = conv.convert({k: v.numpy() for k, v in model.state_dict().items()})
  assert conv.has_classifier(variables)
  ours = jax.jit(lambda v, im: inception.InceptionV3FID().apply(v, im, outputs=inception.OUTPUTS))(
      variables, x.numpy().transpose(0, 2, 3, 1))
  spatial = captured["spatial"][:, :7].permute(0, 2, 3, 1).reshape(2, -1)  # TF order: (H, W, C)
  assert ours["spatial"].shape == (2, 17 * 17 * 7) and float(spatial.min()) >= 0  # after the ReLU
  for name, ref in (("pool", pool), ("logits_unbiased", logits_unbiased), ("logits", logits),
                    ("spatial", spatial)):
    np.testing.assert_allclose(np.asarray(ours[name]), ref.numpy(), atol=2e-4, rtol=1e-4, err_msg=name)


def _write(path, **arrays):
  np.savez(path, **arrays)
  return str(path)


def test_tool_scores_a_batch_against_itself_and_caches_the_reference(inception_dir, tmp_path, monkeypatch):
  images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
  samples, ref = _write(tmp_path / "samples.npz", arr_0=images), _write(tmp_path / "ref.npz", arr_0=images)
  out = tmp_path / "metrics.json"
  assert tool.main([samples, "--ref", ref, "--inception", inception_dir, "--batch", "4", "--out", str(out),
                    "--cache_dir", str(tmp_path / "cache")]) == 0
  m = json.loads(out.read_text())
  assert {"fid", "sfid", "inception_score", "precision", "recall", "fd_vgg16", "samples"} <= set(m)
  assert m["samples"] == 4 and m["inception_preprocess"] == "adm"
  assert m["precision"] == 1.0 and m["recall"] == 1.0
  assert abs(m["fid"]) < 1e-6 and abs(m["sfid"]) < 1e-6 and abs(m["fd_vgg16"]) < 1e-6
  assert m["inception_score"] >= 1.0
  assert len(list((tmp_path / "cache").glob("ref.inception-*.npz"))) == 1
  assert len(list((tmp_path / "cache").glob("ref.vgg16-*.npz"))) == 1

  # Other samples: the reference comes from the cache (only the samples are read), the metrics move.
  calls = []
  features = tool._features  # pylint: disable=protected-access
  monkeypatch.setattr(tool, "_features", lambda path, *a, **k: calls.append(path) or features(path, *a, **k))
  other = _write(tmp_path / "other.npz", arr_0=255 - images)
  m2 = tool.evaluate(other, ref, inception_dir, batch=4, cache_dir=str(tmp_path / "cache"))
  assert calls == [other]
  assert m2["fid"] > 1e-3 and m2["sfid"] > 1e-3 and m2["fd_vgg16"] > 1e-3
  # Direct: the features of both batches through the tool's extractor, the generative metrics on them.
  with np.load(next((tmp_path / "cache").glob("ref.inception-*.npz"))) as cached:
    a = cached["pool"]
  b = tool.FeatureExtractor(inception_dir, batch=4)(255 - images)
  assert a.shape == (4, 2048) and b["spatial"].shape == (4, 2023)
  stats_a, stats_b = fid.FeatureStats(2048), fid.FeatureStats(2048)
  stats_a.update(a)
  stats_b.update(b["pool"])
  assert m2["fid"] == pytest.approx(generative.frechet_distance(stats_b.mu, stats_b.sigma, stats_a.mu, stats_a.sigma),
                                    rel=1e-6)
  assert (m2["precision"], m2["recall"]) == generative.precision_recall(a, b["pool"])
  assert m2["inception_score"] == pytest.approx(generative.inception_score(b["logits_unbiased"]), rel=1e-6)


def test_published_reference_statistics_are_used_as_adm_does(inception_dir, tmp_path):
  images = np.random.default_rng(1).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
  extractor = tool.FeatureExtractor(inception_dir, batch=4)
  f = extractor(images)
  mu, sigma = f["pool"].mean(0), np.cov(f["pool"], rowvar=False)
  mu_s, sigma_s = f["spatial"].mean(0), np.cov(f["spatial"], rowvar=False)
  # As VIRTUAL_imagenet256_labeled.npz: images and statistics (here shifted, as if made by another network).
  ref = _write(tmp_path / "virtual.npz", arr_0=images, mu=mu + 0.5, sigma=sigma, mu_s=mu_s - 0.25, sigma_s=sigma_s)
  samples = _write(tmp_path / "samples.npz", arr_0=images)
  m = tool.evaluate(samples, ref, inception_dir, batch=4)  # cache beside the reference
  assert m["fid"] == pytest.approx(0.25 * 2048, rel=1e-5) and m["sfid"] == pytest.approx(0.0625 * 2023, rel=1e-5)
  assert m["ref_check_fid"] == pytest.approx(m["fid"], rel=1e-6) and m["precision"] == 1.0
  assert list(tmp_path.glob("virtual.inception-*.npz"))
  # Statistics alone (pytorch-fid's mu / sigma format): FID only.
  stats_only = _write(tmp_path / "stats.npz", mu=mu + 0.5, sigma=sigma)
  m = tool.evaluate(samples, stats_only, inception_dir, batch=4)
  assert m["fid"] == pytest.approx(0.25 * 2048, rel=1e-5)
  assert not {"sfid", "precision", "fd_vgg16", "ref_check_fid"} & set(m)


def test_unknown_outputs_or_preprocessing_are_refused():
  x = jnp.zeros((1, 32, 32, 3))
  with pytest.raises(ValueError, match="valid: names among"):
    jax.eval_shape(lambda: inception.InceptionV3FID().init(jax.random.key(0), x, outputs=("pool", "mixed_6")))
  with pytest.raises(ValueError, match="preprocess='tf'"):
    jax.eval_shape(lambda: inception.InceptionV3FID(preprocess="tf").init(jax.random.key(0), x))


def test_without_inception_only_fd_vgg16_and_the_convert_command(tmp_path, capsys):
  rng = np.random.default_rng(2)
  samples = _write(tmp_path / "s.npz", arr_0=rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8))
  ref = _write(tmp_path / "r.npz", arr_0=rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8))
  out = tmp_path / "m.json"
  assert tool.main([samples, "--ref", ref, "--batch", "4", "--out", str(out)]) == 0
  assert "python -m ifsq_jax.convert inception" in capsys.readouterr().err
  m = json.loads(out.read_text())
  assert set(m) == {"samples_npz", "ref_npz", "samples", "fd_vgg16"} and m["fd_vgg16"] > 0


def test_old_conversion_without_classifier_gives_everything_but_the_inception_score(tmp_path, capsys):
  old = tmp_path / "old_inception"
  torch_io.save_converted(str(old), _random_variables(classifier=False), {"kind": "inception"})
  assert not conv.has_classifier(conv.load(str(old))[1])
  images = np.random.default_rng(3).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
  samples = _write(tmp_path / "s.npz", arr_0=images)
  assert tool.main([samples, "--ref", samples, "--inception", str(old), "--batch", "4"]) == 0
  printed = capsys.readouterr()
  assert "FID: " in printed.out and "Precision: 1.0" in printed.out and "Inception Score" not in printed.out
  assert "without the classifier" in printed.err


@pytest.mark.parametrize("arrays, message", [
    ({"images": np.zeros((4, 8, 8, 3), np.uint8)}, "has no 'arr_0'"),
    ({"arr_0": np.zeros((4, 8, 8, 3), np.float32)}, "is float32; ADM's batches hold uint8"),
    ({"arr_0": np.zeros((4, 8, 8), np.uint8)}, r"has shape \(4, 8, 8\); valid: \(N, H, W, 3\)"),
])
def test_bad_sample_batches_are_refused_with_what_is_valid(tmp_path, capsys, arrays, message):
  samples = _write(tmp_path / "bad.npz", **arrays)
  ref = _write(tmp_path / "r.npz", arr_0=np.zeros((4, 8, 8, 3), np.uint8))
  assert tool.main([samples, "--ref", ref]) == 1
  err = capsys.readouterr().err
  assert "error:" in err and re.search(message, err), err

"""In-training sample evaluation: fd_vgg16 always; FID, sFID, IS, precision / recall with Inception weights."""

import logging

import numpy as np
import pytest

from ifsq_jax.convert import torch_io
from ifsq_jax.data import pipeline as pipeline_lib
from ifsq_jax.data import transforms
from ifsq_jax.eval import fid, generative
from ifsq_jax.tools import fid as fid_tool
from ifsq_jax.train import dit, sample_eval
from test_fid_tool import _random_variables

BATCH = 8


def _config(eval_examples=12, **eval_fields):
  c = dit.default_config()
  c.data.image_size = 32
  c.data.eval_examples = eval_examples
  c.eval.update(eval_fields)
  return c


def _crops(c):
  source = pipeline_lib.build_source(c.data, c.data.eval_split)
  return np.stack([transforms.to_float(transforms.center_crop(source[i][0], 32)) for i in range(c.data.eval_examples)])


def _stats(features):
  s = fid.FeatureStats(features.shape[1])
  s.update(features)
  return s


def test_fd_vgg16_compares_samples_with_the_validation_crops_as_saved_uint8():
  c = _config()
  evaluator = sample_eval.SampleEvaluator(c, batch=BATCH)
  samples = np.random.default_rng(0).uniform(-1, 1, (10, 32, 32, 3)).astype(np.float32)
  out = evaluator.score(samples)
  assert set(out) == {"fd_vgg16", "samples"} and out["samples"] == 10
  as_saved = lambda x: fid.to_uint8(x) / np.float32(127.5) - 1  # what the tool reads back: uint8 / 255 * 2 - 1
  real, fake = _stats(fid.vgg16_features(as_saved(_crops(c)))), _stats(fid.vgg16_features(as_saved(samples)))
  assert out["fd_vgg16"] == pytest.approx(fid.fd_vgg16(fake, real), rel=1e-5)
  assert evaluator.score(_crops(c))["fd_vgg16"] < 1e-3 * out["fd_vgg16"]  # the crops themselves: about 0
  with pytest.raises(ValueError, match=r"N >= 2, got \(1, 32, 32, 3\)"):
    evaluator.score(samples[:1])


def test_inception_metrics_equal_adm_metrics_of_the_tools_features(tmp_path, caplog):
  path = str(tmp_path / "inception")
  torch_io.save_converted(path, _random_variables(seed=4), {"kind": "inception"})
  c = _config(eval_examples=BATCH, inception_path=path)  # crops and samples: one feature step each
  crops = _crops(c)
  samples = np.random.default_rng(1).uniform(-1, 1, (BATCH, 32, 32, 3)).astype(np.float32)
  evaluator = sample_eval.SampleEvaluator(c, batch=BATCH)
  out = evaluator.score(samples)
  assert set(out) == {"fd_vgg16", "samples", "fid", "sfid", "inception_score", "precision", "recall"}

  # The tool's extractor on the uint8 images the sampling tool would save, then eval.generative directly.
  extractor = fid_tool.FeatureExtractor(path, batch=BATCH)
  real, fake = extractor(fid.to_uint8(crops)), extractor(fid.to_uint8(samples))
  assert fake["pool"].shape == (BATCH, 2048) and fake["spatial"].shape == (BATCH, 2023)
  frechet = lambda a, b: generative.frechet_distance(_stats(a).mu, _stats(a).sigma, _stats(b).mu, _stats(b).sigma)
  assert out["fid"] == pytest.approx(frechet(fake["pool"], real["pool"]), rel=1e-6)
  assert out["sfid"] == pytest.approx(frechet(fake["spatial"], real["spatial"]), rel=1e-6)
  assert out["fid"] > 0 and out["sfid"] > 0
  assert out["inception_score"] == pytest.approx(generative.inception_score(fake["logits_unbiased"], BATCH), rel=1e-9)
  assert 1.0 < out["inception_score"] < 1008
  assert (out["precision"], out["recall"]) == generative.precision_recall(real["pool"], fake["pool"])

  # The crops against themselves: distances 0, both manifolds cover each other.
  same = evaluator.score(crops)
  assert same["fid"] < 1e-6 and same["sfid"] < 1e-6 and same["precision"] == same["recall"] == 1.0

  # A reference file replaces the crops for FID, and for sFID when it holds mu_s / sigma_s (ADM's files do).
  mu, sigma = _stats(real["pool"]).mu, _stats(real["pool"]).sigma
  mu_s, sigma_s = _stats(real["spatial"]).mu, _stats(real["spatial"]).sigma
  np.savez(tmp_path / "adm.npz", mu=mu + 1.0, sigma=sigma, mu_s=mu_s - 0.5, sigma_s=sigma_s)
  evaluator.config.eval.fid_reference = str(tmp_path / "adm.npz")
  ref = evaluator.score(samples)
  fake_pool, fake_spatial = _stats(fake["pool"]), _stats(fake["spatial"])
  assert ref["fid"] == pytest.approx(generative.frechet_distance(fake_pool.mu, fake_pool.sigma, mu + 1.0, sigma),
                                     rel=1e-6)
  assert ref["sfid"] == pytest.approx(
      generative.frechet_distance(fake_spatial.mu, fake_spatial.sigma, mu_s - 0.5, sigma_s), rel=1e-6)
  assert ref["fid"] != pytest.approx(out["fid"], rel=1e-3) and ref["sfid"] != pytest.approx(out["sfid"], rel=1e-3)
  assert (ref["precision"], ref["recall"], ref["inception_score"]) == (
      out["precision"], out["recall"], out["inception_score"])  # still against the crops / the samples alone
  np.savez(tmp_path / "pool_only.npz", mu=mu + 1.0, sigma=sigma)  # pytorch-fid's format: sFID from the crops
  evaluator.config.eval.fid_reference = str(tmp_path / "pool_only.npz")
  pool_only = evaluator.score(samples)
  assert pool_only["fid"] == pytest.approx(ref["fid"], rel=1e-9)
  assert pool_only["sfid"] == pytest.approx(out["sfid"], rel=1e-9)

  # Three samples: no k=3 manifold, so no precision / recall, and the log says why.
  with caplog.at_level(logging.WARNING):
    few = evaluator.score(samples[:3])
  assert "fid" in few and "inception_score" in few and not {"precision", "recall"} & set(few)
  assert "need at least 4 real and 4 generated images, got 8 and 3" in caplog.text


@pytest.mark.parametrize("n, split", [(50_000, 5000), (10_000, 5000), (12_001, 6001), (9_999, 9_999), (12, 12),
                                      (2, 2)])
def test_inception_score_splits_are_adm_s_5000_or_near_equal_with_no_short_remainder(n, split):
  assert sample_eval.inception_score_split(n) == split
  sizes = [min(split, n - s) for s in range(0, n, split)]
  assert min(sizes) >= min(n, generative.IS_SPLIT)


def test_inception_score_split_of_no_samples_is_refused():
  with pytest.raises(ValueError, match="n=0 samples"):
    sample_eval.inception_score_split(0)

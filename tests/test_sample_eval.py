"""In-training sample evaluation: fd_vgg16 always, FID with converted Inception weights, against crops or a file."""

import jax
import numpy as np
import pytest

from ifsq_jax.convert import inception, torch_io
from ifsq_jax.data import pipeline as pipeline_lib
from ifsq_jax.data import transforms
from ifsq_jax.eval import fid
from ifsq_jax.train import dit, sample_eval


def _config(**eval_fields):
  c = dit.default_config()
  c.data.image_size = 32
  c.data.eval_examples = 12
  c.eval.update(eval_fields)
  return c


def _crops(c):
  source = pipeline_lib.build_source(c.data, c.data.eval_split)
  return np.stack([transforms.center_crop(source[i][0], 32) for i in range(c.data.eval_examples)])


def test_fd_vgg16_compares_samples_with_the_validation_crops():
  c = _config()
  evaluator = sample_eval.SampleEvaluator(c)
  samples = np.random.default_rng(0).uniform(-1, 1, (10, 32, 32, 3)).astype(np.float32)
  out = evaluator.score(samples)
  assert set(out) == {"fd_vgg16", "samples"} and out["samples"] == 10
  real, fake = fid.FeatureStats(512), fid.FeatureStats(512)
  real.update(fid.vgg16_features(_crops(c)))
  fake.update(fid.vgg16_features(samples))
  assert out["fd_vgg16"] == pytest.approx(fid.fd_vgg16(fake, real), rel=1e-6)
  assert evaluator.score(_crops(c))["fd_vgg16"] < 1e-3 * out["fd_vgg16"]  # the crops themselves: about 0


def test_inception_weights_add_fid_against_the_crops_or_a_reference_file(tmp_path):
  variables = jax.device_get(jax.jit(inception._init_fn)())  # random weights in the converted layout
  torch_io.save_converted(str(tmp_path / "inception"), variables, {"kind": "inception"})
  c = _config(inception_path=str(tmp_path / "inception"))
  samples = np.random.default_rng(1).uniform(-1, 1, (12, 32, 32, 3)).astype(np.float32)  # as many as the crops
  evaluator = sample_eval.SampleEvaluator(c)
  out = evaluator.score(samples)
  module, params = inception.load(str(tmp_path / "inception"))
  jax.tree.map(np.testing.assert_array_equal, params, variables)
  real, fake = fid.FeatureStats(2048), fid.FeatureStats(2048)
  real.update(np.asarray(evaluator._inception(_crops(c))))  # the evaluator's compiled Inception (one compile)
  fake.update(np.asarray(evaluator._inception(samples)))
  assert np.isfinite(out["fid"])
  assert out["fid"] == pytest.approx(fid.frechet_distance(fake.mu, fake.sigma, real.mu, real.sigma), rel=1e-4)
  # A reference statistics file replaces the crops (ADM's VIRTUAL_imagenet256_labeled.npz format).
  ref = tmp_path / "ref.npz"
  np.savez(ref, mu=real.mu + 1.0, sigma=real.sigma)
  evaluator.config.eval.fid_reference = str(ref)
  shifted = evaluator.score(samples)["fid"]
  assert shifted == pytest.approx(fid.frechet_distance(fake.mu, fake.sigma, real.mu + 1.0, real.sigma), rel=1e-4)
  assert shifted != pytest.approx(out["fid"], rel=1e-3)

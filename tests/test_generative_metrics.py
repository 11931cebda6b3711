"""ADM's generative metrics (Frechet distance, Inception Score, precision / recall) against direct formulas."""

import warnings

import numpy as np
import pytest
import scipy.linalg
import scipy.special

from ifsq_jax.eval import fid, generative


def _adm_frechet(mu1, sigma1, mu2, sigma2, eps=1e-6):
  """ADM's FIDStatistics.frechet_distance: scipy sqrtm, eps retry, 1e-3 tolerance on the imaginary part."""
  mu1, mu2, sigma1, sigma2 = np.atleast_1d(mu1), np.atleast_1d(mu2), np.atleast_2d(sigma1), np.atleast_2d(sigma2)
  diff = mu1 - mu2
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    covmean = scipy.linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
      offset = np.eye(sigma1.shape[0]) * eps
      covmean = scipy.linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
  if np.iscomplexobj(covmean):
    assert np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3)
    covmean = covmean.real
  return diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)


def _stats(x):
  return x.mean(0), np.cov(x, rowvar=False)


def _features(rng, n, d, shift=0.0, scale=1.0):
  mix = rng.normal(size=(d, d)) / np.sqrt(d)  # correlated features
  return shift + scale * rng.normal(size=(n, d)) @ mix + rng.uniform(0, 2, size=d)


def test_frechet_distance_matches_adm_on_well_conditioned_statistics():
  rng = np.random.default_rng(0)
  for d in (1, 7, 64):
    mu1, s1 = _stats(_features(rng, 400, d))
    mu2, s2 = _stats(_features(rng, 300, d, shift=0.3, scale=1.5))
    ours = generative.frechet_distance(mu1, s1, mu2, s2)
    np.testing.assert_allclose(ours, _adm_frechet(mu1, s1, mu2, s2), rtol=1e-6)
    assert fid.frechet_distance(mu1, s1, mu2, s2) == ours  # the module of the training-time FID calls it
  np.testing.assert_allclose(generative.frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]), 4 + 4 + 9 - 2 * 6)


def test_frechet_distance_of_identical_statistics_is_zero():
  rng = np.random.default_rng(1)
  for n, d in ((500, 32), (10, 64)):  # full rank, and singular (N < D)
    mu, s = _stats(_features(rng, n, d))
    assert generative.frechet_distance(mu, s, mu, s) == pytest.approx(0.0, abs=1e-9 * np.trace(s))


def test_frechet_distance_with_fewer_samples_than_dimensions_is_finite_real_and_nonnegative():
  rng = np.random.default_rng(2)
  mu1, s1 = _stats(_features(rng, 12, 96))
  mu2, s2 = _stats(_features(rng, 9, 96, shift=0.1))
  value = generative.frechet_distance(mu1, s1, mu2, s2)
  assert isinstance(value, float) and np.isfinite(value) and value >= 0
  # The limit ADM's retry approaches: sqrtm of the product with a small offset on both covariances.
  offset = 1e-9 * np.eye(96)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    root = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
  limit = (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(root).real
  np.testing.assert_allclose(value, limit, rtol=1e-4)
  assert fid.frechet_distance(mu1, s1, mu2, s2) == value


def test_frechet_distance_rejects_mismatched_or_non_finite_statistics():
  mu, s = np.zeros(3), np.eye(3)
  with pytest.raises(ValueError, match="mismatched statistics"):
    generative.frechet_distance(mu, s, mu[:2], s[:2, :2])
  with pytest.raises(ValueError, match="non-finite"):
    generative.frechet_distance(mu, s, mu, np.full((3, 3), np.nan))


def _adm_inception_score(probs, split_size):
  """ADM's compute_inception_score loop, on probabilities."""
  scores = []
  for i in range(0, len(probs), split_size):
    part = probs[i:i + split_size]
    kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
    scores.append(np.exp(np.mean(np.sum(kl, 1))))
  return float(np.mean(scores))


def test_inception_score_matches_adm_from_logits_or_probabilities():
  rng = np.random.default_rng(3)
  logits = 3 * rng.normal(size=(23, 11))
  probs = scipy.special.softmax(logits, axis=1)
  for split in (5000, 10, 7):  # one split; and several, the last one shorter
    expected = _adm_inception_score(probs, split)
    assert generative.inception_score(logits, split) == pytest.approx(expected, rel=1e-10)
    assert generative.inception_score(probs, split) == pytest.approx(expected, rel=1e-10)
  assert generative.inception_score(logits, 10) != pytest.approx(generative.inception_score(logits, 5000), rel=1e-3)


def test_inception_score_of_one_hot_uniform_classes_is_the_number_of_classes():
  k = 10
  one_hot = np.eye(k)[np.arange(5 * k) % k]  # every class equally often, confident predictions
  assert generative.inception_score(one_hot) == pytest.approx(k, rel=1e-12)
  assert generative.inception_score(np.full((8, k), 1.0 / k)) == pytest.approx(1.0, rel=1e-12)  # no information
  with pytest.raises(ValueError, match=r"\(N, K\)"):
    generative.inception_score(np.zeros((5,)))


def _direct_precision_recall(real, fake, k=3):
  """Full float64 distance matrices, the k-th smallest distance of a row (itself at 0) as the radius."""
  def sq(a, b):
    return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
  r_radii = np.sort(sq(real, real), axis=1)[:, k]
  f_radii = np.sort(sq(fake, fake), axis=1)[:, k]
  d = sq(real, fake)
  precision = np.mean(np.any(d <= r_radii[:, None], axis=0))
  recall = np.mean(np.any(d <= f_radii[None, :], axis=1))
  return precision, recall, r_radii


def test_precision_recall_match_the_direct_formulas_in_blocks():
  rng = np.random.default_rng(4)
  real = rng.normal(size=(37, 8)) + 5.0  # a large common mean, as pool features have
  fake = 1.3 * rng.normal(size=(29, 8)) + 5.4
  precision, recall, r_radii = _direct_precision_recall(real, fake)
  assert 0 < precision < 1 and 0 < recall < 1  # a test that can tell
  for batch in (7, 10000):  # blocks with a short last one, and a single block
    assert generative.precision_recall(real, fake, batch_size=batch) == (precision, recall)
    np.testing.assert_allclose(generative.manifold_radii(real, batch_size=batch), r_radii, rtol=1e-4)
  p1, r1, _ = _direct_precision_recall(real, fake, k=1)
  assert generative.precision_recall(real, fake, k=1, batch_size=5) == (p1, r1)


def test_identical_sets_are_fully_precise_and_recalled_and_far_clusters_not_at_all():
  rng = np.random.default_rng(5)
  x = rng.normal(size=(50, 16))
  assert generative.precision_recall(x, x.copy(), batch_size=16) == (1.0, 1.0)
  assert generative.precision_recall(x, rng.normal(size=(40, 16)) + 100.0, batch_size=16) == (0.0, 0.0)


def test_precision_recall_need_more_features_than_neighbours():
  x = np.zeros((3, 4))
  with pytest.raises(ValueError, match="more than 3 features"):
    generative.precision_recall(x, np.ones((10, 4)))
  with pytest.raises(ValueError, match="differ in width"):
    generative.precision_recall(np.ones((10, 4)), np.ones((10, 5)))

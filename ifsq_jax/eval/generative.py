"""Generative metrics as ADM's evaluator computes them: Frechet distance, Inception Score, precision / recall.

ADM is the evaluator of openai/guided-diffusion (``evaluations/evaluator.py``),
whose numbers the paper reports. Its definitions, followed here in numpy:

* FID / sFID: the Frechet distance of Gaussians fitted to Inception features
  (``np.mean``, ``np.cov(rowvar=False)``); pool features for FID, the
  ``mixed_6/conv`` spatial features for sFID (see ``ifsq_jax.nets.inception``).
* Inception Score: ``exp(mean_x KL(p(y|x) || p(y)))`` per split of 5000 samples,
  averaged over the splits, ``p(y)`` the mean prediction of the split (ADM's
  last split is whatever remains; ours are near-equal, see
  :func:`inception_score_split`).
* Precision / recall (Kynkaanniemi et al. 2019, k = 3): a set's manifold is the
  union of balls around its features, each with the radius of the distance to
  its k-th nearest neighbour in the set (the feature itself is the 0th).
  Precision is the fraction of generated features inside the reference
  manifold, recall the fraction of reference features inside the generated one.

Where we differ from ADM's numerics (on purpose, each said at the function):
the matrix square root (ADM: ``scipy.linalg.sqrtm``, NaN or complex when the
covariances are singular), the float dtype of the distances (ADM: float16 when
finite), float64 for the Inception Score and its splits when N is not a
multiple of 5000.

N samples, D feature width, K classes.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
import scipy.special

PR_NEIGHBOURS = 3  # ADM's nhood_sizes=(3,)
PR_BATCH = 10000  # ADM's row_batch_size and col_batch_size
IS_SPLIT = 5000  # ADM's split_size


def _psd_factor(s: np.ndarray) -> np.ndarray:
  """F (D, r) with ``F F^T = s`` for a symmetric PSD s (D, D), r its numerical rank.

  LAPACK's pivoted Cholesky (``dpstrf``), which stops at the rank: a pivot below
  ``D * eps * max(diag)`` ends it, so a singular covariance (fewer samples than
  dimensions, constant features) gives a narrow factor rather than NaN.
  """
  c, piv, rank, info = scipy.linalg.lapack.dpstrf(s, lower=1)
  if info < 0:
    raise ValueError(f"dpstrf rejected argument {-info} for a ({s.shape}) matrix.")
  f = np.zeros((s.shape[0], rank))
  f[piv - 1] = np.tril(c)[:, :rank]  # undo the pivoting: s = P L L^T P^T
  return f


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
  """Frechet distance ``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr(sqrt(S1 S2))`` of (D,), (D, D) statistics.

  ADM's formula; the trace of the matrix square root is computed another way.
  With ``S1 = F F^T`` (F (D, r), r the rank of S1), ``S1 S2`` has the non-zero
  eigenvalues of ``A = F^T S2 F`` (r, r), which is symmetric positive
  semi-definite, so ``tr(sqrt(S1 S2))`` is the sum of the square roots of A's
  eigenvalues (``eigvalsh``, float64; the factor from a pivoted Cholesky, of
  whichever covariance has the lower rank). This stays real and finite where
  ``scipy.linalg.sqrtm`` does not: singular covariances (fewer samples than
  dimensions, constant features) give NaN or complex square roots there, which
  ADM patches by adding ``1e-6 I`` to both covariances. Eigenvalues below zero
  are rounding noise of a PSD matrix and are clipped, and so is the result (a
  distance): identical statistics give 0 up to rounding. On well-conditioned
  covariances the value equals ADM's to rounding (1e-14 relative measured at
  D = 2048); it takes less time than ``sqrtm`` at full rank, far less at low rank.

  Raises:
    ValueError: if the shapes do not match or the covariances are not finite.
  """
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
    raise ValueError(f"mismatched statistics: mu {mu1.shape} / {mu2.shape}, sigma {sigma1.shape} / {sigma2.shape}.")
  for name, s in (("sigma1", sigma1), ("sigma2", sigma2)):
    if not np.isfinite(s).all():
      raise ValueError(f"{name} has non-finite entries; a covariance must be finite.")
  sigma1, sigma2 = (sigma1 + sigma1.T) / 2, (sigma2 + sigma2.T) / 2
  f1, f2 = _psd_factor(sigma1), _psd_factor(sigma2)
  f, other = (f1, sigma2) if f1.shape[1] <= f2.shape[1] else (f2, sigma1)
  a = f.T @ other @ f  # (r, r)
  eig = np.linalg.eigvalsh((a + a.T) / 2) if a.size else np.zeros((0,))
  tr_covmean = np.sqrt(np.clip(eig, 0, None)).sum()
  diff = mu1 - mu2
  return max(float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean), 0.0)


def inception_score_split(n: int) -> int:
  """Split size of the Inception Score of n samples: ``n // 5000`` near-equal splits, at least one.

  ADM scores consecutive splits of 5000 (ten for the paper's 50,000) and the
  remainder as a last, shorter split; n a multiple of 5000, or at most 5000,
  gives exactly ADM's splits here. Otherwise the splits are as equal as they
  can be, so none is a short remainder (ADM's split of one sample scores 1
  whatever the model, and pulls the mean down), and fewer than 10,000 samples
  make one split of all n.

  Raises:
    ValueError: for n < 1.
  """
  if n < 1:
    raise ValueError(f"n={n} samples; the Inception Score needs at least 1.")
  splits = max(1, n // IS_SPLIT)
  return -(-n // splits)


def inception_score(logits_or_probs: np.ndarray, split_size: int | None = None) -> float:
  """ADM's Inception Score of (N, K) class logits or probabilities.

  Splits of ``split_size`` consecutive rows (the last may be shorter), each
  scored ``exp(mean_x sum_y p(y|x) (log p(y|x) - log p(y)))`` with ``p(y)`` the
  split's mean prediction; the mean over splits. ``split_size=None`` (what
  ``python -m ifsq_jax.tools.fid`` and the in-training evaluation use) takes
  :func:`inception_score_split` of N: ADM's 5000 when N is a multiple of it,
  else near-equal splits with no short remainder. Rows that are non-negative
  and sum to 1 (within 1e-3) are taken as probabilities, anything else as
  logits (softmax). ADM feeds the softmax of the pool features times the
  ``fc`` weights *without* the bias (the original improved-gan code does the
  same): pass ``logits_unbiased`` of ``ifsq_jax.nets.inception`` to reproduce it.

  Differences from ADM: float64 softmax and logs (ADM: float32),
  ``0 log 0 = 0`` (ADM would give NaN for a probability that underflows to 0),
  and the default splits when N is not a multiple of 5000.

  Raises:
    ValueError: for an input that is not 2-D with rows, or split_size < 1.
  """
  x = np.asarray(logits_or_probs, np.float64)
  if x.ndim != 2 or x.shape[0] == 0:
    raise ValueError(f"the Inception Score needs (N, K) logits or probabilities with N >= 1, got {x.shape}.")
  if split_size is None:
    split_size = inception_score_split(len(x))
  if split_size < 1:
    raise ValueError(f"split_size={split_size} must be >= 1.")
  is_probs = np.all(x >= 0) and np.allclose(x.sum(1), 1.0, rtol=0, atol=1e-3)
  p = x if is_probs else scipy.special.softmax(x, axis=1)
  scores = []
  for start in range(0, len(p), split_size):
    part = p[start:start + split_size]
    marginal = part.mean(0, keepdims=True)
    kl = (scipy.special.xlogy(part, part) - scipy.special.xlogy(part, marginal)).sum(1)
    scores.append(np.exp(kl.mean()))
  return float(np.mean(scores))


def _squared_distances(a: np.ndarray, a_sq: np.ndarray, b: np.ndarray, b_sq: np.ndarray) -> np.ndarray:
  """(n, m) squared Euclidean distances of rows of a (n, D) and b (m, D), given their squared norms."""
  d = a_sq[:, None] + b_sq[None, :] - 2.0 * (a @ b.T)
  return np.maximum(d, 0.0, out=d)


def _prepare(features: np.ndarray, centre: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Centred float32 features and their squared norms.

  Distances do not change under a shift; centring shrinks the norms, so the
  ``|a|^2 + |b|^2 - 2 a.b`` form loses less to cancellation in float32 (pool
  features are non-negative with a large common mean).
  """
  f = (np.asarray(features, np.float64) - centre).astype(np.float32)
  return f, np.einsum("nd,nd->n", f, f)


def _check_features(name: str, features: np.ndarray, k: int) -> np.ndarray:
  features = np.asarray(features)
  if features.ndim != 2:
    raise ValueError(f"{name} must be (N, D) features, got shape {features.shape}.")
  if len(features) <= k:
    raise ValueError(f"{name}: a k-th nearest neighbour (k={k}) needs more than {k} features, got {len(features)}.")
  return features


def _radii(f: np.ndarray, f_sq: np.ndarray, k: int, batch_size: int) -> np.ndarray:
  """Squared distance of each row of prepared features to its k-th nearest row (itself the 0th)."""
  n = len(f)
  radii = np.empty((n,), np.float32)
  for i in range(0, n, batch_size):
    best = None  # the k + 1 smallest distances seen so far, unordered: (b, <= k + 1)
    for j in range(0, n, batch_size):
      d = _squared_distances(f[i:i + batch_size], f_sq[i:i + batch_size], f[j:j + batch_size], f_sq[j:j + batch_size])
      cand = d if best is None else np.concatenate([best, d], axis=1)
      keep = min(k + 1, cand.shape[1])
      best = np.partition(cand, keep - 1, axis=1)[:, :keep]
    radii[i:i + batch_size] = np.partition(best, k, axis=1)[:, k]
  return radii


def manifold_radii(features: np.ndarray, k: int = PR_NEIGHBOURS, batch_size: int = PR_BATCH) -> np.ndarray:
  """ADM's ``ManifoldEstimator.manifold_radii``: (N,) squared distances to each feature's k-th nearest neighbour.

  Over (N, D) features; the feature itself is the 0th neighbour, so k = 3 is the
  third other feature (with duplicates, a copy counts). Squared, as ADM's: the
  comparisons with squared distances decide the same. Distances are float32
  over blocks of ``batch_size`` x ``batch_size`` (ADM: float16 when finite), so
  memory stays O(batch_size^2) for any N.

  Raises:
    ValueError: for features that are not 2-D or number k or fewer.
  """
  features = _check_features("features", features, k)
  f, f_sq = _prepare(features, np.mean(features, axis=0, dtype=np.float64))
  return _radii(f, f_sq, k, batch_size)


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = PR_NEIGHBOURS,
                     batch_size: int = PR_BATCH) -> tuple[float, float]:
  """ADM's improved precision and recall of fake (N2, D) against real (N1, D) features.

  Precision: the fraction of fake features within the squared radius
  (:func:`manifold_radii`) of at least one real feature; recall: the fraction
  of real features within that of at least one fake feature (ADM's
  ``evaluate_pr``: ``distance <= radius``). Both in [0, 1]. Blocks of
  ``batch_size`` rows and columns, float32 distances (ADM: float16 when
  finite, so a feature right on a ball's surface may fall on the other side
  there).

  Raises:
    ValueError: for features that are not 2-D, of different widths, or number k or fewer.
  """
  real = _check_features("real", real, k)
  fake = _check_features("fake", fake, k)
  if real.shape[1] != fake.shape[1]:
    raise ValueError(f"real and fake features differ in width: {real.shape[1]} vs {fake.shape[1]}.")
  centre = np.mean(real, axis=0, dtype=np.float64)
  r, r_sq = _prepare(real, centre)
  g, g_sq = _prepare(fake, centre)
  r_radii, g_radii = _radii(r, r_sq, k, batch_size), _radii(g, g_sq, k, batch_size)
  real_in = np.zeros((len(r),), bool)
  fake_in = np.zeros((len(g),), bool)
  for i in range(0, len(r), batch_size):
    rows = slice(i, i + batch_size)
    for j in range(0, len(g), batch_size):
      cols = slice(j, j + batch_size)
      d = _squared_distances(r[rows], r_sq[rows], g[cols], g_sq[cols])  # (real block, fake block)
      fake_in[cols] |= np.any(d <= r_radii[rows, None], axis=0)
      real_in[rows] |= np.any(d <= g_radii[None, cols], axis=1)
  return float(fake_in.mean()), float(real_in.mean())

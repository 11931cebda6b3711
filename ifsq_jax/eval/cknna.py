"""CKNNA (centered kernel nearest-neighbour alignment), as the reference's ``llamagen/tools/cknna.py``.

Linear kernels K = A A^T and L = B B^T of raw features (no centring or
normalisation); row-wise top-k neighbour masks with the diagonal excluded (not
symmetrised); the unbiased HSIC of the masked kernels, normalised:

  CKNNA = HSIC_u(M_K M_L K, M_K M_L L) / (sqrt(HSIC_u(M_K K, M_K K) HSIC_u(M_L L, M_L L)) + 1e-6)

Computed in float64 with numpy. N samples, D features.
"""

from __future__ import annotations

import numpy as np


def hsic_unbiased(k: np.ndarray, l: np.ndarray) -> float:
  """Unbiased HSIC (Song et al. 2012, eq. 5) of two (N, N) kernels; diagonals are zeroed."""
  m = k.shape[0]
  if m < 4:
    raise ValueError(f"unbiased HSIC needs at least 4 samples, got {m}.")
  kt = np.array(k, np.float64)
  lt = np.array(l, np.float64)
  np.fill_diagonal(kt, 0.0)
  np.fill_diagonal(lt, 0.0)
  value = (np.sum(kt * lt.T) + kt.sum() * lt.sum() / ((m - 1) * (m - 2)) - 2.0 * np.sum(kt @ lt) / (m - 2))
  return float(value / (m * (m - 3)))


def _knn_mask(kernel: np.ndarray, topk: int) -> np.ndarray:
  hat = np.array(kernel, np.float64)
  np.fill_diagonal(hat, -np.inf)
  idx = np.argpartition(-hat, topk - 1, axis=1)[:, :topk]
  mask = np.zeros_like(hat)
  np.put_along_axis(mask, idx, 1.0, axis=1)
  return mask


def cknna(feats_a: np.ndarray, feats_b: np.ndarray, topk: int = 10) -> float:
  """CKNNA of (N, D_A) and (N, D_B) features with ``topk`` neighbours (2 <= topk < N)."""
  a, b = np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64)
  if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[0]:
    raise ValueError(f"features must be (N, D) with the same N, got {a.shape} and {b.shape}.")
  n = a.shape[0]
  if not 2 <= topk < n:
    raise ValueError(f"topk={topk} must be in [2, N - 1] = [2, {n - 1}].")
  k, l = a @ a.T, b @ b.T
  mk, ml = _knn_mask(k, topk), _knn_mask(l, topk)
  kl = hsic_unbiased(mk * ml * k, mk * ml * l)
  kk = hsic_unbiased(mk * k, mk * k)
  ll = hsic_unbiased(ml * l, ml * l)
  return kl / (np.sqrt(kk * ll) + 1e-6)

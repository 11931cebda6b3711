"""Frechet distances, streaming feature statistics, and the ADM file formats.

* :func:`frechet_distance`: ``|mu1 - mu2|^2 + tr(S1 + S2 - 2 sqrtm(S1 S2))`` in
  float64, the trace of the square root from the eigenvalues of
  ``sqrt(S1) S2 sqrt(S1)`` (:func:`ifsq_jax.eval.generative.frechet_distance`):
  real and finite where scipy's ``sqrtm`` is not (singular covariances).
* :class:`FeatureStats`: running sums in float64 of any number of feature batches
  (50k images never sit in memory); ``merge`` / ``allgather`` combine shards of
  devices and processes; mean and unbiased covariance as ``np.cov(rowvar=False)``.
* ``mu`` / ``sigma`` ``.npz`` files (the format of ADM's
  ``VIRTUAL_imagenet256_labeled.npz``) and sample batches as the ``arr_0`` uint8
  NHWC ``.npz`` that ADM's evaluator reads.

N samples, D feature width.
"""

from __future__ import annotations

import functools
from typing import Callable

import numpy as np
from etils import epath

from ifsq_jax import paths
from ifsq_jax.eval import generative


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
  """Frechet distance between two Gaussians (D,), (D, D); see :func:`generative.frechet_distance`.

  ``eps`` is kept for callers of the earlier ``sqrtm`` version (its retry offset);
  the eigenvalue form needs no offset and ignores it.
  """
  del eps
  return generative.frechet_distance(mu1, sigma1, mu2, sigma2)


class FeatureStats:
  """Streaming mean and covariance of features, accumulated in float64."""

  def __init__(self, dim: int):
    self.dim = dim
    self.count = 0
    self.sum = np.zeros((dim,), np.float64)
    self.outer = np.zeros((dim, dim), np.float64)

  def update(self, features: np.ndarray) -> None:
    """Adds a batch (N, D)."""
    f = np.asarray(features, np.float64).reshape(-1, self.dim)
    self.count += f.shape[0]
    self.sum += f.sum(0)
    self.outer += f.T @ f

  def merge(self, other: "FeatureStats") -> "FeatureStats":
    out = FeatureStats(self.dim)
    out.count, out.sum, out.outer = self.count + other.count, self.sum + other.sum, self.outer + other.outer
    return out

  def allgather(self) -> "FeatureStats":
    """The statistics over all processes (every process gets the total)."""
    import jax  # pylint: disable=g-import-not-at-top
    if jax.process_count() == 1:
      return self
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    with jax.enable_x64(True):  # keep the float64 sums: without it they would travel as float32
      parts = multihost_utils.process_allgather(
          {"count": np.asarray([self.count], np.float64), "sum": self.sum, "outer": self.outer})
      parts = jax.tree.map(np.asarray, parts)
    out = FeatureStats(self.dim)
    out.count = int(np.sum(parts["count"]))
    out.sum, out.outer = parts["sum"].sum(0), parts["outer"].sum(0)
    return out

  @property
  def mu(self) -> np.ndarray:
    return self.sum / self.count

  @property
  def sigma(self) -> np.ndarray:
    """Unbiased covariance, as ``np.cov(features, rowvar=False)``."""
    if self.count < 2:
      raise ValueError(f"a covariance needs at least 2 samples, got {self.count}.")
    mu = self.mu
    return (self.outer - self.count * np.outer(mu, mu)) / (self.count - 1)

  def save(self, path: epath.PathLike) -> None:
    """Writes ``mu`` and ``sigma`` (ADM's reference-statistics format); ``path`` may be ``gs://...``."""
    with paths.atomic_open(_npz(path)) as f:
      np.savez(f, mu=self.mu, sigma=self.sigma)


def fd_vgg16(stats_a: "FeatureStats", stats_b: "FeatureStats") -> float:
  """``fd_vgg16``: the Frechet distance of two sets of VGG16 pool features (see ``vgg16_features``).

  Always available (the weights ship with the package); it is not FID and its
  values are not comparable with FID.
  """
  return frechet_distance(stats_a.mu, stats_a.sigma, stats_b.mu, stats_b.sigma)


def vgg16_features(images: np.ndarray) -> np.ndarray:
  """(B, H, W, 3) images in [-1, 1] -> (B, 512) VGG16 pool features for :func:`fd_vgg16`."""
  return np.asarray(vgg16_program()(vgg16_params(), images))


@functools.lru_cache(maxsize=1)
def vgg16_params() -> dict:
  """The packaged VGG16 weights, on the default device once (not copied from the host at every call)."""
  import jax  # pylint: disable=g-import-not-at-top
  from ifsq_jax.nets import lpips  # pylint: disable=g-import-not-at-top
  return jax.device_put(lpips.load_params("vgg16"))


@functools.lru_cache(maxsize=1)
def vgg16_program() -> Callable[[dict, np.ndarray], "jax.Array"]:
  """``fn(params, images)``: the jitted VGG16 pool features, weights an argument (a closure makes them constants)."""
  import jax  # pylint: disable=g-import-not-at-top
  from ifsq_jax.nets import lpips  # pylint: disable=g-import-not-at-top
  return jax.jit(lambda params, images: lpips.vgg16_pool_features(params, images))


def _npz(path: epath.PathLike) -> epath.Path:
  """``path`` with ``.npz`` appended unless it ends so (as ``np.savez`` names a file)."""
  path = epath.Path(path)
  return path if path.name.endswith(".npz") else path.parent / (path.name + ".npz")


def load_stats(path: epath.PathLike) -> tuple[np.ndarray, np.ndarray]:
  """``mu``, ``sigma`` from a reference statistics ``.npz`` (e.g. VIRTUAL_imagenet256_labeled.npz; local or gs://)."""
  with epath.Path(path).open("rb") as file, np.load(file, allow_pickle=False) as f:
    missing = [k for k in ("mu", "sigma") if k not in f.files]
    if missing:
      raise ValueError(f"{path} has no {missing}: a reference statistics file holds 'mu' and 'sigma' "
                       f"(it has {f.files}).")
    return f["mu"], f["sigma"]


def to_uint8(images: np.ndarray) -> np.ndarray:
  """[-1, 1] floats -> uint8, as the reference: ``clip(127.5 x + 128, 0, 255)`` truncated."""
  return np.clip(127.5 * np.asarray(images, np.float64) + 128.0, 0, 255).astype(np.uint8)


def save_samples_npz(path: epath.PathLike, images: np.ndarray) -> None:
  """Sample batch for ADM's evaluator: ``arr_0`` uint8 (N, H, W, 3) from uint8 or [-1, 1] float images."""
  images = np.asarray(images)
  if images.dtype != np.uint8:
    images = to_uint8(images)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"samples must be (N, H, W, 3), got {images.shape}.")
  with paths.atomic_open(_npz(path)) as f:
    np.savez(f, arr_0=images)

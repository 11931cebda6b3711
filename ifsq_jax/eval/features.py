"""Frozen-network features for the generative metrics: the FID Inception and VGG16.

The one place where images become the features of ADM's evaluator
(``ifsq_jax.eval.generative``): ``python -m ifsq_jax.tools.fid`` reads them
from sample files, ``ifsq_jax.train.sample_eval`` from a generator's samples,
so both give the same number for the same images.

* :class:`FeatureExtractor`: uint8 (N, H, W, 3) images -> VGG16 pool features
  (``fd_vgg16``, weights ship with the package) and, with a converted FID
  Inception, its ``pool`` (FID, precision / recall), ``spatial`` (sFID) and
  ``logits_unbiased`` (Inception Score) outputs, in fixed-size padded batches.
* :func:`summarize`: streams batches through an extractor into float64
  :class:`~ifsq_jax.eval.fid.FeatureStats`, keeping only what the metrics need
  whole (pool features, logits).
* :func:`generative_metrics`: FID, sFID, IS, precision / recall of a summary
  against reference statistics and features.

Every jitted program here takes the network's weights as an argument: a
closure would bake tens of megabytes into each program as constants (slow to
compile, held once per program and batch shape).

N images, H W size, D feature width, K classes (1008).
"""

from __future__ import annotations

import functools
import hashlib
import logging
from typing import Any, Iterable

import jax
import numpy as np
from etils import epath

from ifsq_jax.eval import fid, generative
from ifsq_jax.models import saved
from ifsq_jax.nets import inception as inception_net

STAT_FEATURES = ("vgg16", "pool", "spatial")  # summarised as FeatureStats
KEPT_FEATURES = ("pool", "logits_unbiased")  # kept whole: precision / recall and the Inception Score


@functools.lru_cache(maxsize=None)
def inception_program(module: Any, outputs: tuple[str, ...]):
  """``fn(variables, x)``: one jitted Inception per module configuration and outputs, shared by extractors.

  ``x`` is (B, H, W, 3) float32 in [0, 1]; returns ``{name: (B, D)}`` for ``outputs``.
  """
  return jax.jit(functools.partial(module.apply, outputs=outputs))


def file_digest(path: epath.PathLike) -> str:
  """SHA-256 hex digest of a file (local or gs://), read in 16 MiB blocks."""
  h = hashlib.sha256()
  with epath.Path(path).open("rb") as f:
    for block in iter(functools.partial(f.read, 1 << 24), b""):
      h.update(block)
  return h.hexdigest()


class FeatureExtractor:
  """Inception (optional) and VGG16 features of uint8 batches, compiled once for a fixed batch size.

  Args:
    inception_dir: A converted FID Inception directory (``python -m
      ifsq_jax.convert inception``), or None for VGG16 only.
    batch: Images per step (the last batch is padded to it).
    preprocess: The Inception's input pipeline (``adm`` or ``pytorch_fid``).

  Attributes:
    inception_key: The digest of the Inception weights (a cache key), or None.
    has_logits: Whether the weights hold the classifier (for the Inception Score).
  """

  def __init__(self, inception_dir: epath.PathLike | None, batch: int = 64, preprocess: str = "adm"):
    if batch < 1:
      raise ValueError(f"batch={batch} must be >= 1.")
    self.batch = batch
    self.preprocess = preprocess
    self.inception_key = None
    self.has_logits = False
    self._inception = None
    if inception_dir:
      module, variables = saved.load_inception(inception_dir, preprocess=preprocess)
      self.has_logits = inception_net.has_classifier(variables)
      self._variables = jax.device_put(variables)  # once, not from the host at every batch
      outputs = ("pool", "spatial") + (("logits_unbiased",) if self.has_logits else ())
      self._inception = inception_program(module, outputs)
      self.inception_key = file_digest(epath.Path(inception_dir) / "params.safetensors")

  @property
  def has_inception(self) -> bool:
    return self._inception is not None

  def __call__(self, images: np.ndarray, inception: bool = True) -> dict[str, np.ndarray]:
    """uint8 (N, H, W, 3) -> {"vgg16": (N, 512)} and, with the Inception, pool / spatial / logits_unbiased."""
    parts = [self._batch(images[i:i + self.batch], inception) for i in range(0, len(images), self.batch)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  def _batch(self, images: np.ndarray, inception: bool) -> dict[str, np.ndarray]:
    n = len(images)
    x = np.zeros((self.batch, *images.shape[1:]), np.float32)  # padded: one compiled shape
    x[:n] = images / np.float32(255.0)
    out = {"vgg16": fid.vgg16_features(2.0 * x - 1.0)[:n]}
    if inception and self._inception is not None:
      with jax.default_matmul_precision("float32"):  # not TF32 / bf16 passes on accelerators
        out.update({k: np.asarray(v)[:n] for k, v in self._inception(self._variables, x).items()})
    return out


def summarize(batches: Iterable[np.ndarray], extractor: FeatureExtractor, inception: bool = True,
              label: str = "images") -> dict[str, Any]:
  """The features of uint8 batches (n, H, W, 3), streamed: statistics, and the arrays the metrics need whole.

  Args:
    batches: uint8 image batches, any sizes (the extractor pads to its own).
    extractor: The feature networks.
    inception: Whether to run the Inception (when the extractor has one).
    label: Names the images in the progress log.

  Returns:
    ``count`` (N), ``stats`` ({name: ``FeatureStats``} of ``vgg16`` and, with
    the Inception, ``pool`` and ``spatial``), ``pool`` (N, 2048) and
    ``logits_unbiased`` (N, K), each None when not computed.
  """
  stats: dict[str, fid.FeatureStats] = {}
  kept: dict[str, list[np.ndarray]] = {name: [] for name in KEPT_FEATURES}
  count = 0
  for images in batches:
    for name, f in extractor(images, inception).items():
      if name in STAT_FEATURES:
        stats.setdefault(name, fid.FeatureStats(f.shape[1])).update(f)
      if name in kept:
        kept[name].append(f)
    count += len(images)
    logging.debug("%s: %d images", label, count)
  return {"count": count, "stats": stats, **{k: np.concatenate(v) if v else None for k, v in kept.items()}}


def generative_metrics(fake: dict[str, Any], fid_reference: tuple[np.ndarray, np.ndarray] | None,
                       sfid_reference: tuple[np.ndarray, np.ndarray] | None,
                       real_pool: np.ndarray | None) -> dict[str, float]:
  """ADM's metrics of a :func:`summarize` result with the Inception.

  Args:
    fake: The samples' summary.
    fid_reference: (mu (2048,), sigma (2048, 2048)) of the reference pool
      features, or None for no ``fid``.
    sfid_reference: (mu_s (2023,), sigma_s (2023, 2023)) of the reference
      spatial features, or None for no ``sfid``.
    real_pool: (N_ref, 2048) reference pool features for precision / recall,
      or None; skipped (logged) when either side has k or fewer features.

  Returns:
    ``fid``, ``sfid``, ``inception_score`` (when the summary holds logits; see
    :func:`~ifsq_jax.eval.generative.inception_score` for the splits),
    ``precision`` and ``recall``, each where its inputs are there.
  """
  out: dict[str, float] = {}
  for metric, name, reference in (("fid", "pool", fid_reference), ("sfid", "spatial", sfid_reference)):
    if reference is not None:
      s = fake["stats"][name]
      out[metric] = generative.frechet_distance(s.mu, s.sigma, *reference)  # ADM: the reference second
  if fake.get("logits_unbiased") is not None:
    out["inception_score"] = generative.inception_score(fake["logits_unbiased"])
  if real_pool is not None:
    k = generative.PR_NEIGHBOURS
    n_real, n_fake = len(real_pool), len(fake["pool"])
    if min(n_real, n_fake) <= k:
      logging.warning("No precision / recall: the k=%d nearest-neighbour manifolds need at least %d real and %d "
                      "generated images, got %d and %d.", k, k + 1, k + 1, n_real, n_fake)
    else:
      out["precision"], out["recall"] = generative.precision_recall(real_pool, fake["pool"])
  return out

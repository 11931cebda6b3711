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
* :func:`to_uint8` and :class:`MeshFeatures`, for features of arrays that stay
  on the devices (the in-training evaluation): ``fid.to_uint8``'s exact bytes
  computed on the devices, and the extractor's networks as one program over a
  mesh whose batch-sharded uint8 images give batch-sharded features; only the
  features reach the host, and :class:`Summary` streams them as
  :func:`summarize` does.

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
import jax.numpy as jnp
import numpy as np
from etils import epath

from ifsq_jax import parallel, shapes_only
from ifsq_jax.eval import fid, generative
from ifsq_jax.models import saved
from ifsq_jax.nets import inception as inception_net
from ifsq_jax.nets import lpips

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
    if inception_dir and shapes_only.active():  # compiling ahead (--compile_only): the architecture, no weights
      module = inception_net.InceptionV3FID(preprocess=preprocess)
      self._variables = shapes_only.init_shapes(module.init, np.zeros((1, 299, 299, 3), np.float32))
      self.has_logits = inception_net.has_classifier(self._variables)
    elif inception_dir:
      module, variables = saved.load_inception(inception_dir, preprocess=preprocess)
      self.has_logits = inception_net.has_classifier(variables)
      self._variables = jax.device_put(variables)  # once, not from the host at every batch
      self.inception_key = file_digest(epath.Path(inception_dir) / "params.safetensors")
    if inception_dir:
      outputs = ("pool", "spatial") + (("logits_unbiased",) if self.has_logits else ())
      self._inception = inception_program(module, outputs)

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


class Summary:
  """Streamed features: float64 ``FeatureStats`` of :data:`STAT_FEATURES`, the :data:`KEPT_FEATURES` kept whole.

  ``add`` takes one batch's features (host arrays, rows in sample order); ``result`` gives what
  :func:`summarize` returns. Memory: the statistics (D x D float64 each) and the kept features (N x D float32).
  """

  def __init__(self, label: str = "images"):
    self.label = label
    self.count = 0
    self.stats: dict[str, fid.FeatureStats] = {}
    self.kept: dict[str, list[np.ndarray]] = {name: [] for name in KEPT_FEATURES}

  def add(self, features: dict[str, np.ndarray]) -> None:
    """Adds a batch: {name: (n, D)} (the extractor's outputs)."""
    n = 0
    for name, f in features.items():
      if name in STAT_FEATURES:
        self.stats.setdefault(name, fid.FeatureStats(f.shape[1])).update(f)
      if name in self.kept:
        self.kept[name].append(np.asarray(f))
      n = len(f)
    self.count += n
    logging.debug("%s: %d images", self.label, self.count)

  def result(self) -> dict[str, Any]:
    """``count``, ``stats`` and the kept features (see :func:`summarize`)."""
    return {"count": self.count, "stats": self.stats,
            **{k: np.concatenate(v) if v else None for k, v in self.kept.items()}}


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
  summary = Summary(label)
  for images in batches:
    summary.add(extractor(images, inception))
  return summary.result()


@functools.lru_cache(maxsize=1)
def uint8_thresholds() -> np.ndarray:
  """(257,) float32: entry k (1..255) the least float32 x with ``fid.to_uint8(x) >= k``; -inf and +inf at the ends.

  ``fid.to_uint8`` rounds in float64 on the host; a float32 program on a device
  can land 1 below or above it near a step. The steps as float32 thresholds
  let :func:`to_uint8` give the host's bytes exactly.
  """
  def order(x):  # float32 -> int64 in the floats' order (-0.0 and +0.0 alike)
    i = x.view(np.int32).astype(np.int64)
    return np.where(i < 0, -(i & 0x7FFFFFFF), i)

  def value(o):  # the inverse of order
    return np.where(o < 0, (-o) | 0x80000000, o).astype(np.uint32).view(np.float32)

  k = np.arange(1, 256)
  # Bisection over the float32 values, not a walk from (k - 128) / 127.5: below 0 the float64 sum rounds up to
  # 128 for every x down to about -2**-47, so that threshold lies billions of float32 steps from 0.
  lo, hi = order(np.full(255, -2.0, np.float32)), order(np.full(255, 2.0, np.float32))
  while np.any(hi - lo > 1):
    mid = (lo + hi) // 2
    reaches = fid.to_uint8(value(mid)).astype(int) >= k
    lo, hi = np.where(reaches, lo, mid), np.where(reaches, mid, hi)
  x = value(hi)
  below, above = np.float32(-np.inf), np.float32(np.inf)
  return np.concatenate([[below], x, [above]]).astype(np.float32)


def to_uint8(images: jax.Array) -> jax.Array:
  """[-1, 1] float images -> uint8 on the devices: the bytes ``fid.to_uint8`` gives on the host, for every float32.

  A float32 ``floor(127.5 x + 128)`` is within 1 of the float64 result; the
  thresholds of :func:`uint8_thresholds` settle it (NaN -> 0, as numpy's cast gives).
  """
  x = images.astype(jnp.float32)
  thresholds = jnp.asarray(uint8_thresholds())
  t = jnp.clip(jnp.floor(127.5 * x + 128.0), 0, 255)
  t = jnp.where(jnp.isnan(t), 0, t).astype(jnp.int32)
  t = t - (x < thresholds[t]).astype(jnp.int32) + (x >= thresholds[t + 1]).astype(jnp.int32)
  return jnp.clip(t, 0, 255).astype(jnp.uint8)


class MeshFeatures:
  """A :class:`FeatureExtractor`'s networks as one program over a mesh, for images already on the devices.

  ``self(images)`` takes uint8 (B, H, W, 3) images sharded over the mesh's batch
  axes (B a multiple of its batch devices) and returns the extractor's features
  as batch-sharded global arrays: each device computes the features of its rows
  (nothing is gathered), and the caller brings only the features to the host.
  The numbers are the extractor's: the same networks and preprocessing (the
  uint8 -> float steps as tables of the host's float32 values), the Inception
  at float32 matmul precision, VGG16 at the default one, as there.

  Args:
    extractor: The networks (its Inception, when it has one, and VGG16).
    mesh: The devices; the weights are replicated over them once.
  """

  def __init__(self, extractor: FeatureExtractor, mesh: jax.sharding.Mesh):
    self.mesh = mesh
    self.has_inception = extractor.has_inception
    weights = {"vgg16": fid.vgg16_params()}
    if extractor.has_inception:
      weights["inception"] = extractor._variables  # pylint: disable=protected-access
    # On the host (or shapes only, when compiling ahead) until the first call places them on the mesh.
    self._host_weights = jax.tree.map(lambda x: x if isinstance(x, jax.ShapeDtypeStruct) else np.asarray(x),
                                      weights)
    self._weights = None
    self._inception = extractor._inception  # pylint: disable=protected-access
    self.program = self._program()

  @property
  def weights(self) -> Any:
    """The networks' weights replicated over the mesh (placed on first use)."""
    if self._weights is None:
      self._weights = parallel.replicate(self._host_weights, self.mesh)
    return self._weights

  def _program(self):
    unit = np.arange(256, dtype=np.uint8) / np.float32(255.0)  # the extractor's x = images / 255 (float32, on the host)
    signed = 2.0 * unit - 1.0  # and its VGG16 input 2 x - 1

    def features(weights, images):
      out = {"vgg16": lpips.vgg16_pool_features(weights["vgg16"], jnp.asarray(signed)[images])}
      if "inception" in weights:
        with jax.default_matmul_precision("float32"):  # as the extractor: not TF32 / bf16 passes
          out.update(self._inception(weights["inception"], jnp.asarray(unit)[images]))
      return {k: jax.lax.with_sharding_constraint(v, parallel.batch_sharding(self.mesh, v.ndim))
              for k, v in out.items()}

    return jax.jit(features)

  def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
    """uint8 (B, H, W, 3) batch-sharded -> {"vgg16": (B, 512)} and, with the Inception, pool / spatial / logits."""
    return self.program(self.weights, images)

  def lower(self, batch: int, size: int):
    """The program lowered for (batch, size, size, 3) uint8 images, from the weights' shapes (``--compile_only``)."""
    replicated = parallel.replicated(self.mesh)
    weights = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), self._host_weights)
    images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.uint8, sharding=parallel.batch_sharding(self.mesh, 4))
    return self.program.lower(weights, images)


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

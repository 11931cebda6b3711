"""In-training evaluation of a generator's samples, with ``ifsq_jax.eval`` as ``python -m ifsq_jax.tools.fid``.

Generated images are compared with the center crops of the first
``data.eval_examples`` validation images (their features computed once), or,
for FID and sFID, with a reference statistics file (``eval.fid_reference``,
e.g. ADM's ``VIRTUAL_imagenet256_labeled.npz``). Logged metrics:

* ``fd_vgg16``, always: VGG16 features that ship with the package. It tracks
  progress where no Inception weights can be had; it is not FID and is not
  comparable with it.
* With Inception weights (``eval.inception_path``, a directory of ``python -m
  ifsq_jax.convert inception``), as ADM's evaluator computes them
  (``ifsq_jax.eval.generative``):

  - ``fid``: pool features, against the reference file's ``mu`` / ``sigma``
    when one is given, else against the crops.
  - ``sfid``: spatial features, against the reference file's ``mu_s`` /
    ``sigma_s`` when it holds them (ADM's files do), else against the crops.
  - ``inception_score``: the classifier without its bias, in
    :func:`~ifsq_jax.eval.generative.inception_score_split` splits (the
    tool's). Weights converted without the classifier give no score (logged).
  - ``precision`` / ``recall``: k = 3 manifolds of the pool features of the
    samples and the crops; skipped (logged) with fewer than 4 of either.

Preprocessing is the tool's, on purpose: samples are rounded to uint8 as
``python -m ifsq_jax.tools.sample`` saves them (``fid.to_uint8``), and so are
the crops, as the images of ADM's reference batches are; both go through
``eval.features.FeatureExtractor`` with ``preprocess="adm"`` (the TF graph's
resize and scaling that made ADM's published statistics). So a number logged
here is the number ``tools.fid`` gives for the same images, and a published
reference is compared with features made the same way. (Earlier versions fed
float images through pytorch-fid's resize; FID against ADM's statistics then
carried the difference between the two pipelines.)

Memory: nothing here holds all N images. The crops are read, cropped and
scored in batches of uint8; the trainer's samples never reach the host as
images: each sampler call's images are rounded to uint8 and their features
computed on the devices that hold them (:meth:`SampleEvaluator.mesh_features`,
``eval.features.MeshFeatures``), and only the features are gathered, into a
``features.Summary`` (float64 statistics, plus the pool features and logits that
precision / recall and the Inception Score need whole: 12 KiB a sample).
:meth:`SampleEvaluator.score_summary` turns that summary into the metrics;
:meth:`SampleEvaluator.score` does the same for host images (N, H, W, 3) in
[-1, 1]. Every process holds the same summary and computes the same numbers.

N samples, D feature width.
"""

from __future__ import annotations

import functools
import logging
from typing import Iterator

import ml_collections
import numpy as np
from etils import epath

from ifsq_jax.data import pipeline as pipeline_lib
from ifsq_jax.data import sources, transforms
from ifsq_jax.eval import features as features_lib
from ifsq_jax.eval import fid
# Re-exported: the split rule of the logged inception_score is the tool's, defined once in eval.
from ifsq_jax.eval.generative import inception_score_split  # pylint: disable=unused-import

BATCH = 32  # images per feature step (padded to it: one compiled shape)


class SampleEvaluator:
  """Scores generated images against the validation split (see the module doc).

  Args:
    config: The run's config (``data.*`` and ``eval.inception_path`` /
      ``eval.fid_reference``).
    batch: Images per feature step.
  """

  def __init__(self, config: ml_collections.ConfigDict, batch: int = BATCH):
    self.config = config
    self.extractor = features_lib.FeatureExtractor(config.eval.inception_path or None, batch, preprocess="adm")
    if self.extractor.has_inception and not self.extractor.has_logits:
      logging.warning("%s was converted without the classifier (fc): no inception_score. Convert the checkpoint "
                      "again with `python -m ifsq_jax.convert inception`.", config.eval.inception_path)
    self._mesh_features = None

  @functools.cached_property
  def _real(self) -> dict[str, object]:
    """Features of the validation crops (read on first use, streamed in uint8 batches)."""
    d = self.config.data
    source = pipeline_lib.build_source(d, d.eval_split)
    n = min(len(source), d.eval_examples)

    def crops():  # uint8 (size, size, 3) each: the bytes fid.to_uint8 gives back from their [-1, 1] floats
      for i in range(n):
        try:
          yield transforms.center_crop(source[i][0], d.image_size)
        except sources.DecodeError as e:
          logging.warning("Skipped an undecodable validation image: %s", e)

    step = self.extractor.batch
    batches = (np.stack(b) for b in _chunks(crops(), step))
    out = features_lib.summarize(batches, self.extractor, label="validation crops")
    if out["count"] < 2:
      raise ValueError(f"the sample evaluation needs at least 2 validation images; {d.eval_split!r} gave "
                       f"{out['count']} of config.data.eval_examples={d.eval_examples}.")
    return out

  def mesh_features(self, mesh) -> features_lib.MeshFeatures:
    """The feature networks as one program over ``mesh`` (weights replicated once per mesh)."""
    if self._mesh_features is None or self._mesh_features.mesh is not mesh:
      self._mesh_features = features_lib.MeshFeatures(self.extractor, mesh)
    return self._mesh_features

  def features(self, images: np.ndarray) -> dict[str, object]:
    """Features of (N, H, W, 3) images in [-1, 1], as the tool computes them from the saved uint8 images.

    Returns:
      The :func:`ifsq_jax.eval.features.summarize` dict: ``stats`` (``FeatureStats``
      of ``vgg16`` and, with the Inception, of ``pool`` and ``spatial``),
      ``pool`` (N, 2048) and ``logits_unbiased`` (N, 1008; the classifier
      without its bias, when the weights hold it), None where not computed.
    """
    step = self.extractor.batch
    batches = (fid.to_uint8(images[start:start + step]) for start in range(0, len(images), step))
    return features_lib.summarize(batches, self.extractor, label="evaluation images")

  def _reference(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"pool": (mu, sigma), "spatial": (mu_s, sigma_s)}, each from ``eval.fid_reference`` if it holds them."""
    real = self._real
    out = {name: (real["stats"][name].mu, real["stats"][name].sigma) for name in ("pool", "spatial")}
    path = self.config.eval.fid_reference
    if path:
      out["pool"] = fid.load_stats(path)
      with epath.Path(path).open("rb") as raw, np.load(raw, allow_pickle=False) as f:  # may be gs://
        if "mu_s" in f.files and "sigma_s" in f.files:
          out["spatial"] = (f["mu_s"], f["sigma_s"])
    return out

  def score(self, images: np.ndarray) -> dict[str, float]:
    """The metrics of the module doc for generated images (N, H, W, 3) in [-1, 1], N >= 2."""
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or len(images) < 2:
      raise ValueError(f"the sample evaluation needs (N, H, W, 3) images with N >= 2, got {images.shape}.")
    return self.score_summary(self.features(images))

  def score_summary(self, fake: dict[str, object]) -> dict[str, float]:
    """The metrics of the module doc for the samples' ``features.Summary`` result (``count`` >= 2)."""
    if fake["count"] < 2:
      raise ValueError(f"the sample evaluation needs N >= 2 samples, got {fake['count']}.")
    real = self._real
    out = {"fd_vgg16": fid.fd_vgg16(fake["stats"]["vgg16"], real["stats"]["vgg16"]), "samples": float(fake["count"])}
    if not self.extractor.has_inception:
      return out
    reference = self._reference()
    out.update(features_lib.generative_metrics(fake, reference["pool"], reference["spatial"], real["pool"]))
    return out


def _chunks(items: Iterator[np.ndarray], size: int) -> Iterator[list[np.ndarray]]:
  """Lists of ``size`` consecutive items (the last may be shorter)."""
  chunk = []
  for item in items:
    chunk.append(item)
    if len(chunk) == size:
      yield chunk
      chunk = []
  if chunk:
    yield chunk

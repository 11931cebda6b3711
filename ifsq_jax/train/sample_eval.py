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

Images are (N, H, W, 3) floats in [-1, 1]; every process holds all N (the
samples are small), and every process computes the same numbers.

N samples, D feature width.
"""

from __future__ import annotations

import functools
import logging

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

  @functools.cached_property
  def _real(self) -> dict[str, object]:
    """Features of the validation crops (read on first use)."""
    d = self.config.data
    source = pipeline_lib.build_source(d, d.eval_split)
    n = min(len(source), d.eval_examples)
    images = []
    for i in range(n):
      try:
        images.append(transforms.to_float(transforms.center_crop(source[i][0], d.image_size)))
      except sources.DecodeError as e:
        logging.warning("Skipped an undecodable validation image: %s", e)
    if len(images) < 2:
      raise ValueError(f"the sample evaluation needs at least 2 validation images; {d.eval_split!r} gave "
                       f"{len(images)} of config.data.eval_examples={d.eval_examples}.")
    return self.features(np.stack(images))

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
    fake, real = self.features(images), self._real
    out = {"fd_vgg16": fid.fd_vgg16(fake["stats"]["vgg16"], real["stats"]["vgg16"]), "samples": float(len(images))}
    if not self.extractor.has_inception:
      return out
    reference = self._reference()
    out.update(features_lib.generative_metrics(fake, reference["pool"], reference["spatial"], real["pool"]))
    return out

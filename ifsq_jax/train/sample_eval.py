"""In-training evaluation of a generator's samples: ``fd_vgg16`` always, FID when Inception weights are given.

Generated images are compared with the center crops of the first
``data.eval_examples`` validation images (their statistics computed once), or
with a reference statistics file (``eval.fid_reference``, e.g. ADM's
``VIRTUAL_imagenet256_labeled.npz``, for FID). ``fd_vgg16`` (VGG16 features that
ship with the package) is not FID and is not comparable with it; it tracks
progress where no Inception weights can be had.

Images are (N, H, W, 3) floats in [-1, 1]; every process holds all N (the
samples are small), and every process computes the same numbers.
"""

from __future__ import annotations

import functools
import logging

import jax
import ml_collections
import numpy as np

from ifsq_jax.data import pipeline as pipeline_lib
from ifsq_jax.data import sources, transforms
from ifsq_jax.eval import fid

_BATCH = 32


class SampleEvaluator:
  """Scores generated images against the validation split.

  Args:
    config: The run's config (``data.*`` and ``eval.inception_path`` /
      ``eval.fid_reference``).
  """

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    path = config.eval.inception_path
    self._inception = None
    if path:
      from ifsq_jax.convert import inception  # pylint: disable=g-import-not-at-top
      module, variables = inception.load(path)
      self._inception = jax.jit(lambda x: module.apply(variables, (x + 1) / 2))

  @functools.cached_property
  def _real(self) -> dict[str, fid.FeatureStats]:
    """Feature statistics of the validation crops (read on first use)."""
    d = self.config.data
    source = pipeline_lib.build_source(d, d.eval_split)
    n = min(len(source), d.eval_examples)
    images = []
    for i in range(n):
      try:
        images.append(transforms.center_crop(source[i][0], d.image_size))
      except sources.DecodeError as e:
        logging.warning("Skipped an undecodable validation image: %s", e)
    if len(images) < 2:
      raise ValueError(f"the sample evaluation needs at least 2 validation images; {d.eval_split!r} gave "
                       f"{len(images)} of config.data.eval_examples={d.eval_examples}.")
    return self._stats(np.stack(images))

  def _stats(self, images: np.ndarray) -> dict[str, fid.FeatureStats]:
    out = {"vgg16": fid.FeatureStats(512)}
    if self._inception is not None:
      out["inception"] = fid.FeatureStats(2048)
    for start in range(0, len(images), _BATCH):
      x = np.asarray(images[start:start + _BATCH], np.float32)
      out["vgg16"].update(fid.vgg16_features(x))
      if self._inception is not None:
        out["inception"].update(np.asarray(self._inception(x)))
    return out

  def score(self, images: np.ndarray) -> dict[str, float]:
    """``fd_vgg16`` (and ``fid``) of generated images (N, H, W, 3) in [-1, 1], N >= 2."""
    images = np.clip(np.asarray(images, np.float32), -1, 1)
    fake = self._stats(images)
    out = {"fd_vgg16": fid.fd_vgg16(fake["vgg16"], self._real["vgg16"]), "samples": float(len(images))}
    if self._inception is not None:
      ref = self.config.eval.fid_reference
      mu, sigma = fid.load_stats(ref) if ref else (self._real["inception"].mu, self._real["inception"].sigma)
      out["fid"] = fid.frechet_distance(fake["inception"].mu, fake["inception"].sigma, mu, sigma)
    return out

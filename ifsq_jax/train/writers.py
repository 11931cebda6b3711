"""Metric writers and image grids.

Process 0 writes TensorBoard event files (clu's ``SummaryWriter``), the log, and
``metrics.jsonl`` (one JSON object per logged step, with ``step``) in the work
dir; other processes only log. Image grids are also written as PNG files under
``<workdir>/images/``. The work dir may be ``gs://...``: ``metrics.jsonl`` is then
written again whole at every logged step (a bucket's objects cannot be appended
to), so each logged line is stored before the step's checkpoint starts.

TensorBoard event files go through TensorFlow's own filesystem, which reaches
real buckets but not a GCS emulator (it ignores ``STORAGE_EMULATOR_HOST``): with
that variable set and a ``gs://`` work dir they are not written (a warning says
so); ``metrics.jsonl`` holds the same scalars.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any, Mapping

import jax
import numpy as np
from clu import metric_writers
from clu.metric_writers import interface
from etils import epath
from PIL import Image

from ifsq_jax import paths

METRICS_FILE = "metrics.jsonl"


def _scalar(v: Any) -> float | int:
  v = np.asarray(v)
  return v.item() if v.size == 1 else v.tolist()


class JsonlWriter(interface.MetricWriter):
  """Appends ``{"step": step, **scalars}`` lines to a JSON-lines file.

  A local file is appended to and flushed at every line. A file in a bucket is
  kept in memory and written again whole at every line (objects cannot be
  appended to; GCS replaces an object whole, so readers never see a part).
  """

  def __init__(self, path: epath.PathLike):
    self.path = epath.Path(path)
    self._remote = paths.is_remote(self.path)
    if self._remote:
      self._text = self.path.read_text() if self.path.exists() else ""
      self._file = None
    else:
      self._file = self.path.open("a")

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    line = json.dumps({"step": int(step), **{k: _scalar(v) for k, v in scalars.items()}}) + "\n"
    if self._remote:
      self._text += line
      self.path.write_text(self._text)
      return
    self._file.write(line)
    self._file.flush()

  def write_summaries(self, step, values, metadata=None):
    pass

  def write_images(self, step, images):
    pass

  def write_videos(self, step, videos):
    pass

  def write_audios(self, step, audios, *, sample_rate):
    pass

  def write_texts(self, step, texts):
    pass

  def write_histograms(self, step, arrays, num_buckets=None):
    pass

  def write_pointcloud(self, step, point_clouds, *, point_colors=None, configs=None):
    pass

  def write_hparams(self, hparams):
    pass

  def flush(self):
    if self._file is not None:
      self._file.flush()

  def close(self):
    if self._file is not None:
      self._file.close()


def rewind_metrics(workdir: epath.PathLike, step: int) -> None:
  """On resume at ``step``: lines of later steps move to ``metrics.jsonl.orphaned``.

  They were logged by a run whose state after ``step`` was lost; the resumed run
  logs those steps again. Nothing is deleted.
  """
  path = epath.Path(workdir) / METRICS_FILE
  if jax.process_index() != 0 or not path.exists():
    return
  keep, orphaned = [], []
  for line in path.read_text().splitlines():
    try:
      (keep if json.loads(line)["step"] <= step else orphaned).append(line)
    except (ValueError, KeyError, TypeError):
      keep.append(line)
  if orphaned:
    paths.append_text(epath.Path(workdir) / (METRICS_FILE + ".orphaned"), "\n".join(orphaned) + "\n")
    paths.write_text(path, "".join(line + "\n" for line in keep))


def tensorboard_reachable(workdir: epath.PathLike) -> bool:
  """Whether TensorFlow's filesystem can write TensorBoard event files under ``workdir``.

  It cannot reach a GCS emulator: TensorFlow's GCS filesystem ignores
  ``STORAGE_EMULATOR_HOST`` and would try the real service.
  """
  return not (os.fspath(workdir).startswith("gs://") and os.environ.get("STORAGE_EMULATOR_HOST"))


def create_writer(workdir: epath.PathLike, tensorboard: bool | None = None) -> metric_writers.MetricWriter:
  """TensorBoard + log + metrics.jsonl on process 0; log only elsewhere.

  Args:
    workdir: The run's work dir.
    tensorboard: Whether to write TensorBoard event files under ``<workdir>/tensorboard``; by default
      wherever TensorFlow can (:func:`tensorboard_reachable`: not a ``gs://`` work dir under a GCS emulator).
  """
  if jax.process_index() != 0:
    return metric_writers.create_default_writer(just_logging=True, asynchronous=False)
  workdir = epath.Path(workdir)
  writers = [metric_writers.LoggingWriter(), JsonlWriter(workdir / METRICS_FILE)]
  if tensorboard is None:
    tensorboard = tensorboard_reachable(workdir)
    if not tensorboard:
      logging.warning("No TensorBoard event files: TensorFlow's GCS filesystem cannot reach the GCS emulator at "
                      "STORAGE_EMULATOR_HOST=%s; metrics still go to %s.", os.environ["STORAGE_EMULATOR_HOST"],
                      METRICS_FILE)
  if tensorboard:
    try:
      writers.append(metric_writers.SummaryWriter(str(workdir / "tensorboard")))
    except ImportError as e:  # TensorBoard event files need tensorflow.
      logging.warning("No TensorBoard event files (%s); metrics still go to %s.", e, METRICS_FILE)
  return metric_writers.MultiWriter(writers)


def image_grid(rows: list[np.ndarray], pad: int = 2) -> np.ndarray:
  """Rows of images (each (n, H, W, 3) in [-1, 1]) -> one uint8 grid image."""
  n = max(len(r) for r in rows)
  h, w = rows[0].shape[1:3]
  grid = np.full((len(rows) * (h + pad) + pad, n * (w + pad) + pad, 3), 255, np.uint8)
  for i, row in enumerate(rows):
    for j, img in enumerate(np.asarray(row)):
      pix = np.clip(np.round((img + 1.0) * 127.5), 0, 255).astype(np.uint8)
      grid[pad + i * (h + pad):pad + i * (h + pad) + h, pad + j * (w + pad):pad + j * (w + pad) + w] = pix
  return grid


def save_png(image: np.ndarray, path: epath.PathLike) -> None:
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open("wb") as f:
    Image.fromarray(image).save(f, format="PNG")


def format_eta(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"

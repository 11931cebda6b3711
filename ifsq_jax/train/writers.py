"""Metric writers and image grids.

Process 0 writes TensorBoard event files (clu's ``SummaryWriter``), the log, and
``metrics.jsonl`` (one JSON object per logged step, with ``step``) in the work
dir; other processes only log. Image grids are also written as PNG files under
``<workdir>/images/``.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any, Mapping

import jax
import numpy as np
from clu import metric_writers
from clu.metric_writers import interface
from etils import epath
from PIL import Image

METRICS_FILE = "metrics.jsonl"


def _scalar(v: Any) -> float | int:
  v = np.asarray(v)
  return v.item() if v.size == 1 else v.tolist()


class JsonlWriter(interface.MetricWriter):
  """Appends ``{"step": step, **scalars}`` lines to a JSON-lines file."""

  def __init__(self, path: epath.PathLike):
    self.path = epath.Path(path)
    self._file = self.path.open("a")

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    self._file.write(json.dumps({"step": int(step), **{k: _scalar(v) for k, v in scalars.items()}}) + "\n")
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
    self._file.flush()

  def close(self):
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
    with (epath.Path(workdir) / (METRICS_FILE + ".orphaned")).open("a") as f:
      f.write("\n".join(orphaned) + "\n")
    path.write_text("".join(line + "\n" for line in keep))


def create_writer(workdir: epath.PathLike) -> metric_writers.MetricWriter:
  """TensorBoard + log + metrics.jsonl on process 0; log only elsewhere."""
  if jax.process_index() != 0:
    return metric_writers.create_default_writer(just_logging=True, asynchronous=False)
  workdir = epath.Path(workdir)
  writers = [metric_writers.LoggingWriter(), JsonlWriter(workdir / METRICS_FILE)]
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

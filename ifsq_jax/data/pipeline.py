"""Deterministic, resumable, per-process batching of a random-access source.

The global batch of step ``s`` holds the examples at positions ``s*B .. s*B+B-1``
of an endless stream of epochs; epoch ``e`` is a permutation of the source drawn
from ``(seed, e)``, and each example's augmentation draws from
``(seed, e, index)``. A batch is therefore a pure function of (seed, step): the
pipeline's state is just the next step, the run resumes at the exact example,
and each process computes only its own slice (``B / process_count`` rows).

An example that fails to decode is replaced by the next index of the source (so
the batch stays deterministic), counted, and reported with a warning.

Batches are dicts of numpy arrays: ``image`` (b, H, W, 3) float32 in [-1, 1],
``label`` (b,) int32.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from typing import Any

import ml_collections
import numpy as np

from ifsq_jax.data import sources, transforms


class Pipeline:
  """Batches of one process, addressed by step.

  Args:
    source: Random-access source.
    transform: A function (uint8 image, size, rng) -> float32 image.
    image_size: Output side.
    global_batch_size: B over all processes.
    seed: Order and augmentation seed.
    shuffle: Permute each epoch (else the source order).
    process_index, process_count: This process's slice of every batch.
    prefetch: Batches prepared ahead in a background thread.
  """

  def __init__(self, source: sources.Source, transform: transforms.Transform, image_size: int,
               global_batch_size: int, seed: int = 0, shuffle: bool = True, process_index: int = 0,
               process_count: int = 1, prefetch: int = 2):
    if len(source) == 0:
      raise sources.DataError(f"dataset {source.name} is empty.")
    if global_batch_size % process_count:
      raise ValueError(f"global batch {global_batch_size} does not divide over {process_count} processes.")
    self.source = source
    self.transform = transform
    self.image_size = image_size
    self.global_batch_size = global_batch_size
    self.local_batch_size = global_batch_size // process_count
    self.seed = seed
    self.shuffle = shuffle
    self.process_index = process_index
    self.skipped = 0
    self.next_step = 0
    self._prefetch = prefetch
    self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1) if prefetch else None
    self._pending: dict[int, concurrent.futures.Future] = {}
    self._lock = threading.Lock()
    self._perm_cache: dict[int, np.ndarray] = {}

  # -------------------------------------------------------------- addressing

  def _permutation(self, epoch: int) -> np.ndarray:
    with self._lock:
      if epoch not in self._perm_cache:
        n = len(self.source)
        perm = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
        self._perm_cache = {epoch: perm, **{k: v for k, v in self._perm_cache.items() if k >= epoch - 1}}
      return self._perm_cache[epoch]

  def _example(self, position: int) -> tuple[np.ndarray, int, int]:
    n = len(self.source)
    epoch, offset = divmod(position, n)
    index = int(self._permutation(epoch)[offset])
    for attempt in range(n):
      i = (index + attempt) % n
      try:
        image, label = self.source[i]
        break
      except sources.DecodeError as e:
        with self._lock:
          self.skipped += 1
          count = self.skipped
        if count <= 10 or count % 1000 == 0:
          logging.warning("Skipping an undecodable example (%d so far): %s", count, e)
    else:
      raise sources.DataError(f"no example of {self.source.name} could be decoded.")
    rng = np.random.default_rng([self.seed, epoch, index, 7])
    return self.transform(image, self.image_size, rng), label, index

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """This process's slice of the global batch of ``step``."""
    start = step * self.global_batch_size + self.process_index * self.local_batch_size
    examples = [self._example(start + j) for j in range(self.local_batch_size)]
    return {
        "image": np.stack([e[0] for e in examples]).astype(np.float32),
        "label": np.asarray([e[1] for e in examples], np.int32),
    }

  # -------------------------------------------------------------- iteration

  def _get(self, step: int) -> dict[str, np.ndarray]:
    if self._pool is None:
      return self.batch(step)
    for s in range(step, step + self._prefetch + 1):
      if s not in self._pending:
        self._pending[s] = self._pool.submit(self.batch, s)
    for s in [s for s in self._pending if s < step]:
      self._pending.pop(s).cancel()
    return self._pending.pop(step).result()

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    out = self._get(self.next_step)
    self.next_step += 1
    return out

  def state(self) -> dict[str, Any]:
    """What a checkpoint stores to resume at the exact example."""
    return {"next_step": self.next_step, "seed": self.seed, "source": self.source.name,
            "global_batch_size": self.global_batch_size, "skipped": self.skipped}

  def restore(self, state: dict[str, Any]) -> None:
    if state.get("global_batch_size", self.global_batch_size) != self.global_batch_size or \
        state.get("source", self.source.name) != self.source.name:
      logging.warning("The checkpoint's data position was saved for %s with batch %s; continuing %s with batch %d "
                      "at step %d (the example order differs from the original run).", state.get("source"),
                      state.get("global_batch_size"), self.source.name, self.global_batch_size, state["next_step"])
    self.next_step = int(state["next_step"])
    self.skipped = int(state.get("skipped", 0))
    for f in self._pending.values():
      f.cancel()
    self._pending.clear()

  def close(self) -> None:
    if self._pool is not None:
      self._pool.shutdown(wait=False, cancel_futures=True)


def build_source(data: ml_collections.ConfigDict, split: str) -> sources.Source:
  """The source named by ``config.data`` for one split."""
  if data.name == "embedded":
    return sources.EmbeddedSource(split)
  if data.name == "image_folder":
    return sources.ImageFolderSource(data.path, split)
  if data.name == "tfds":
    return sources.TfdsSource(data.tfds_name, split, data.data_dir, data.manual_dir)
  raise sources.DataError(f"config.data.name={data.name!r} is not a known dataset; use embedded, image_folder or tfds.")


def build_pipeline(config: ml_collections.ConfigDict, split: str, train: bool, process_index: int = 0,
                   process_count: int = 1, batch_size: int | None = None) -> Pipeline:
  """The training (shuffled, augmented) or evaluation (ordered, center crop) pipeline."""
  source = build_source(config.data, split)
  if config.data.transform not in transforms.TRANSFORMS:
    raise sources.DataError(f"config.data.transform={config.data.transform!r} is not one of "
                            f"{tuple(transforms.TRANSFORMS)}.")
  transform = transforms.TRANSFORMS[config.data.transform] if train else transforms.center_crop
  return Pipeline(source, transform, config.data.image_size, batch_size or config.train.global_batch_size,
                  seed=config.seed, shuffle=train, process_index=process_index, process_count=process_count)

"""Deterministic, resumable, per-process batching of a random-access source.

The core is task-agnostic: a source gives raw examples by index, and the task's
per-example function turns one raw example and a numpy generator into a dict of
arrays (an image task crops and flips an image; a generator on extracted codes
picks the flipped or the plain codes). The global batch of step ``s`` holds the examples at positions ``s*B .. s*B+B-1``
of an endless stream of epochs; epoch ``e`` is a permutation of the source drawn
from ``(seed, e)``, and each example's augmentation draws from
``(seed, e, index)``. A batch is therefore a pure function of (seed, step): the
pipeline's state is just the next step, the run resumes at the exact example,
and each process computes only its own slice (``B / process_count`` rows).

An example that fails to decode is replaced by the next index of the source (so
the batch stays deterministic), counted, and reported with a warning.

Batches are dicts of numpy arrays stacked from the per-example dicts; for images
(:func:`image_example`): ``image`` (b, H, W, 3) float32 in [-1, 1], ``label`` (b,) int32.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from typing import Any

from typing import Callable

import ml_collections
import numpy as np

from ifsq_jax.data import sources, transforms

ExampleFn = Callable[[Any, np.random.Generator], dict[str, np.ndarray]]


def image_example(transform: transforms.Transform, image_size: int) -> ExampleFn:
  """The per-example function of image tasks: (uint8 image, label) -> {"image", "label"}."""

  def fn(raw, rng):
    image, label = raw
    return {"image": np.asarray(transform(image, image_size, rng), np.float32), "label": np.int32(label)}

  return fn


def code_example(flip: bool = True, keys: tuple[str, ...] = ("codes", "indices")) -> ExampleFn:
  """The per-example function over extracted codes (:class:`~ifsq_jax.data.code_shards.CodeShardSource`).

  With ``flip``, each example takes its horizontally flipped image's codes and
  indices with probability 1/2 (the flips ``tools/extract.py`` stores), as an
  image pipeline's random flip would. ``keys``: which of ``codes`` / ``indices``
  the examples carry (a DiT needs the codes only).
  """

  def fn(raw, rng):
    flipped = flip and "codes_flip" in raw and rng.random() < 0.5
    out = {"label": np.int32(raw["label"])}
    for key in keys:
      if key in raw:
        out[key] = np.asarray(raw[f"{key}_flip"] if flipped else raw[key])
    return out

  return fn


class Pipeline:
  """Batches of one process, addressed by step.

  Args:
    source: Random-access source (``len`` and ``source[i]``).
    example_fn: (raw example, numpy generator) -> dict of arrays; the task's.
    global_batch_size: B over all processes.
    seed: Order and augmentation seed.
    shuffle: Permute each epoch (else the source order).
    process_index, process_count: This process's slice of every batch.
    prefetch: Batches prepared ahead in a background thread.
  """

  def __init__(self, source: sources.Source, example_fn: ExampleFn, global_batch_size: int, seed: int = 0, shuffle: bool = True, process_index: int = 0,
               process_count: int = 1, prefetch: int = 2):
    if len(source) == 0:
      raise sources.DataError(f"dataset {source.name} is empty.")
    if global_batch_size % process_count:
      raise ValueError(f"global batch {global_batch_size} does not divide over {process_count} processes.")
    self.source = source
    self.example_fn = example_fn
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

  def _example(self, position: int) -> tuple[dict[str, np.ndarray], int]:
    n = len(self.source)
    epoch, offset = divmod(position, n)
    index = int(self._permutation(epoch)[offset])
    for attempt in range(n):
      i = (index + attempt) % n
      try:
        raw = self.source[i]
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
    return self.example_fn(raw, rng), index

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """This process's slice of the global batch of ``step``."""
    start = step * self.global_batch_size + self.process_index * self.local_batch_size
    examples = [self._example(start + j)[0] for j in range(self.local_batch_size)]
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}

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
  """The training (shuffled, augmented) or evaluation (ordered, center crop) image pipeline."""
  source = build_source(config.data, split)
  if config.data.transform not in transforms.TRANSFORMS:
    raise sources.DataError(f"config.data.transform={config.data.transform!r} is not one of "
                            f"{tuple(transforms.TRANSFORMS)}.")
  transform = transforms.TRANSFORMS[config.data.transform] if train else transforms.center_crop
  return Pipeline(source, image_example(transform, config.data.image_size),
                  batch_size or config.train.global_batch_size, seed=config.seed, shuffle=train,
                  process_index=process_index, process_count=process_count)

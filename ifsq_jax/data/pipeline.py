"""Deterministic, resumable, per-process batching of a random-access source, in parallel worker processes.

The core is task-agnostic: a source gives raw examples by index, and the task's
per-example function turns one raw example and a numpy generator into a dict of
arrays (an image task crops and flips an image; a generator on extracted codes
picks the flipped or the plain codes). The global batch of step ``s`` holds the
examples at positions ``s*B .. s*B+B-1`` of an endless stream of epochs; epoch
``e`` is a permutation of the source drawn from ``(seed, e)``, and each
example's augmentation draws from ``(seed, e, index)``. A batch is therefore a
pure function of (seed, step): the pipeline's state is just the next step, the
run resumes at the exact example, and each process computes only its own slice
(``B / process_count`` rows).

Where the work runs: with ``workers=0`` in a background thread of this process;
with ``workers=N`` in N worker processes (started with ``spawn``: the parent
may hold JAX's threads), each batch split into N contiguous parts, one per
worker. The source and the per-example function are pickled once into each
worker, so both must be picklable (module-level functions, or the classes
below). ``prefetch`` batches are in the works ahead of the one asked for.
Which process computes an example changes nothing in it.

An example that fails to decode is replaced by the next index of the source (so
the batch stays deterministic), counted, and reported with a warning.

Batches are dicts of numpy arrays stacked from the per-example dicts; for images
(:class:`ImageExample`): ``image`` (b, H, W, 3) uint8 for training (the step
makes it float32 in [-1, 1]: :func:`normalize`) or float32 in [-1, 1] for
evaluation, ``label`` (b,) int32.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import multiprocessing
from multiprocessing import shared_memory
import os
import threading
from typing import Any, Callable

import ml_collections
import numpy as np

from ifsq_jax.data import sources, transforms

ExampleFn = Callable[[Any, np.random.Generator], dict[str, np.ndarray]]


@dataclasses.dataclass(frozen=True)
class ImageExample:
  """The per-example function of image tasks: (image, label) -> {"image", "label"}.

  ``image`` is uint8 (size, size, 3), or float32 in [-1, 1] with ``as_float``.
  """

  transform: transforms.Transform
  image_size: int
  as_float: bool = False

  def __call__(self, raw, rng):
    image, label = raw
    out = self.transform(image, self.image_size, rng)
    return {"image": transforms.to_float(out) if self.as_float else out, "label": np.int32(label)}


def image_example(transform: transforms.Transform, image_size: int, as_float: bool = False) -> ExampleFn:
  """An :class:`ImageExample`."""
  return ImageExample(transform, image_size, as_float)


@dataclasses.dataclass(frozen=True)
class CodeExample:
  """The per-example function over extracted codes (:class:`~ifsq_jax.data.code_shards.CodeShardSource`).

  With ``flip``, each example takes its horizontally flipped image's codes and
  indices with probability 1/2 (the flips ``tools/extract.py`` stores), as an
  image pipeline's random flip would. ``keys``: which of ``codes`` / ``indices``
  the examples carry (a DiT needs the codes only); ``dtypes``: casts by key (the
  shards keep FSQ codes in float16, exact for k / (L // 2)).
  """

  flip: bool = True
  keys: tuple[str, ...] = ("codes", "indices")
  dtypes: tuple[tuple[str, str], ...] = ()

  def __call__(self, raw, rng):
    flipped = self.flip and "codes_flip" in raw and rng.random() < 0.5
    out = {"label": np.int32(raw["label"])}
    casts = dict(self.dtypes)
    for key in self.keys:
      if key in raw:
        value = np.asarray(raw[f"{key}_flip"] if flipped else raw[key])
        out[key] = value.astype(casts[key]) if key in casts else value
    return out


def code_example(flip: bool = True, keys: tuple[str, ...] = ("codes", "indices"),
                 dtypes: dict[str, Any] | None = None) -> ExampleFn:
  """A :class:`CodeExample`; ``dtypes`` maps a key to the dtype its arrays are cast to."""
  return CodeExample(flip, tuple(keys), tuple((k, np.dtype(v).name) for k, v in (dtypes or {}).items()))


def normalize(batch: dict[str, Any]) -> dict[str, Any]:
  """The batch with a uint8 ``image`` made float32 in [-1, 1] (numpy or jax arrays; inside a jitted step)."""
  image = batch.get("image")
  if image is None or image.dtype != np.uint8:
    return batch
  return {**batch, "image": transforms.to_float(image)}


# ------------------------------------------------------------------ the per-example work

def _read(source, index: int):
  """The raw example: opened, not yet decoded, where the source can (``open``)."""
  return source.open(index) if hasattr(source, "open") else source[index]


def _examples(source, example_fn: ExampleFn, seed: int, rows: list[tuple[int, int]]) -> tuple[dict, int, list[str]]:
  """The examples of ``rows`` ((epoch, index) pairs) stacked, the number of undecodable ones skipped, their errors."""
  n = len(source)
  out, skipped, errors = [], 0, []
  for epoch, index in rows:
    for attempt in range(n):
      i = (index + attempt) % n
      try:
        # The augmentation draws from the position's own index: a replacement crops the same way.
        out.append(example_fn(_read(source, i), np.random.default_rng([seed, epoch, index, 7])))
        break
      except sources.DecodeError as e:
        skipped += 1
        if len(errors) < 10:
          errors.append(str(e))
    else:
      raise sources.DataError(f"no example of {source.name} could be decoded.")
  return {k: np.stack([e[k] for e in out]) for k in out[0]}, skipped, errors


_WORKER: dict[str, Any] = {}


def _worker_init(source, example_fn, seed) -> None:
  _WORKER.update(source=source, example_fn=example_fn, seed=seed)


def _worker_examples(rows):
  """A worker's part of a batch, its arrays handed over in one shared-memory block (a pipe would copy them in
  64 KiB pieces, a fifth of one worker's time for a batch of 256 px images)."""
  arrays, skipped, errors = _examples(_WORKER["source"], _WORKER["example_fn"], _WORKER["seed"], rows)
  layout, offset = [], 0
  for k, v in arrays.items():
    layout.append((k, v.shape, v.dtype.str, offset))
    offset += v.nbytes
  block = shared_memory.SharedMemory(create=True, size=max(offset, 1))
  try:
    for (_, shape, dtype, start), v in zip(layout, arrays.values()):
      np.ndarray(shape, dtype, block.buf, start)[...] = v
  finally:
    block.close()
  return (block.name, layout), skipped, errors


def _gather_shared(handoffs) -> dict[str, np.ndarray]:
  """The workers' shared-memory blocks (in batch order) concatenated into new arrays; the blocks are freed."""
  blocks = [shared_memory.SharedMemory(name=name) for name, _ in handoffs]
  try:
    parts = [{k: np.ndarray(shape, dtype, b.buf, start) for k, shape, dtype, start in layout}
             for b, (_, layout) in zip(blocks, handoffs)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
  finally:
    del parts  # views into the blocks go before the blocks close
    for b in blocks:
      b.close()
      b.unlink()


def _free_shared(future) -> None:
  """Frees the block of a worker's result that will not be read (a dropped prefetch)."""
  if not future.cancelled() and future.exception() is None:
    block = shared_memory.SharedMemory(name=future.result()[0][0])
    block.close()
    block.unlink()


def auto_workers(workers: int) -> int:
  """``workers``, with -1 meaning the CPUs this process may use, less one for the training loop (at least 1)."""
  if workers >= 0:
    return workers
  cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
  return max(1, cpus - 1)


class Pipeline:
  """Batches of one process, addressed by step.

  Args:
    source: Random-access source (``len`` and ``source[i]``; ``source.open(i)`` when it has it).
    example_fn: (raw example, numpy generator) -> dict of arrays; the task's. Picklable when ``workers > 0``.
    global_batch_size: B over all processes.
    seed: Order and augmentation seed.
    shuffle: Permute each epoch (else the source order).
    process_index, process_count: This process's slice of every batch.
    prefetch: Batches in the works ahead of the one asked for (0: each batch is made when asked for).
    workers: Worker processes (0: a thread of this process; -1: :func:`auto_workers`).
  """

  def __init__(self, source: sources.Source, example_fn: ExampleFn, global_batch_size: int, seed: int = 0,
               shuffle: bool = True, process_index: int = 0, process_count: int = 1, prefetch: int = 2,
               workers: int = 0):
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
    self.next_step = 0
    self.workers = auto_workers(workers)
    self._prefetch = prefetch
    self._skipped_before = 0  # undecodable examples of the steps before the restored one
    self._skipped_at: dict[int, int] = {}  # step -> undecodable examples of that step (of the steps made so far)
    self._logged = 0
    self._lock = threading.Lock()
    self._perm_cache: dict[int, np.ndarray] = {}
    self._pending: dict[int, Any] = {}
    self._threads = concurrent.futures.ThreadPoolExecutor(max_workers=1) if prefetch else None
    self._processes = None
    if self.workers:
      self._processes = concurrent.futures.ProcessPoolExecutor(
          self.workers, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init,
          initargs=(source, example_fn, seed))

  # -------------------------------------------------------------- addressing

  def _permutation(self, epoch: int) -> np.ndarray:
    with self._lock:
      if epoch not in self._perm_cache:
        n = len(self.source)
        perm = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
        self._perm_cache = {epoch: perm, **{k: v for k, v in self._perm_cache.items() if k >= epoch - 1}}
      return self._perm_cache[epoch]

  def _row(self, position: int) -> tuple[int, int]:
    """(epoch, source index) of a stream position."""
    epoch, offset = divmod(position, len(self.source))
    return epoch, int(self._permutation(epoch)[offset])

  def _rows(self, step: int) -> list[tuple[int, int]]:
    start = step * self.global_batch_size + self.process_index * self.local_batch_size
    return [self._row(start + j) for j in range(self.local_batch_size)]

  def _example(self, position: int) -> tuple[dict[str, np.ndarray], int]:
    """One example of the stream and its source index (in this process)."""
    epoch, index = self._row(position)
    arrays, _, _ = _examples(self.source, self.example_fn, self.seed, [(epoch, index)])
    return {k: v[0] for k, v in arrays.items()}, index

  def _submit(self, step: int):
    """Starts making ``step``'s batch; the returned callable waits for it."""
    rows = self._rows(step)
    if self._processes is None:
      if self._threads is None:
        return lambda: _examples(self.source, self.example_fn, self.seed, rows)
      future = self._threads.submit(_examples, self.source, self.example_fn, self.seed, rows)
      return future.result
    parts = np.array_split(np.arange(len(rows)), min(self.workers, len(rows)))
    futures = [self._processes.submit(_worker_examples, [rows[i] for i in p]) for p in parts]

    def result():
      done = [f.result() for f in futures]
      return _gather_shared([d[0] for d in done]), sum(d[1] for d in done), [e for d in done for e in d[2]]
    result.futures = futures
    return result

  @staticmethod
  def _discard(result) -> None:
    for future in getattr(result, "futures", ()):
      if not future.cancel():
        future.add_done_callback(_free_shared)

  def _collect(self, step: int, result) -> dict[str, np.ndarray]:
    arrays, skipped, errors = result()
    with self._lock:
      if skipped:  # only steps with undecodable examples are kept: a long run holds few
        self._skipped_at[step] = skipped
      else:
        self._skipped_at.pop(step, None)
      for e in errors:
        self._logged += 1
        total = self._skipped_before + sum(self._skipped_at.values())
        if self._logged <= 10 or self._logged % 1000 == 0:
          logging.warning("Skipping an undecodable example (%d so far): %s", total, e)
    return arrays

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """This process's slice of the global batch of ``step`` (made now, without moving the pipeline)."""
    return self._collect(step, self._submit(step))

  # -------------------------------------------------------------- iteration

  def get(self, step: int) -> dict[str, np.ndarray]:
    """The batch of ``step``, with the ``prefetch`` steps after it set in motion."""
    if not self._prefetch:
      return self.batch(step)
    for s in [s for s in self._pending if s < step or s > step + self._prefetch]:
      self._discard(self._pending.pop(s))  # another position was asked for: its results are dropped
    for s in range(step, step + self._prefetch + 1):
      if s not in self._pending:
        self._pending[s] = self._submit(s)
    return self._collect(step, self._pending.pop(step))

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    out = self.get(self.next_step)
    self.next_step += 1
    return out

  @property
  def skipped(self) -> int:
    """Undecodable examples replaced in the steps made so far."""
    with self._lock:
      return self._skipped_before + sum(self._skipped_at.values())

  def state(self, next_step: int | None = None) -> dict[str, Any]:
    """What a checkpoint stores to resume at the exact example: ``next_step`` (default: the iterator's)."""
    next_step = self.next_step if next_step is None else next_step
    with self._lock:
      skipped = self._skipped_before + sum(v for s, v in self._skipped_at.items() if s < next_step)
    return {"next_step": next_step, "seed": self.seed, "source": self.source.name,
            "global_batch_size": self.global_batch_size, "skipped": skipped}

  def restore(self, state: dict[str, Any]) -> None:
    if state.get("global_batch_size", self.global_batch_size) != self.global_batch_size or \
        state.get("source", self.source.name) != self.source.name:
      logging.warning("The checkpoint's data position was saved for %s with batch %s; continuing %s with batch %d "
                      "at step %d (the example order differs from the original run).", state.get("source"),
                      state.get("global_batch_size"), self.source.name, self.global_batch_size, state["next_step"])
    self.next_step = int(state["next_step"])
    with self._lock:
      self._skipped_before = int(state.get("skipped", 0))
      self._skipped_at.clear()
    for result in self._pending.values():
      self._discard(result)
    self._pending.clear()

  def close(self) -> None:
    for result in self._pending.values():
      self._discard(result)
    self._pending.clear()
    if self._threads is not None:
      self._threads.shutdown(wait=False, cancel_futures=True)
    if self._processes is not None:  # waits for running parts (seconds at most): their blocks are freed
      self._processes.shutdown(wait=True, cancel_futures=True)


def build_source(data: ml_collections.ConfigDict, split: str) -> sources.Source:
  """The source named by ``config.data`` for one split."""
  if data.name == "embedded":
    return sources.EmbeddedSource(split)
  if data.name == "image_folder":
    return sources.ImageFolderSource(data.path, split)
  if data.name == "tfds":
    return sources.TfdsSource(data.tfds_name, split, data.data_dir, data.manual_dir)
  if data.name == "idx":
    return sources.IdxSource(data.path, split)
  raise sources.DataError(f"config.data.name={data.name!r} is not a known dataset; use embedded, image_folder, idx "
                          "or tfds.")


def build_pipeline(config: ml_collections.ConfigDict, split: str, train: bool, process_index: int = 0,
                   process_count: int = 1, batch_size: int | None = None) -> Pipeline:
  """The training (shuffled, augmented, uint8 images, ``data.workers``) or evaluation (ordered, ADM center crop,
  float32 images, in this process) image pipeline."""
  source = build_source(config.data, split)
  if config.data.transform not in transforms.TRANSFORMS:
    raise sources.DataError(f"config.data.transform={config.data.transform!r} is not one of "
                            f"{tuple(transforms.TRANSFORMS)}.")
  if train:
    return train_pipeline(config, source, image_example(transforms.TRANSFORMS[config.data.transform],
                                                        config.data.image_size), process_index, process_count,
                          batch_size)
  return Pipeline(source, image_example(transforms.center_crop, config.data.image_size, as_float=True),
                  batch_size or config.train.global_batch_size, seed=config.seed, shuffle=False,
                  process_index=process_index, process_count=process_count)


def train_pipeline(config: ml_collections.ConfigDict, source: sources.Source, example_fn: ExampleFn,
                   process_index: int = 0, process_count: int = 1, batch_size: int | None = None) -> Pipeline:
  """A shuffled training pipeline over ``source`` with ``config.data.workers`` and ``config.data.prefetch``."""
  return Pipeline(source, example_fn, batch_size or config.train.global_batch_size, seed=config.seed,
                  process_index=process_index, process_count=process_count, prefetch=config.data.prefetch,
                  workers=config.data.workers)

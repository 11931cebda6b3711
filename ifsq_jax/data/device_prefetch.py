"""Training batches placed on the devices ahead of the step that needs them.

A background thread takes the pipeline's batch of each step in turn
(:meth:`~ifsq_jax.data.pipeline.Pipeline.get`, which keeps its own workers busy
ahead) and places it as global arrays sharded over the mesh's batch axes; the
training loop takes them in order and learns how long it waited
(:attr:`DeviceBatches.wait_s`), the time the devices sat idle for data.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any

import jax

from ifsq_jax import parallel


class DeviceBatches:
  """Global batches of steps ``start, start + 1, ...``, up to ``depth`` of them already on the devices.

  Args:
    data: The process's pipeline (``get(step)`` -> dict of numpy arrays).
    mesh: The mesh the batches are sharded over.
    start: The first step.
    depth: Batches placed ahead (0: each is placed when :meth:`next` asks for it).
  """

  def __init__(self, data, mesh: jax.sharding.Mesh, start: int, depth: int = 2):
    self._data = data
    self._mesh = mesh
    self.step = start  # the step of the next batch :meth:`next` returns
    self.wait_s = 0.0  # total time :meth:`next` waited
    self._depth = depth
    self._stop = threading.Event()
    self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
    self._thread = None
    if depth:
      self._thread = threading.Thread(target=self._produce, args=(start,), daemon=True, name="device_prefetch")
      self._thread.start()

  def _place(self, step: int) -> dict[str, jax.Array]:
    return parallel.global_batch(self._data.get(step), self._mesh)

  def _produce(self, step: int) -> None:
    while not self._stop.is_set():
      try:
        item = self._place(step)
      except BaseException as e:  # pylint: disable=broad-except  (raised again by next())
        item = e
      while not self._stop.is_set():
        try:
          self._queue.put(item, timeout=0.1)
          break
        except queue.Full:
          continue
      if isinstance(item, BaseException):
        return
      step += 1

  def next(self) -> dict[str, Any]:
    """The next step's global batch."""
    start = time.perf_counter()
    if self._thread is None:
      item = self._place(self.step)
    else:
      item = self._queue.get()
    self.wait_s += time.perf_counter() - start
    if isinstance(item, BaseException):
      raise item
    self.step += 1
    return item

  def close(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=10)

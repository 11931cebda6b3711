"""Random reads of extracted codes: the older ``.npz`` shards against the ``.npy`` record shards.

Writes ``--shards`` synthetic shards of ``--rows`` examples at the paper's
geometry (codes (16, 16, 4) float16, indices (16, 16) int32, both with their
flips, labels, dataset positions: about 6 MB a shard) as the older
``tools.extract`` wrote them (``np.savez``, one ``.npz`` per shard), into a
temporary directory (``--dir`` to choose where). Then, in one run, over one
global shuffle of all the examples (the training pipeline's order):

* ``npz``: the older reader, as ``CodeShardSource`` read these shards: a whole
  shard loaded per miss of an LRU of 4 loaded shards.
* ``convert``: ``code_shards.convert_npz`` rewrites the directory in place.
* ``npy_memmap_all_open``: ``CodeShardSource`` on the converted directory
  with every shard memory-mapped (the default ``cache_shards`` holds 256).
* ``npy_half_open``: half of the shards mapped, reads of the others one
  ``os.pread`` each (ImageNet's 1252 shards are a fifth mapped by default).
* ``npy_none_open``: ``cache_shards=0``, every read a ``pread``.
* ``npy_seek``: the path taken for ``gs://`` and other non-local file systems
  (a seek and a read of one record per example through ``epath``: half of the
  shards' files kept open), here on the local files.
* ``npy_unpickled``: a default source that went through pickle, as a worker
  process gets it (it maps its shards itself).

The files were just written, so they are in the page cache: the rates are the
readers' costs, not a disk's. Prints ``key: value`` lines.

Usage: ``python bench/code_shards_bench.py [--shards 128] [--rows 1024] [--old_reads 1000]
[--new_reads 100000] [--dir DIR]``
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import pickle
import platform
import shutil
import tempfile
import time

import numpy as np

from ifsq_jax.data import code_shards


def _cpu() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def write_npz_shards(root: str, shards: int, rows: int) -> int:
  """Shards as the older tools.extract wrote them; returns the bytes written."""
  rng = np.random.default_rng(0)
  total = 0
  for s in range(shards):
    codes = (rng.integers(-8, 9, (rows, 16, 16, 4)) / 8).astype(np.float16)
    indices = rng.integers(0, 17 ** 4, (rows, 16, 16)).astype(np.int32)
    path = os.path.join(root, f"shard-{s:05d}-of-{shards:05d}.npz")
    np.savez(path, codes=codes, codes_flip=codes[:, :, ::-1], indices=indices, indices_flip=indices[:, :, ::-1],
             labels=rng.integers(0, 1000, (rows,)).astype(np.int32),
             index=np.arange(s * rows, (s + 1) * rows, dtype=np.int64))
    total += os.path.getsize(path)
  with open(os.path.join(root, code_shards.META), "w") as f:
    json.dump({"shard_size": rows, "examples": shards * rows, "shards": shards, "num_classes": 1000,
               "index_sizes": [17 ** 4], "image_size": 256}, f)
  return total


class NpzReader:
  """The older reader's read path: an LRU of ``cache`` whole shards loaded with ``np.load``."""

  def __init__(self, root: str, shards: int, rows: int, cache: int = 4):
    self.root, self.shards, self.rows, self.size = root, shards, rows, cache
    self.cache: collections.OrderedDict[int, dict[str, np.ndarray]] = collections.OrderedDict()

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    shard, row = divmod(int(i), self.rows)
    if shard in self.cache:
      self.cache.move_to_end(shard)
    else:
      with np.load(os.path.join(self.root, f"shard-{shard:05d}-of-{self.shards:05d}.npz")) as z:
        self.cache[shard] = {k: z[k] for k in z.files}
      while len(self.cache) > self.size:
        self.cache.popitem(last=False)
    arrays = self.cache[shard]
    out = {k: arrays[k][row] for k in code_shards.ARRAY_KEYS}
    out["label"] = np.int32(arrays["labels"][row])
    return out


def rate(source, order) -> float:
  """Examples/s of ``source[i]`` over ``order``."""
  start = time.perf_counter()
  for i in order:
    source[int(i)]
  return len(order) / (time.perf_counter() - start)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--shards", type=int, default=128)
  parser.add_argument("--rows", type=int, default=1024)
  parser.add_argument("--old_reads", type=int, default=1000, help="random reads timed with the .npz reader")
  parser.add_argument("--new_reads", type=int, default=100_000, help="random reads timed with each .npy reader")
  parser.add_argument("--dir", default="", help="where to write the shards (default: a temporary directory)")
  args = parser.parse_args()

  root = tempfile.mkdtemp(prefix="code_shards_bench_", dir=args.dir or None)
  try:
    print(f"cpu: {_cpu()}")
    print(f"cpu_count: {os.cpu_count()}")
    print(f"numpy: {np.__version__}")
    print(f"shards: {args.shards}")
    print(f"rows_per_shard: {args.rows}")
    start = time.perf_counter()
    size = write_npz_shards(root, args.shards, args.rows)
    print(f"npz_write_s: {time.perf_counter() - start:.1f}")
    print(f"npz_shard_mb: {size / args.shards / 2 ** 20:.2f}")
    order = np.random.default_rng(1).permutation(args.shards * args.rows)  # one global shuffle
    new = order[:args.new_reads]

    print(f"npz_reads: {min(args.old_reads, len(order))}")
    print(f"npz_examples_per_s: {rate(NpzReader(root, args.shards, args.rows), order[:args.old_reads]):.0f}")

    start = time.perf_counter()
    converted = code_shards.convert_npz(root)
    seconds = time.perf_counter() - start
    assert len(converted) == args.shards and not [p for p in os.listdir(root) if p.endswith(".npz")]
    print(f"convert_shards_per_s: {args.shards / seconds:.1f}")
    print(f"npy_shard_mb: {os.path.getsize(converted[0]) / 2 ** 20:.2f}")

    start = time.perf_counter()
    src = code_shards.CodeShardSource(root)
    print(f"npy_open_ms: {(time.perf_counter() - start) * 1e3:.1f}")
    print(f"npy_reads: {len(new)}")
    every = code_shards.CodeShardSource(root, cache_shards=args.shards)
    print(f"npy_memmap_all_open_examples_per_s: {rate(every, new):.0f}")
    half = code_shards.CodeShardSource(root, cache_shards=args.shards // 2)
    print(f"npy_half_open_examples_per_s: {rate(half, new):.0f}")
    print(f"npy_none_open_examples_per_s: {rate(code_shards.CodeShardSource(root, cache_shards=0), new):.0f}")
    state = pickle.dumps(src)
    print(f"npy_pickle_bytes: {len(state)}")
    print(f"npy_unpickled_examples_per_s: {rate(pickle.loads(state), new):.0f}")

    local = code_shards.is_local
    code_shards.is_local = lambda path: False  # the gs:// read path, on the local files
    try:
      seek = code_shards.CodeShardSource(root, cache_shards=args.shards // 2)
      print(f"npy_seek_examples_per_s: {rate(seek, new):.0f}")
    finally:
      code_shards.is_local = local
    for i in new[:100]:  # the readers agree
      a, b = every[int(i)], seek[int(i)]
      assert all(np.array_equal(a[k], b[k]) for k in a)
  finally:
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
  main()

"""A random-access source over the code shards ``python -m ifsq_jax.tools.extract`` writes.

The directory holds ``shard-SSSSS-of-NNNNN.npz`` files, each with ``shard_size``
rows in dataset order except the last (fewer when undecodable images were
skipped: ``shard-SSSSS-of-NNNNN.skipped.json`` then gives the shard's ``rows`` and
the skipped dataset positions), and ``meta.json`` (shard size, example count,
tokenizer, image size, codebook sizes, number of classes). Arrays per shard:
``codes`` (n, h, w, D), ``indices`` (n, h, w) or (n, h, w, G), ``labels`` (n,),
``index`` (n,) dataset positions, and with flips ``codes_flip`` /
``indices_flip``.

``CodeShardSource(dir)[i]`` is one example, ``{"codes", "codes_flip",
"indices", "indices_flip", "label"}`` (the arrays the shards hold, as stored:
FSQ codes are float16 and exact). The offsets of every shard follow from the
metadata, so construction opens one shard (two without ``meta.json``), and
reads keep a small LRU of loaded shards. Shards written without ``meta.json``
(or with an older one) still load: sizes come from the first and last shard,
the class count from the labels.

n rows, h w latent size, D code width, G index groups.
"""

from __future__ import annotations

import collections
import json
import os
import re
import threading
from typing import Any

import numpy as np

from ifsq_jax.data.sources import DataError

META = "meta.json"
ARRAY_KEYS = ("codes", "codes_flip", "indices", "indices_flip")
_SHARD = re.compile(r"^shard-(\d{5})-of-(\d{5})\.npz$")
_EXTRACT_HINT = "write them with python -m ifsq_jax.tools.extract"


def shard_name(shard: int, count: int) -> str:
  """``shard-SSSSS-of-NNNNN.npz``."""
  return f"shard-{shard:05d}-of-{count:05d}.npz"


def skipped_name(shard: int, count: int) -> str:
  """The side file of a shard from which undecodable images were left out."""
  return f"shard-{shard:05d}-of-{count:05d}.skipped.json"


class CodeShardSource:
  """Random access to extracted codes: ``len(src)``, ``src[i] -> dict[str, np.ndarray]``.

  Args:
    directory: The ``--out`` directory of ``tools.extract``.
    cache_shards: How many loaded shards to keep (least recently used are dropped).

  Attributes:
    name: ``"codes:<directory>"``.
    num_classes: From ``meta.json``, else the largest label + 1.
    codes_shape: (h, w, D) of one example's codes.
    index_shape: (h, w) or (h, w, G) of one example's indices; None without indices.
    index_sizes: Codebook size of each index column when ``meta.json`` records it, else None.
    image_size: The extraction's center-crop size (None when unknown).
    meta: The contents of ``meta.json`` ({} without it).
    keys: The array keys an example has (of ``codes``, ``codes_flip``, ``indices``, ``indices_flip``).
    skipped_positions: Dataset positions of the images the extraction could not decode.
  """

  def __init__(self, directory: str, cache_shards: int = 4):
    self.directory = os.fspath(directory)
    self.name = f"codes:{self.directory}"
    if not os.path.isdir(self.directory):
      raise DataError(f"code directory {self.directory!r} does not exist or is not a directory ({_EXTRACT_HINT}).")
    names = os.listdir(self.directory)
    found = {}
    counts = set()
    for n in names:
      m = _SHARD.match(n)
      if m:
        found[int(m.group(1))] = n
        counts.add(int(m.group(2)))
    if not found:
      raise DataError(f"code directory {self.directory} holds no shard-*.npz files ({_EXTRACT_HINT}).")
    if len(counts) != 1:
      raise DataError(f"code directory {self.directory} mixes shards of different extractions "
                      f"(shard-*-of-N with N in {sorted(counts)}); keep one extraction per directory.")
    count = counts.pop()
    missing = [shard_name(s, count) for s in range(count) if s not in found]
    if missing or max(found) >= count:
      raise DataError(f"code directory {self.directory} holds an incomplete extraction: {len(missing)} of {count} "
                      f"shards missing ({', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}). Run the same "
                      "python -m ifsq_jax.tools.extract command again to write them (it resumes).")
    self.num_shards = count
    self.meta = self._read_meta()
    self._cache: collections.OrderedDict[int, dict[str, np.ndarray]] = collections.OrderedDict()
    self._cache_size = max(1, cache_shards)
    self._lock = threading.Lock()

    if "shard_size" in self.meta and "examples" in self.meta:
      shard_size, examples = int(self.meta["shard_size"]), int(self.meta["examples"])
      if self.meta.get("shards", count) != count or _ceil_div(examples, shard_size) != count:
        raise DataError(f"code directory {self.directory}: meta.json describes {self.meta.get('shards')} shards of "
                        f"{shard_size} for {examples} examples, but the shards are shard-*-of-{count:05d}.")
    else:  # no (or an older) meta.json: sizes from the first and last shard
      shard_size = self._rows_on_disk(0)
      examples = shard_size * (count - 1) + (self._rows_on_disk(count - 1) if count > 1 else 0)
    rows = [shard_size] * count
    rows[-1] = examples - shard_size * (count - 1)
    self.skipped_positions: list[int] = []
    for s in range(count):
      if skipped_name(s, count) in names:
        with open(os.path.join(self.directory, skipped_name(s, count))) as f:
          info = json.load(f)
        rows[s] = int(info["rows"])
        self.skipped_positions.extend(int(e["index"]) for e in info.get("skipped", ()))
    self.shard_size = shard_size
    self.examples = examples  # dataset positions covered, skipped images included
    self._rows = rows
    self._offsets = np.concatenate([[0], np.cumsum(rows)]).astype(np.int64)

    if not len(self):
      raise DataError(f"code directory {self.directory} holds no examples (every image was skipped).")
    first = self._shard(next(s for s in range(count) if rows[s]))
    self.keys = tuple(k for k in ARRAY_KEYS if k in first)
    self.codes_shape = tuple(first["codes"].shape[1:])
    self.index_shape = tuple(first["indices"].shape[1:]) if "indices" in first else None
    sizes = self.meta.get("index_sizes")
    self.index_sizes = tuple(int(s) for s in sizes) if sizes else None
    self.image_size = self.meta.get("image_size")
    self.num_classes = int(self.meta.get("num_classes") or 0) or self._max_label() + 1

  # -------------------------------------------------------------- reading

  def _read_meta(self) -> dict[str, Any]:
    path = os.path.join(self.directory, META)
    if not os.path.exists(path):
      return {}
    try:
      with open(path) as f:
        return json.load(f)
    except (OSError, ValueError) as e:
      raise DataError(f"{path} cannot be read ({type(e).__name__}: {e}); rerun the extraction into a new "
                      "directory.") from None

  def _path(self, shard: int) -> str:
    return os.path.join(self.directory, shard_name(shard, self.num_shards))

  def _rows_on_disk(self, shard: int) -> int:
    with np.load(self._path(shard)) as z:
      return int(z["labels"].shape[0])

  def _load(self, shard: int) -> dict[str, np.ndarray]:
    path = self._path(shard)
    try:
      with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, KeyError) as e:
      raise DataError(f"shard {path} cannot be read ({type(e).__name__}: {e}); delete it and rerun the extraction "
                      "to write it again.") from None
    if "labels" not in arrays or "codes" not in arrays:
      raise DataError(f"shard {path} has no codes/labels arrays (it has {sorted(arrays)}); not a code shard.")
    n = arrays["labels"].shape[0]
    expected = self._rows[shard]
    bad = [k for k in ARRAY_KEYS + ("index",) if k in arrays and arrays[k].shape[0] != n]
    if n != expected or bad:
      raise DataError(f"shard {path} holds {n} rows (arrays {bad or 'consistent'}), but the extraction's "
                      f"metadata gives {expected}: the shards are inconsistent (mixed extractions?); rerun the "
                      "extraction into a new directory.")
    return arrays

  def _shard(self, shard: int) -> dict[str, np.ndarray]:
    with self._lock:
      if shard in self._cache:
        self._cache.move_to_end(shard)
        return self._cache[shard]
    arrays = self._load(shard)  # outside the lock: readers of other shards go on
    with self._lock:
      self._cache[shard] = arrays
      while len(self._cache) > self._cache_size:
        self._cache.popitem(last=False)
    return arrays

  def _max_label(self) -> int:
    top = -1
    for s in range(self.num_shards):
      if self._rows[s]:
        with np.load(self._path(s)) as z:
          top = max(top, int(z["labels"].max()))
    return top

  # -------------------------------------------------------------- source API

  def __len__(self) -> int:
    return int(self._offsets[-1])

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    n = len(self)
    i = int(index)
    if i < 0:
      i += n
    if not 0 <= i < n:
      raise IndexError(f"example {index} out of range for {self.name} ({n} examples).")
    shard = int(np.searchsorted(self._offsets, i, side="right")) - 1
    arrays = self._shard(shard)
    row = i - int(self._offsets[shard])
    out = {k: arrays[k][row] for k in ARRAY_KEYS if k in arrays}
    out["label"] = np.int32(arrays["labels"][row])
    return out

  def __getstate__(self):  # picklable for worker processes, without the loaded shards
    state = dict(self.__dict__)
    state["_cache"] = collections.OrderedDict()
    del state["_lock"]
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def __repr__(self) -> str:
    return (f"CodeShardSource({self.directory!r}: {len(self)} examples in {self.num_shards} shards, codes "
            f"{self.codes_shape}, indices {self.index_shape}, {self.num_classes} classes)")


def _ceil_div(a: int, b: int) -> int:
  return -(-a // b)

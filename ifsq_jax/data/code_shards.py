"""A random-access source over the code shards ``python -m ifsq_jax.tools.extract`` writes.

Layout. The directory (a local path or a ``gs://`` URL) holds
``shard-SSSSS-of-NNNNN.npy`` files and ``meta.json`` (shard size, example
count, tokenizer, image size, codebook sizes, number of classes). A shard is
one plain, uncompressed ``.npy`` array of n per-example records (a structured
dtype), so that one example is one contiguous read: fields ``codes`` (h, w, D),
``indices`` (h, w) or (h, w, G), ``labels`` (), ``index`` () the dataset
position, and with flips ``codes_flip`` / ``indices_flip``.
``np.load(shard)["codes"]`` is the (n, h, w, D) array. Shards hold
``shard_size`` rows in dataset order except the last, fewer when undecodable
images were skipped: ``shard-SSSSS-of-NNNNN.skipped.json`` then gives the
shard's ``rows`` and the skipped dataset positions.

``CodeShardSource(dir)[i]`` is one example, ``{"codes", "codes_flip",
"indices", "indices_flip", "label"}`` (the arrays the shards hold, as stored:
FSQ codes are float16 and exact). The offsets of every shard follow from the
metadata, so construction reads one shard header (two without ``meta.json``).
A read touches one record of one shard: local shards are memory-mapped
read-only (as ``np.load(..., mmap_mode="r")`` maps them; up to ``cache_shards``
maps stay open, never a copy of the data: the page cache holds it, shared by
every process), other file systems read the record at ``header + row *
record_bytes`` through ``epath.Path.open``; shards beyond the open ones are
read the same way (``os.pread`` for local files). The source pickles without
its open shards (a few kB), for worker processes.

Older extractions wrote ``shard-*.npz`` files, which have to be loaded whole
for every random read: the source refuses them and names the command that
converts them in place, ``python -m ifsq_jax.tools.extract --convert DIR``
(:func:`convert_npz`). Shards written without ``meta.json`` (or with an older
one) still load: sizes come from the first and last shard, the class count
from the labels.

n rows, h w latent size, D code width, G index groups.
"""

from __future__ import annotations

import bisect
import io
import json
import mmap
import os
import re
import threading
from typing import Any, Mapping

from etils import epath
import numpy as np

from ifsq_jax import paths
from ifsq_jax.data.sources import DataError

META = "meta.json"
ARRAY_KEYS = ("codes", "codes_flip", "indices", "indices_flip")
FIELDS = ARRAY_KEYS + ("labels", "index")  # the record fields of a shard, in this order
CONVERT_COMMAND = "python -m ifsq_jax.tools.extract --convert"
_SHARD = re.compile(r"^shard-(\d{5})-of-(\d{5})\.npy$")
_NPZ_SHARD = re.compile(r"^shard-(\d{5})-of-(\d{5})\.npz$")
_EXTRACT_HINT = "write them with python -m ifsq_jax.tools.extract"


def shard_name(shard: int, count: int) -> str:
  """``shard-SSSSS-of-NNNNN.npy``."""
  return f"shard-{shard:05d}-of-{count:05d}.npy"


def skipped_name(shard: int, count: int) -> str:
  """The side file of a shard from which undecodable images were left out."""
  return f"shard-{shard:05d}-of-{count:05d}.skipped.json"


def is_local(path: epath.PathLike) -> bool:
  """Whether ``path`` is on a local file system (memory-mappable), not a URL such as ``gs://``."""
  return not paths.is_remote(path)


# ---------------------------------------------------------------- writing


def records(arrays: Mapping[str, np.ndarray]) -> np.ndarray:
  """One shard's (n,) structured array of records from per-key (n, ...) arrays.

  Args:
    arrays: ``codes`` and ``labels``, optionally ``index``, ``indices`` and the
      flips (:data:`FIELDS`), all with the same leading length n.

  Returns:
    The records, fields in :data:`FIELDS` order, each as the array's dtype and shape.

  Raises:
    ValueError: A missing ``codes`` / ``labels``, an unknown key, or lengths that differ.
  """
  unknown = sorted(set(arrays) - set(FIELDS))
  if unknown or "codes" not in arrays or "labels" not in arrays:
    raise ValueError(f"code shard arrays must be codes and labels, optionally {', '.join(FIELDS[1:4] + FIELDS[5:])}; "
                     f"got {sorted(arrays)}.")
  n = len(arrays["labels"])
  lengths = {k: len(v) for k, v in arrays.items()}
  if any(m != n for m in lengths.values()):
    raise ValueError(f"code shard arrays differ in length: {lengths}.")
  present = [k for k in FIELDS if k in arrays]
  out = np.empty((n,), np.dtype([(k, arrays[k].dtype, arrays[k].shape[1:]) for k in present]))
  for k in present:
    out[k] = arrays[k]
  return out


def write_shard(directory: epath.PathLike, shard: int, count: int, arrays: Mapping[str, np.ndarray]) -> epath.Path:
  """Writes ``shard_name(shard, count)`` from per-key arrays (see :func:`records`); returns its path.

  The file is written under a temporary name and renamed when complete (one
  object on object stores), so a shard that exists is always whole.
  """
  path = epath.Path(directory) / shard_name(shard, count)
  _write_npy(path, records(arrays))
  return path


def _write_npy(path: epath.Path, array: np.ndarray) -> None:
  with paths.atomic_open(path) as f:  # a complete shard or none under its name
    np.lib.format.write_array(f, array, allow_pickle=False)


def convert_npz(directory: epath.PathLike) -> list[str]:
  """Rewrites the ``shard-*.npz`` files of an older extraction as ``.npy`` record shards, in place.

  Each shard's ``.npy`` is written under a temporary name and renamed when
  complete, and only then is its ``.npz`` removed: an interrupted conversion
  leaves whole shards of either kind and resumes when run again.
  ``meta.json`` and the ``.skipped.json`` side files stay as they are (their
  names do not depend on the format).

  Args:
    directory: An extraction's output directory.

  Returns:
    The paths of the shards converted by this call.

  Raises:
    DataError: The directory does not exist, or a shard cannot be read or is not a code shard.
  """
  d = epath.Path(directory)
  if not d.is_dir():
    raise DataError(f"code directory {d} does not exist or is not a directory.")
  done = []
  for name in sorted(p.name for p in d.iterdir() if _NPZ_SHARD.match(p.name)):
    m = _NPZ_SHARD.match(name)
    if convert_npz_shard(d, int(m.group(1)), int(m.group(2))):
      done.append(str(d / shard_name(int(m.group(1)), int(m.group(2)))))
  return done


def convert_npz_shard(directory: epath.PathLike, shard: int, count: int) -> bool:
  """Converts one ``.npz`` shard (see :func:`convert_npz`); False when there was none to convert."""
  d = epath.Path(directory)
  new = d / shard_name(shard, count)
  old = d / (new.name.removesuffix(".npy") + ".npz")
  if not old.exists():
    return False
  if new.exists():  # converted before an interruption; the rename made it whole
    old.unlink()
    return False
  try:
    with old.open("rb") as f, np.load(f) as z:
      arrays = {k: z[k] for k in z.files}
  except (OSError, ValueError, KeyError) as e:
    raise DataError(f"shard {old} cannot be read ({type(e).__name__}: {e}); delete it and rerun the extraction "
                    "to write it again.") from None
  try:
    rec = records(arrays)
  except ValueError as e:
    raise DataError(f"shard {old} is not a code shard: {e}") from None
  _write_npy(new, rec)
  old.unlink()
  return True


# ---------------------------------------------------------------- reading


def _read_header(f, parsed: dict[bytes, tuple[np.dtype, tuple[int, ...]]]) -> tuple[np.dtype, tuple[int, ...], int]:
  """(dtype, shape, data offset) of the ``.npy`` file ``f`` from its header; reads nothing else.

  ``parsed`` maps header bytes already seen to their (dtype, shape): the shards
  of one extraction share a header, and parsing it is most of the cost of opening one.
  """
  raw = f.read(10)
  if len(raw) < 10 or raw[:6] != b"\x93NUMPY":
    raise ValueError("not a .npy file")
  size_bytes = 2 if raw[6] == 1 else 4  # format 1.0, or 2.0 / 3.0
  raw += f.read(size_bytes - 2)
  length = len(raw) + int.from_bytes(raw[8:8 + size_bytes], "little")
  raw += f.read(length - len(raw))
  if len(raw) != length:
    raise ValueError("a truncated .npy header")
  if raw not in parsed:
    b = io.BytesIO(raw)
    version = np.lib.format.read_magic(b)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(b)
    if fortran and len(shape) > 1:
      raise ValueError("a Fortran-ordered array")
    parsed[raw] = dtype, shape
  return *parsed[raw], length


class _RemoteShard:
  """An open shard on a non-local file system: a seek and a read per record, through one file handle."""

  def __init__(self, path: epath.Path, dtype: np.dtype, offset: int):
    self.path, self.dtype, self.offset = path, dtype, offset
    self._file = None
    self._lock = threading.Lock()  # seek + read must not interleave between threads

  def read(self, position: int, size: int) -> bytes:
    with self._lock:
      if self._file is None:
        self._file = self.path.open("rb")
      self._file.seek(position)
      return self._file.read(size)

  def column(self, key: str) -> np.ndarray:
    """One field of every record (reads the whole shard)."""
    with self.path.open("rb") as f:
      f.seek(self.offset)
      return np.frombuffer(f.read(), self.dtype)[key]


class CodeShardSource:
  """Random access to extracted codes: ``len(src)``, ``src[i] -> dict[str, np.ndarray]``.

  Safe to share between threads; pickles (for worker processes) without its
  open shards, which each process then opens for itself (a forked process
  too: it drops the open shards it inherited).

  Args:
    directory: The ``--out`` directory of ``tools.extract`` (a local path or a ``gs://`` URL).
    cache_shards: How many shards to keep open (memory maps, a file
      descriptor each, or file handles for non-local paths), no memory for data: the
      first ones read stay open; a read of another shard opens it for the one
      record (under a shuffle, evicting a shard would reopen as often and
      cost an unmapping besides).

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

  Raises:
    DataError: No directory, no shards, shards of the older ``.npz`` layout,
      an incomplete or mixed extraction, or a ``meta.json`` that does not match the shards.
  """

  def __init__(self, directory: epath.PathLike, cache_shards: int = 256):
    self._dir = epath.Path(directory)
    self.directory = str(self._dir)
    self.name = f"codes:{self.directory}"
    self._local = is_local(self._dir)
    if not self._dir.is_dir():
      raise DataError(f"code directory {self.directory!r} does not exist or is not a directory ({_EXTRACT_HINT}).")
    names = [p.name for p in self._dir.iterdir()]
    npz = sorted(n for n in names if _NPZ_SHARD.match(n))
    if npz:
      raise DataError(f"code directory {self.directory} holds shards of the older .npz layout ({npz[0]}"
                      f"{f' and {len(npz) - 1} more' if len(npz) > 1 else ''}), which a random read has to load "
                      f"whole; convert them once, in place, with: {CONVERT_COMMAND} {self.directory} (resumable; "
                      "each .npz is removed when its .npy is complete).")
    found = {}
    counts = set()
    for n in names:
      m = _SHARD.match(n)
      if m:
        found[int(m.group(1))] = n
        counts.add(int(m.group(2)))
    if not found:
      raise DataError(f"code directory {self.directory} holds no shard-*.npy files ({_EXTRACT_HINT}).")
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
    self._cache_size = max(0, cache_shards)
    self._reset()

    if "shard_size" in self.meta and "examples" in self.meta:
      shard_size, examples = int(self.meta["shard_size"]), int(self.meta["examples"])
      if self.meta.get("shards", count) != count or _ceil_div(examples, shard_size) != count:
        raise DataError(f"code directory {self.directory}: meta.json describes {self.meta.get('shards')} shards of "
                        f"{shard_size} for {examples} examples, but the shards are shard-*-of-{count:05d}.")
    else:  # no (or an older) meta.json: sizes from the first and last shard
      shard_size = self._header(0)[1][0]
      examples = shard_size * (count - 1) + (self._header(count - 1)[1][0] if count > 1 else 0)
    rows = [shard_size] * count
    rows[-1] = examples - shard_size * (count - 1)
    self.skipped_positions: list[int] = []
    for s in range(count):
      if skipped_name(s, count) in names:
        info = json.loads((self._dir / skipped_name(s, count)).read_text())
        rows[s] = int(info["rows"])
        self.skipped_positions.extend(int(e["index"]) for e in info.get("skipped", ()))
    self.shard_size = shard_size
    self.examples = examples  # dataset positions covered, skipped images included
    self._rows = rows
    self._offsets = [0]
    for r in rows:
      self._offsets.append(self._offsets[-1] + r)

    if not len(self):
      raise DataError(f"code directory {self.directory} holds no examples (every image was skipped).")
    self._dtype = None  # the record dtype every shard must have: the first shard's
    self._dtype = self._layout(next(s for s in range(count) if rows[s]))[0]
    self.keys = tuple(k for k in ARRAY_KEYS if k in self._dtype.names)
    self.codes_shape = tuple(self._dtype["codes"].shape)
    self.index_shape = tuple(self._dtype["indices"].shape) if "indices" in self._dtype.names else None
    sizes = self.meta.get("index_sizes")
    self.index_sizes = tuple(int(s) for s in sizes) if sizes else None
    self.image_size = self.meta.get("image_size")
    self.num_classes = int(self.meta.get("num_classes") or 0) or self._max_label() + 1

  # -------------------------------------------------------------- reading

  def _read_meta(self) -> dict[str, Any]:
    path = self._dir / META
    if not path.exists():
      return {}
    try:
      return json.loads(path.read_text())
    except (OSError, ValueError) as e:
      raise DataError(f"{path} cannot be read ({type(e).__name__}: {e}); rerun the extraction into a new "
                      "directory.") from None

  def _path(self, shard: int) -> epath.Path:
    return self._dir / shard_name(shard, self.num_shards)

  def _unreadable(self, shard: int, e: Exception) -> DataError:
    return DataError(f"shard {self._path(shard)} cannot be read ({type(e).__name__}: {e}); delete it and rerun the "
                     "extraction to write it again.")

  def _reset(self) -> None:
    """Forgets the open shards: in a new process (unpickled or forked), whose file handles and lock they are not."""
    self._open_shards: dict[int, Any] = {}  # memory maps or _RemoteShard
    self._layouts: dict[int, tuple[np.dtype, int]] = {}  # checked (record dtype, data offset)
    self._headers: dict[bytes, tuple[np.dtype, tuple[int, ...]]] = {}
    self._files: dict[int, str] = {}
    self._lock = threading.Lock()
    self._pid = os.getpid()

  def _file(self, shard: int) -> str:
    """The local path of a shard, as a string for ``os.open``."""
    name = self._files.get(shard)
    if name is None:
      name = self._files[shard] = str(self._path(shard))
    return name

  def _header(self, shard: int) -> tuple[np.dtype, tuple[int, ...], int]:
    try:
      with self._path(shard).open("rb") as f:
        return _read_header(f, self._headers)
    except (OSError, ValueError) as e:
      raise self._unreadable(shard, e) from None

  def _check(self, shard: int, dtype: np.dtype, shape: tuple[int, ...]) -> np.dtype:
    """The shard's record dtype, after checking it against the metadata and the other shards."""
    path = self._path(shard)
    fields = dtype.names or ()
    if "labels" not in fields or "codes" not in fields:
      raise DataError(f"shard {path} has no codes/labels arrays (it has {list(fields)}); not a code shard.")
    n = shape[0] if len(shape) == 1 else -1
    if n != self._rows[shard]:
      raise DataError(f"shard {path} holds {n} rows of shape {shape}, but the extraction's metadata gives "
                      f"{self._rows[shard]}: the shards are inconsistent (mixed extractions?); rerun the extraction "
                      "into a new directory.")
    if self._dtype is not None and dtype != self._dtype:
      raise DataError(f"shard {path} holds records {dtype.descr}, the first shard {self._dtype.descr}: the shards "
                      "are inconsistent (mixed extractions?); rerun the extraction into a new directory.")
    return dtype

  def _layout(self, shard: int) -> tuple[np.dtype, int]:
    """(record dtype, data offset) of a shard, read from its header and checked the first time."""
    layout = self._layouts.get(shard)
    if layout is None:
      dtype, shape, offset = self._header(shard)
      layout = self._layouts[shard] = (self._check(shard, dtype, shape), offset)
    return layout

  def _map(self, shard: int) -> np.ndarray:
    """The shard's records, memory-mapped read-only (local files)."""
    dtype, offset = self._layout(shard)
    try:
      fd = os.open(self._file(shard), os.O_RDONLY)
      try:  # the map keeps its own descriptor
        return np.frombuffer(mmap.mmap(fd, 0, access=mmap.ACCESS_READ), dtype, self._rows[shard], offset)
      finally:
        os.close(fd)
    except (OSError, ValueError) as e:
      raise self._unreadable(shard, e) from None

  def _opened(self, shard: int):
    """The shard's memory map (local) or :class:`_RemoteShard`, opened and kept while there is room; else None."""
    opened = self._open_shards.get(shard)
    if opened is not None or len(self._open_shards) >= self._cache_size:
      return opened
    if self._local:
      opened = self._map(shard)
    else:
      opened = _RemoteShard(self._path(shard), *self._layout(shard))
    with self._lock:  # the first of two threads that opened the same shard wins
      if len(self._open_shards) < self._cache_size:
        opened = self._open_shards.setdefault(shard, opened)
    return opened

  def _record(self, shard: int, row: int) -> np.void:
    """One record, in a map or a buffer of its own."""
    opened = self._opened(shard)
    if opened is not None and self._local:
      return opened[row]
    dtype, offset = self._layout(shard)
    size = dtype.itemsize
    try:
      if opened is not None:
        data = opened.read(offset + row * size, size)
      # More shards than open ones: under a shuffle, a shard that is not open is read from at most a few
      # times before the others, so it is opened for the one record (and none is closed under a reader).
      elif self._local:
        fd = os.open(self._file(shard), os.O_RDONLY)
        try:
          data = os.pread(fd, size, offset + row * size)
        finally:
          os.close(fd)
      else:
        with self._path(shard).open("rb") as f:
          f.seek(offset + row * size)
          data = f.read(size)
    except OSError as e:
      raise self._unreadable(shard, e) from None
    if len(data) != size:
      raise DataError(f"shard {self._path(shard)} ends before row {row}; delete it and rerun the extraction to "
                      "write it again.")
    return np.frombuffer(data, dtype, 1)[0]

  def _max_label(self) -> int:
    top = -1
    for s in range(self.num_shards):
      if self._rows[s]:
        labels = self._map(s)["labels"] if self._local else _RemoteShard(self._path(s), *self._layout(s)).column(
            "labels")
        top = max(top, int(labels.max()))
    return top

  # -------------------------------------------------------------- source API

  def __len__(self) -> int:
    return self._offsets[-1]

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    n = len(self)
    i = int(index)
    if i < 0:
      i += n
    if not 0 <= i < n:
      raise IndexError(f"example {index} out of range for {self.name} ({n} examples).")
    if self._pid != os.getpid():  # forked with the parent's open shards (a lock may be held by a parent's thread)
      self._reset()
    shard = bisect.bisect_right(self._offsets, i) - 1
    row = i - self._offsets[shard]
    record = self._record(shard, row)
    out = {k: np.array(record[k]) for k in self.keys}  # copies: nothing returned holds a map
    out["label"] = np.int32(record["labels"])
    return out

  def __getstate__(self):  # picklable for worker processes, without the open shards
    state = dict(self.__dict__)
    for k in ("_open_shards", "_layouts", "_headers", "_files", "_lock", "_pid"):
      del state[k]
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._reset()

  def __repr__(self) -> str:
    return (f"CodeShardSource({self.directory!r}: {len(self)} examples in {self.num_shards} shards, codes "
            f"{self.codes_shape}, indices {self.index_shape}, {self.num_classes} classes)")


def _ceil_div(a: int, b: int) -> int:
  return -(-a // b)

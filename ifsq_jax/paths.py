"""One path layer for every user path, local or in a bucket (``gs://bucket/...``).

Paths are :class:`etils.epath.Path`, the layer Orbax uses. ``gs://`` goes through
TensorFlow's GCS filesystem when TensorFlow is installed, else through fsspec's
``gcsfs``; ``EPATH_USE_TF=false`` selects ``gcsfs`` even with TensorFlow
installed (the tests do so against a GCS emulator, which TensorFlow's filesystem
cannot reach).

GCS has no directories (``mkdir`` makes nothing; a "directory" exists while an
object lies under it), no appending (:func:`append_text` rewrites the object) and
no atomic rename (a rename is a copy and a delete). A file that must never be
seen half written is written with :func:`atomic_open` (or :func:`write_bytes`,
:func:`write_text`): under a temporary name, then renamed over the final name.

Importing this module makes gcsfs not cache directory listings by default
(``use_listings_cache=False`` in fsspec's config for ``gs``, unless set there
already, e.g. by ``FSSPEC_GS_USE_LISTINGS_CACHE``): a cached listing never shows
files that other processes write later (checkpoints, sample shards).
"""

from __future__ import annotations

import contextlib
import io
import os
from typing import IO, Iterator

from etils import epath

PathLike = epath.PathLike
TMP_SUFFIX = ".tmp"


def _no_listings_cache() -> None:
  try:
    import fsspec  # pylint: disable=g-import-not-at-top
  except ImportError:  # gs:// then goes through TensorFlow
    return
  fsspec.config.conf.setdefault("gs", {}).setdefault("use_listings_cache", False)


_no_listings_cache()


def is_remote(path: PathLike) -> bool:
  """Whether ``path`` names a file in an object store (``gs://...``), not a local file."""
  return "://" in os.fspath(path)


def absolute(path: PathLike) -> epath.Path:
  """A local path made absolute (relative to the current directory); ``gs://`` paths as they are."""
  if is_remote(path):
    return epath.Path(path)
  return epath.Path(os.path.abspath(os.fspath(path)))


def temporary(path: PathLike) -> epath.Path:
  """The temporary name :func:`atomic_open` writes ``path`` under: ``<name>.tmp`` beside it."""
  path = epath.Path(path)
  return path.parent / (path.name + TMP_SUFFIX)


class _Stream(io.RawIOBase):
  """A file in a bucket, open for writing, that refuses to seek.

  ``zipfile`` (and so ``np.savez``) then writes as a stream (each member's sizes
  after its data). TensorFlow's GFile, which ``epath`` uses for ``gs://`` when
  TensorFlow is installed, raises a TensorFlow error on ``seek`` in write mode,
  which ``zipfile`` does not expect; gcsfs's files raise ``OSError``.
  """

  def __init__(self, file: IO[bytes]):
    super().__init__()
    self._file = file

  def writable(self) -> bool:
    return True

  def write(self, data) -> int:
    self._file.write(bytes(data))
    return len(data)

  def tell(self) -> int:
    return self._file.tell()

  def flush(self) -> None:
    if not self.closed:
      self._file.flush()


@contextlib.contextmanager
def atomic_open(path: PathLike, mode: str = "wb") -> Iterator[IO]:
  """Opens ``path`` for writing such that it only ever holds a complete file.

  The file is written under :func:`temporary` ``(path)`` and renamed over ``path``
  (replacing an older file) once written without error; after an error the
  temporary file is removed. Locally the rename is atomic. On GCS it is a copy and
  a delete, and the copy appears whole: an object becomes visible only once
  complete, so a killed writer leaves at most a temporary object, never a partial
  ``path``.

  Args:
    path: The file.
    mode: ``"wb"`` or ``"w"`` (UTF-8 text).

  Yields:
    The open file; in a bucket, in binary mode, one that cannot seek (``zipfile``
    and ``np.savez`` write to it as a stream).
  """
  if mode not in ("w", "wb"):
    raise ValueError(f"mode={mode!r}: atomic_open writes whole files ('w' or 'wb').")
  path = epath.Path(path)
  tmp = temporary(path)
  try:
    with tmp.open(mode) as f:
      if mode == "w" or not is_remote(path):
        yield f
      else:
        stream = _Stream(f)
        try:
          yield stream
        finally:
          stream.close()
  except BaseException:
    with contextlib.suppress(Exception):  # best effort: the error that got here is the one to report
      tmp.unlink(missing_ok=True)
    raise
  tmp.replace(path)


def write_bytes(path: PathLike, data: bytes) -> None:
  """Writes ``data`` to ``path`` atomically (:func:`atomic_open`)."""
  with atomic_open(path, "wb") as f:
    f.write(data)


def write_text(path: PathLike, text: str) -> None:
  """Writes ``text`` (UTF-8) to ``path`` atomically (:func:`atomic_open`)."""
  with atomic_open(path, "w") as f:
    f.write(text)


def append_text(path: PathLike, text: str) -> None:
  """Appends ``text`` to ``path`` (created if missing).

  Objects in a bucket cannot be appended to: there the file is read and written
  again whole (an object is replaced whole, so a reader sees the old or the new
  contents, never a part).
  """
  path = epath.Path(path)
  if not is_remote(path):
    with path.open("a") as f:
      f.write(text)
    return
  old = path.read_text() if path.exists() else ""
  path.write_text(old + text)

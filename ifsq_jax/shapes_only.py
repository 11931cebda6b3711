"""Frozen networks without their weights, for ahead-of-time compilation (``--compile_only``).

Inside :func:`enabled`, the loaders of frozen networks (the tokenizer of a
generator, the DINOv2 REPA target) read only the architecture and return
parameters as ``jax.ShapeDtypeStruct`` leaves, so the train steps of a paper-size
run compile on a laptop, or for a TPU topology, before any weights exist:

* ``config.tokenizer`` may then also name a tokenizer *config file*
  (``configs/ifsq_f16_d4.py[:variant]``), besides a work dir or converted directory
  (whose ``config.json`` alone is read);
* ``config.repa.path`` may be empty for the DINOv2 target (DINOv2-B/14, the paper's).
"""

from __future__ import annotations

import contextlib
import types
from typing import Any, Callable, Iterator

import flax.linen as nn
import jax
import ml_collections
from etils import epath

_active = False


@contextlib.contextmanager
def enabled() -> Iterator[None]:
  """Frozen networks opened inside this block are shapes only."""
  global _active
  previous, _active = _active, True
  try:
    yield
  finally:
    _active = previous


def active() -> bool:
  """Whether frozen networks are opened as shapes only."""
  return _active


def init_shapes(init: Callable[..., Any], *args: Any) -> Any:
  """The unboxed parameter shapes ``init(key, *args)`` would make (``jax.ShapeDtypeStruct`` leaves)."""
  return nn.meta.unbox(jax.eval_shape(init, jax.random.key(0), *args))


def _split(path: str) -> tuple[str, str]:
  """``FILE.py[:variant]`` -> (FILE.py, variant); the file may be ``gs://...``."""
  file, sep, variant = path.rpartition(":")
  if sep and file.endswith(".py"):
    return file, variant
  return path, ""


def is_config_file(path: str) -> bool:
  """``configs/<name>.py`` or ``configs/<name>.py:variant`` (local or ``gs://``)."""
  return _split(path)[0].endswith(".py")


def load_config_file(path: str) -> ml_collections.ConfigDict:
  """``get_config(variant)`` of a config file ``FILE.py[:variant]``; a ValueError names a missing file."""
  file, variant = _split(path)
  source = epath.Path(file)
  if not source.exists():
    raise ValueError(f"config file {file} does not exist.")
  module = types.ModuleType(f"_shapes_only_{abs(hash(file))}")
  module.__file__ = file
  exec(compile(source.read_text(), file, "exec"), module.__dict__)  # pylint: disable=exec-used
  return module.get_config(variant or None)

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
import importlib.util
import os
from typing import Any, Callable, Iterator

import flax.linen as nn
import jax
import ml_collections

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


def is_config_file(path: str) -> bool:
  """``configs/<name>.py`` or ``configs/<name>.py:variant``."""
  return path.split(":", 1)[0].endswith(".py")


def load_config_file(path: str) -> ml_collections.ConfigDict:
  """``get_config(variant)`` of a config file ``FILE.py[:variant]``; a ValueError names a missing file."""
  file, _, variant = path.partition(":")
  if not os.path.exists(file):
    raise ValueError(f"config file {file} does not exist.")
  spec = importlib.util.spec_from_file_location(f"_shapes_only_{abs(hash(file))}", file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant or None)

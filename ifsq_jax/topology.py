"""TPU topologies on any host: the devices of a named slice, for ahead-of-time compilation.

``python -m ifsq_jax.main --config=... --workdir=... --compile_only --topology=v5e:4x4``
compiles the train steps for a v5e 4 x 4 slice on a CPU machine and prints their
memory per chip. The devices come from libtpu's compiler (the ``tpu`` extra,
``pip install -e ".[tpu]"``); nothing runs on them. Names are
``<generation>:<chips per axis>``: ``v4:2x2x2``, ``v5e:4x4``, ``v5p:2x2x4``,
``v6e:8x8`` (v4 and v5p slices are 3-D, v5e and v6e 2-D).

v4 chips are compiled as megacore (one device of two TensorCores per chip), as
JAX uses them by default.
"""

from __future__ import annotations

import glob
import importlib.util
import math
import os
import re
from typing import Any, Callable

# HBM per chip (GiB), from Cloud TPU's system-architecture pages.
HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}
_DIMS = {"v4": 3, "v5e": 2, "v5p": 3, "v6e": 2}


def on_tpu_vm() -> bool:
  """Whether this is a TPU host: libtpu is installed and TPU chips' device files exist."""
  chips = os.path.exists("/dev/accel0") or bool(glob.glob("/dev/vfio/[0-9]*"))
  return chips and importlib.util.find_spec("libtpu") is not None


def parse(name: str) -> tuple[str, tuple[int, ...]]:
  """``'v5e:4x4'`` -> ``('v5e', (4, 4))``; a ValueError names what is valid."""
  match = re.fullmatch(r"(v4|v5e|v5p|v6e):(\d+(?:x\d+)+)", name)
  generation = match.group(1) if match else None
  shape = tuple(int(s) for s in match.group(2).split("x")) if match else ()
  if not match or len(shape) != _DIMS[generation] or min(shape) < 1:
    raise ValueError(f"--topology={name!r} is not valid; use <generation>:<chips per axis> with generation one of "
                     f"{tuple(HBM_GIB)} (3 axes for v4 and v5p, 2 for v5e and v6e), e.g. v4:2x2x4, v5e:4x4, "
                     "v5p:2x2x2, v6e:8x8.")
  return generation, shape


def chips(name: str) -> int:
  """Number of chips of a named topology."""
  return math.prod(parse(name)[1])


def devices(name: str, num_slices: int = 1) -> list[Any]:
  """The compile-only devices of ``num_slices`` slices of topology ``name`` (one per chip).

  Raises:
    ValueError: a bad name, or libtpu is not installed.
  """
  generation, _ = parse(name)
  if num_slices < 1:
    raise ValueError(f"num_slices={num_slices} must be >= 1.")
  if importlib.util.find_spec("libtpu") is None:
    raise ValueError(f"--topology={name} needs libtpu, TPU's compiler: pip install -e \".[tpu]\" (it installs on "
                     "any Linux x86-64 host).")
  # libtpu asks the TPU VM's metadata for these when they are unset, and logs an error on other hosts.
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-1")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  # Only compiling: no TPU is held, so several processes (test workers, a bench) may load libtpu at once.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  options = {"chip_config_name": "megacore"} if generation == "v4" else {}
  if num_slices > 1:
    options["num_slices"] = num_slices
  return list(topologies.get_topology_desc(platform="tpu", topology_name=name, **options).devices)


def largest_fitting(fits: Callable[[int], bool], guess: int) -> int:
  """The largest batch ``b >= 1`` with ``fits(b)``, searched from ``guess``; 0 when 1 does not fit.

  Memory grows with the batch, so ``fits`` is taken to be true up to some batch and false above it. Steps
  away from ``guess`` double until a fitting and a failing batch bracket the answer, then the bracket is
  bisected: a good guess costs two calls (``guess`` fits, ``guess + 1`` does not).
  """
  guess = max(1, guess)
  lo, hi = (guess, None) if fits(guess) else (None, guess)
  step = 1
  while lo is None:
    if hi == 1:
      return 0
    candidate = max(1, hi - step)
    lo, hi = (candidate, hi) if fits(candidate) else (None, candidate)
    step *= 2
  while hi is None:
    candidate = lo + step
    lo, hi = (candidate, None) if fits(candidate) else (lo, candidate)
    step *= 2
  while hi - lo > 1:
    mid = (lo + hi) // 2
    lo, hi = (mid, hi) if fits(mid) else (lo, mid)
  return lo

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
from typing import Any, Callable, Mapping

# HBM per chip (GiB), from Cloud TPU's system-architecture pages.
HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}
# Peak dense bfloat16 TFLOP/s per chip, from the same pages (and NVIDIA's H100 SXM data sheet, without sparsity).
PEAK_BF16_TFLOPS = {"v4": 275.0, "v5e": 197.0, "v5p": 459.0, "v6e": 918.0, "h100": 989.0}
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


def largest_fitting(peak: Callable[[int], float], limit: float, guess: int,
                    known: Mapping[int, float] | None = None) -> int:
  """The largest batch ``b >= 1`` with ``peak(b) <= limit``, searched from ``guess``; 0 when 1 does not fit.

  ``peak(b)`` is the memory a batch needs (``math.inf`` where the compiler refuses it), taken to grow with the
  batch; ``known`` holds peaks already measured. After ``guess``, each batch is read off the line through the
  two known peaks nearest the limit, so an about-linear peak costs two calls from a good guess (``guess`` fits,
  ``guess + 1`` does not) and few from a poor one. Against a peak far from linear the search stays logarithmic:
  steps out of a one-sided bracket at least double (and up, at most double the batch), and where the line
  moved the same end of the bracket twice running, the next batch is the bracket's middle (unless the line
  reads next to an end: that one is tried once first).
  """
  peaks = dict(known or {})

  def line(a: int, b: int) -> int | None:  # the batch at which the line through a's and b's peaks meets the limit
    pa, pb = peaks[a], peaks[b]
    if not (math.isfinite(pa) and math.isfinite(pb)) or (pb - pa) * (b - a) <= 0:
      return None
    return math.floor(a + (limit - pa) * (b - a) / (pb - pa))

  batch, step = max(1, guess), 1
  by_line, moved = False, []  # moved: for each step by the line inside a bracket, whether its batch fitted
  probed = False  # the last step tried the batch next to an end that the line read
  while True:
    if batch not in peaks:
      peaks[batch] = peak(batch)
    if by_line:
      moved.append(peaks[batch] <= limit)
    lo = max((b for b, p in peaks.items() if p <= limit), default=0)
    hi = min((b for b, p in peaks.items() if p > limit and b > lo), default=None)
    if hi is not None and hi - lo <= 1:
      return lo
    finite = sorted(b for b, p in peaks.items() if math.isfinite(p))
    by_line = False
    if hi is None:  # all fit so far: up by the line (at most doubling the batch), or by a step that doubles
      read = line(*finite[-2:]) if len(finite) > 1 else None
      probe = read is not None and read <= lo and not probed
      batch, step, probed = lo + 1 if probe else max(lo + step, min(read or 0, 2 * lo)), step * 2, probe
    elif lo == 0:  # none fits so far: down by the line, at least doubling the step
      read = line(*finite[:2]) if len(finite) > 1 else None
      batch, step = max(1, min(hi if read is None else read, hi - step)), step * 2
    else:  # bracketed: by the line, or the middle where the line creeps
      read = line(lo, hi)
      read = None if read is None else min(max(read, lo + 1), hi - 1)
      creeping = moved[-2:] in ([True, True], [False, False])
      probe = creeping and read in (lo + 1, hi - 1) and not probed
      if read is None or (creeping and not probe):
        batch, moved, probed = (lo + hi) // 2, [], False
      else:
        batch, by_line, probed = read, True, probe

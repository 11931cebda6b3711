"""Host memory of the CPU backend, which its training speed depends on.

:func:`setup` is what the command-line entry points call first. It does two things.

XLA's CPU scheduler, by default, orders a program's operations so that
independent ones can run at the same time, which keeps their buffers live
together; on a few cores they mostly slow each other down.
:func:`use_memory_scheduler` selects XLA's memory-optimised scheduler instead
(through ``XLA_FLAGS``, before JAX's first computation). For the f16-d4
tokenizer's full generator step (128x128, batch 4, 2 cores) the temporaries
drop from 5.4 to 1.3 GiB, the process's peak from 11.4 to 7.5 GiB, and the step
from 15.1 s to 13.9 s (the L1-only step from 11.6 s to 10.1 s).

XLA's CPU runtime allocates a program's buffers with malloc when it runs and
frees them when it ends: gigabytes for a tokenizer training step. By default
glibc hands blocks that large back to the operating system (``mmap``, trimming,
per-thread arenas), so every step faults all of their pages in again, zero-filled
by the kernel. For the f16-d4 tokenizer's full generator step (128x128, batch 4,
2 cores) that is about 0.5 million page faults and 3-6 s of kernel time per step
(1.5 million and 6-8 s with XLA's default scheduler): 12.5 s a step, against
9.7 s once freed memory is kept.

:func:`keep_freed_memory` sets glibc to keep it: one malloc arena, no ``mmap``
for large blocks, no trimming. Later steps then reuse the same pages. The price
is memory: the process's resident size never shrinks and fragments above the
peak under glibc's own settings (9.1 GiB against 7.5 GiB in the case above, 11.1 against 9.7 GiB
at 256x256; with XLA's scheduler, 15.3 against 11.4 GiB). :func:`setup` calls
:func:`from_env`, which keeps freed memory for CPU runs unless
``IFSQ_JAX_KEEP_FREED_MEMORY=0`` (and, with ``=1``, on accelerator hosts too).
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import os
import sys

import jax

from ifsq_jax import topology

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
ENV = "IFSQ_JAX_KEEP_FREED_MEMORY"
_SCHEDULER_OPTION = "xla_cpu_enable_concurrency_optimized_scheduler"


def setup() -> bool:
  """:func:`use_memory_scheduler`, then :func:`from_env`; returns whether freed memory is kept.

  Call it before JAX's first computation (the command-line entry points do).
  """
  use_memory_scheduler()
  return from_env()


def use_memory_scheduler() -> bool:
  """Adds ``--xla_cpu_enable_concurrency_optimized_scheduler=false`` to ``XLA_FLAGS`` for CPU runs.

  XLA reads ``XLA_FLAGS`` once, at its first computation: call this before. An
  ``XLA_FLAGS`` that already sets the option is left as it is, and so is a
  process that will run on an accelerator (``JAX_PLATFORMS`` or
  ``jax.config.jax_platforms`` names another platform first, or neither is set
  and a GPU plugin is installed, or libtpu on a host with TPU chips).

  Returns:
    Whether the flag was added.
  """
  flags = os.environ.get("XLA_FLAGS", "")
  if _SCHEDULER_OPTION in flags or not _runs_on_cpu():
    return False
  os.environ["XLA_FLAGS"] = f"{flags} --{_SCHEDULER_OPTION}=false".strip()
  return True


def _runs_on_cpu() -> bool:
  platforms = os.environ.get("JAX_PLATFORMS", "") or (jax.config.jax_platforms or "")
  if platforms:
    return platforms.split(",")[0].strip() == "cpu"
  plugins = importlib.metadata.entry_points(group="jax_plugins")
  # libtpu alone (the tpu extra on a host without TPU chips, to compile for TPU topologies) runs on the CPU.
  return not plugins and not topology.on_tpu_vm()


def from_env() -> bool:
  """:func:`keep_freed_memory` unless ``IFSQ_JAX_KEEP_FREED_MEMORY=0``, or the run targets an accelerator.

  ``IFSQ_JAX_KEEP_FREED_MEMORY=1`` keeps freed memory on any platform, ``0``
  never; unset, it is kept for CPU runs (see :func:`use_memory_scheduler` for
  how the platform is told).

  Raises:
    ValueError: the variable is set to something other than ``0`` or ``1``.
  """
  value = os.environ.get(ENV, "").strip()
  if value not in ("", "0", "1"):
    raise ValueError(f"{ENV}={value!r}: expected 0 (give freed memory back) or 1 (keep it), or unset (keep it on CPU)")
  if value == "0" or (not value and not _runs_on_cpu()):
    return False
  return keep_freed_memory()


def keep_freed_memory() -> bool:
  """Makes glibc keep freed memory for reuse; returns whether it was set.

  Call it before JAX's first computation (threads started earlier keep their
  own malloc arena). A no-op returning False outside Linux with glibc.
  """
  if not sys.platform.startswith("linux"):
    return False
  try:
    mallopt = ctypes.CDLL("libc.so.6").mallopt
  except (OSError, AttributeError):
    return False
  mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
  # A threshold of -1 is read as the largest size_t: never trim.
  settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))
  return all(mallopt(option, value) == 1 for option, value in settings)

"""Keeping freed host memory in the process, which the CPU backend's speed depends on.

XLA's CPU runtime allocates a program's buffers with malloc when it runs and
frees them when it ends: gigabytes for a tokenizer training step. By default
glibc hands blocks that large back to the operating system (``mmap``, trimming,
per-thread arenas), so every step faults all of their pages in again, zero-filled
by the kernel. For the f16-d4 tokenizer's full generator step (128x128, batch 4,
2 cores) that is about 1.5 million page faults and 6 s of kernel time per step:
14.5 s a step, against 11.2 s once freed memory is kept.

:func:`keep_freed_memory` sets glibc to keep it: one malloc arena, no ``mmap``
for large blocks, no trimming. Later steps then reuse the same pages. The price
is memory: the process's resident size never shrinks and fragments above the
default's peak (15.3 GiB against 11.4 GiB in the case above; the 256x256 batch 2
generator step that fits in 24 GiB by default runs out of memory). So it is
opt-in: the command-line entry points call :func:`from_env`, which turns it on
when ``IFSQ_JAX_KEEP_FREED_MEMORY=1``.
"""

from __future__ import annotations

import ctypes
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
ENV = "IFSQ_JAX_KEEP_FREED_MEMORY"


def from_env() -> bool:
  """:func:`keep_freed_memory` when the environment variable ``IFSQ_JAX_KEEP_FREED_MEMORY`` is ``1``."""
  return os.environ.get(ENV, "0") == "1" and keep_freed_memory()


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

"""Where classifier-free guidance applies: one meaning of ``cfg_interval`` for the DiT and LlamaGen samplers.

``cfg_interval = (lo, hi)`` is a range of *sampling progress* p, a fraction of
the trajectory from 0 (its start) towards 1 (its end). A model evaluation at
progress p is guided iff ``lo <= p < hi`` (the start included, the end
excluded); elsewhere the conditional prediction is used unguided.

* DiT (``sampling/flow.py``): p is the flow time t of the evaluation (0 the
  noise, 1 the data). The samplers never evaluate the model at t = 1.
* LlamaGen (``sampling/autoregressive.py``): p = n / N for token n of N (every
  sub-token of a factorized position shares its position's p).

So p < 1 always, and ``hi = 1`` reaches the last evaluation: ``(0, 1)``
guides everywhere and ``(lo, 1)`` is the reference DiT's
``cfg_interval_start = lo`` (guided iff t >= lo). ``-1``, the reference
LlamaGen's "every token", is accepted and means ``(0, 1)``. The reference
LlamaGen's other integers k (guide tokens 0..k+1) are refused: ``(0, (k + 2) / N)``
is that interval for N tokens.
"""

from __future__ import annotations

from typing import Any

import numpy as np

ALWAYS = (0.0, 1.0)
FORMS = "(lo, hi) with 0 <= lo <= hi <= 1 (guided iff lo <= p < hi for sampling progress p in [0, 1)), or -1 for always"


def interval(cfg_interval: Any) -> tuple[float, float]:
  """``cfg_interval`` as ``(lo, hi)`` floats; ``-1`` (or ``(-1,)``) becomes ``(0, 1)``.

  Raises:
    ValueError: naming the value and the valid forms.
  """
  value = cfg_interval
  if isinstance(value, (list, tuple, np.ndarray)) and len(value) == 1:
    value = value[0]  # "--cfg_interval -1" parses to (-1.0,)
  if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
    if value == -1:
      return ALWAYS
    raise ValueError(f"cfg_interval={cfg_interval!r} is not valid; use {FORMS}. (The reference LlamaGen's integer k, "
                     "which guides tokens 0..k+1, is (0, (k + 2) / N) for N tokens.)")
  try:
    lo, hi = (float(v) for v in value)
  except (TypeError, ValueError):
    raise ValueError(f"cfg_interval={cfg_interval!r} is not valid; use {FORMS}.") from None
  if not 0.0 <= lo <= hi <= 1.0:
    raise ValueError(f"cfg_interval={cfg_interval!r} is not valid; use {FORMS}.")
  return lo, hi


def always(cfg_interval: tuple[float, float]) -> bool:
  """Whether every evaluation is guided (p < 1 always, so ``hi = 1`` with ``lo = 0``)."""
  lo, hi = interval(cfg_interval)
  return lo <= 0.0 and hi >= 1.0


def guided(progress: Any, cfg_interval: tuple[float, float]) -> Any:
  """Whether an evaluation at ``progress`` p is guided: ``lo <= p < hi``; numpy or jax arrays, any shape."""
  lo, hi = interval(cfg_interval)
  return (progress >= lo) & (progress < hi)

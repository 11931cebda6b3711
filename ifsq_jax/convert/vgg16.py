"""torchvision VGG16 (+ LPIPS linear heads) -> params of :class:`ifsq_jax.nets.lpips.LPIPS` (``net="vgg16"``).

Two tables of the converter engine (:mod:`ifsq_jax.convert.engine`):
``features.{0,2,5,...,28}.weight`` (O, I, 3, 3) -> ``features/conv_{0..12}/kernel``
(3, 3, I, O); the LPIPS heads ``lin{i}.model.1.weight`` (1, C, 1, 1) of
taming-transformers' / lpips' ``vgg.pth`` -> ``lin_{i}/kernel`` (1, 1, C, 1). The
classifier is not used. The architecture is fixed and the shapes are the
checkpoint's, so every layer must be in the checkpoint.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ifsq_jax.convert import engine, torch_io
from ifsq_jax.models import saved

CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
TRUNK = [e for i, idx in enumerate(CONV_INDICES) for e in engine.conv(f"features.{idx}", f"features/conv_{i}")]
HEADS = [e for i in range(5) for e in engine.conv(f"lin{i}.model.1", f"lin_{i}", bias=False)]


def convert(trunk: dict[str, np.ndarray], lin: dict[str, np.ndarray] | None = None,
            allow_partial: bool = False, dropped: engine.Dropped | None = None) -> dict[str, Any]:
  """VGG16 trunk (+ LPIPS heads) -> {"params": ...}; every conv layer must be in the checkpoint.

  With ``allow_partial``, entries that do not map are dropped, listed in a warning and added to ``dropped``.
  """
  trunk = {k.removeprefix("net.").removeprefix("slice"): v for k, v in trunk.items()}
  params = engine.to_params(trunk, TRUNK, model="VGG16", allow_partial=allow_partial, dropped=dropped,
                            ignore=("classifier.",))
  if lin is not None:
    params.update(engine.to_params(lin, HEADS, model="LPIPS heads", allow_partial=allow_partial, dropped=dropped))
  return {"params": params}


def convert_file(checkpoint: str, out_dir: str, allow_partial: bool = False, lpips_lin: str | None = None) -> str:
  """Converts torchvision's VGG16 (and the LPIPS heads) into ``out_dir``; returns a summary."""
  lin = torch_io.read_state_dict(lpips_lin) if lpips_lin else None
  dropped = engine.Dropped()
  variables = convert(torch_io.read_state_dict(checkpoint), lin, allow_partial, dropped)
  saved.save(out_dir, variables["params"], {"kind": "vgg16", "lpips_heads": lin is not None})
  return "VGG16" + (" + LPIPS heads" if lin is not None else "") + (f" ({dropped.summary()})" if dropped else "")


def load(path: str) -> dict[str, Any]:
  """{"params": ...} for ``LPIPS("vgg16")`` / ``vgg16_pool_features`` from a converted directory."""
  params, _ = saved.load(path, "vgg16")
  return {"params": params}

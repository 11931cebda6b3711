"""torchvision VGG16 (+ LPIPS linear heads) -> params of :class:`ifsq_jax.nets.lpips.LPIPS` (``net="vgg16"``).

``features.{0,2,5,...,28}.weight`` (O, I, 3, 3) -> ``features/conv_{0..12}/kernel``
(3, 3, I, O); the LPIPS heads ``lin{i}.model.1.weight`` (1, C, 1, 1) of
taming-transformers' / lpips' ``vgg.pth`` -> ``lin_{i}/kernel`` (1, 1, C, 1). The
classifier is not used.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ifsq_jax.convert import torch_io

CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)


def convert(trunk: dict[str, np.ndarray], lin: dict[str, np.ndarray] | None = None,
            allow_partial: bool = False, dropped: torch_io.Dropped | None = None) -> dict[str, Any]:
  """VGG16 trunk (+ LPIPS heads) -> {"params": ...}; every conv layer must be in the checkpoint.

  With ``allow_partial``, entries that do not map are dropped, listed in a warning and added to ``dropped``.
  """
  trunk = {k.removeprefix("net.").removeprefix("slice"): v for k, v in trunk.items()}
  used: set[str] = set()
  features = {}
  for i, idx in enumerate(CONV_INDICES):
    w, b = f"features.{idx}.weight", f"features.{idx}.bias"
    if w not in trunk or b not in trunk:
      raise torch_io.ConversionError(f"the checkpoint has no entry {w!r}: it is not a torchvision VGG16 state dict.")
    used.update((w, b))
    features[f"conv_{i}"] = {"kernel": np.asarray(trunk[w], np.float32).transpose(2, 3, 1, 0),
                             "bias": np.asarray(trunk[b], np.float32)}
  torch_io.check_all_used(trunk, used, ignore=("classifier.",), allow_partial=allow_partial, dropped=dropped)
  params: dict[str, Any] = {"features": features}
  if lin is not None:
    for i in range(5):
      key = f"lin{i}.model.1.weight"
      if key not in lin:
        raise torch_io.ConversionError(f"the LPIPS heads file has no entry {key!r} (expected lin0..lin4).")
      params[f"lin_{i}"] = {"kernel": np.asarray(lin[key], np.float32).transpose(2, 3, 1, 0)}
  return {"params": params}


def convert_file(checkpoint: str, out_dir: str, allow_partial: bool = False, lpips_lin: str | None = None) -> str:
  lin = torch_io.read_state_dict(lpips_lin) if lpips_lin else None
  dropped = torch_io.Dropped()
  variables = convert(torch_io.read_state_dict(checkpoint), lin, allow_partial, dropped)
  torch_io.save_converted(out_dir, variables["params"], {"kind": "vgg16", "lpips_heads": lin is not None})
  return "VGG16" + (" + LPIPS heads" if lin is not None else "") + (f" ({dropped.summary()})" if dropped else "")


def load(path: str) -> dict[str, Any]:
  """{"params": ...} for ``LPIPS("vgg16")`` / ``vgg16_pool_features`` from a converted directory."""
  params, _ = torch_io.load_converted(path, "vgg16")
  return {"params": params}

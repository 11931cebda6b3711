"""pytorch-fid Inception-v3 weights (``pt_inception-2015-12-05-6726825d.pth``) -> :class:`InceptionV3FID` variables.

Module names match; ``X.conv.weight`` (O, I, kH, kW) -> ``X/conv/kernel``
(kH, kW, I, O), ``X.bn.{weight,bias}`` -> ``X/bn/{scale,bias}``,
``X.bn.running_{mean,var}`` -> ``batch_stats`` ``X/bn/{mean,var}``, and the 1008-way
classifier ``fc.weight`` (K, 2048) -> ``fc/kernel`` (2048, K), ``fc.bias`` ->
``fc/bias`` (for the Inception Score). A checkpoint without ``fc`` converts to
the features only (pool and spatial), as directories converted before the
classifier was kept. ``AuxLogits`` and ``num_batches_tracked`` are not used.
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import numpy as np

from ifsq_jax.convert import torch_io
from ifsq_jax.nets.inception import CLASSES, FEATURES, InceptionV3FID

IGNORED = ("AuxLogits.",)
FC = ("fc.weight", "fc.bias")


def _init_fn():
  return InceptionV3FID().init(jax.random.key(0), np.zeros((1, 299, 299, 3), np.float32))


def _expected() -> dict[str, Any]:
  return jax.eval_shape(_init_fn)


def convert(sd: dict[str, np.ndarray], allow_partial: bool = False,
            dropped: torch_io.Dropped | None = None) -> dict[str, Any]:
  """State dict -> {"params": ..., "batch_stats": ...}.

  With ``allow_partial``, unmapped entries are dropped and variables the
  checkpoint lacks keep their initial values; both are listed in a warning and
  added to ``dropped``.
  """
  sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
  used: set[str] = set()
  missing: list[str] = []
  torch_name = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}

  def take(path, leaf):
    names = [p.key for p in path][1:]  # drop the collection ("params" / "batch_stats")
    key = ".".join(names[:-1] + [torch_name[names[-1]]])
    if key not in sd:
      if allow_partial:
        missing.append("/".join([path[0].key] + names))
        return None
      raise torch_io.ConversionError(f"the checkpoint has no entry {key!r}: it is not a pytorch-fid Inception-v3.")
    used.add(key)
    v = np.asarray(sd[key], np.float32)
    if names[-1] == "kernel":
      v = v.transpose(2, 3, 1, 0)
    if v.shape != leaf.shape:
      raise torch_io.ConversionError(f"{key} has shape {v.shape}, expected {leaf.shape}.")
    return v

  out = jax.tree_util.tree_map_with_path(take, _expected())
  fc = _classifier(sd)
  used.update(FC if fc is not None else ())
  torch_io.check_all_used(sd, used, ignore=IGNORED, allow_partial=allow_partial, dropped=dropped)
  if missing:
    torch_io.report_dropped(left_at_init=missing, dropped=dropped)
    out = jax.tree.map(lambda v, i: np.asarray(i) if v is None else v, out, _init_fn(), is_leaf=lambda x: x is None)
  if fc is None:
    logging.info("The checkpoint has no classifier (fc): the converted weights give pool and spatial features, "
                 "not the logits of the Inception Score.")
  else:  # optional, so it is not among the expected variables (which the features alone need)
    out = {**out, "params": {**out["params"], "fc": fc}}
  return out


def _classifier(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray] | None:
  """``fc.weight`` (K, 2048), ``fc.bias`` (K,) -> {"kernel": (2048, K), "bias": (K,)}; None without them."""
  present = [k for k in FC if k in sd]
  if not present:
    return None
  if len(present) == 1:
    raise torch_io.ConversionError(f"the checkpoint has {present[0]} but not {set(FC) - set(present)}.")
  w, b = np.asarray(sd["fc.weight"], np.float32), np.asarray(sd["fc.bias"], np.float32)
  if w.shape != (CLASSES, FEATURES) or b.shape != (CLASSES,):
    raise torch_io.ConversionError(f"fc.weight {w.shape} / fc.bias {b.shape}, expected ({CLASSES}, {FEATURES}) / "
                                   f"({CLASSES},) (the 1008-way classifier of the FID Inception).")
  return {"kernel": np.ascontiguousarray(w.T), "bias": b}


def convert_file(checkpoint: str, out_dir: str, allow_partial: bool = False) -> str:
  dropped = torch_io.Dropped()
  variables = convert(torch_io.read_state_dict(checkpoint), allow_partial, dropped)
  torch_io.save_converted(out_dir, variables, {"kind": "inception"})
  return "InceptionV3FID" + (f" ({dropped.summary()})" if dropped else "")


def load(path: str, **fields):
  """(InceptionV3FID module, variables) from a converted directory; ``fields`` set the module's (``preprocess``)."""
  variables, _ = torch_io.load_converted(path, "inception")
  return InceptionV3FID(**fields), variables


def has_classifier(variables: dict[str, Any]) -> bool:
  """Whether converted variables hold ``fc`` (the logits outputs need it; older conversions lack it)."""
  return "fc" in variables["params"]

"""pytorch-fid Inception-v3 weights (``pt_inception-2015-12-05-6726825d.pth``) -> :class:`InceptionV3FID` variables.

Module names match, so the converter engine's table (:mod:`ifsq_jax.convert.engine`)
is the model's variables renamed: ``X.conv.weight`` (O, I, kH, kW) -> ``X/conv/kernel``
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

from ifsq_jax.convert import engine, torch_io
from ifsq_jax.convert.engine import Entry
from ifsq_jax.models import saved
from ifsq_jax.nets import inception as inception_net
from ifsq_jax.nets.inception import CLASSES, FEATURES, InceptionV3FID

IGNORED = ("AuxLogits.",)
FC = ("fc.weight", "fc.bias")
_TORCH_NAME = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


def _init_fn():
  return InceptionV3FID().init(jax.random.key(0), np.zeros((1, 299, 299, 3), np.float32))


def _expected() -> dict[str, Any]:
  return jax.eval_shape(_init_fn)


def key_map(expected: dict[str, Any]) -> list[Entry]:
  """The state-dict key of every variable path of ``expected`` ({"params/X/conv/kernel": shape, ...})."""
  entries = []
  for path in expected:
    _, *names = path.split("/")  # the collection ("params" / "batch_stats") is not in the key
    key = ".".join(names[:-1] + [_TORCH_NAME[names[-1]]])
    entries.append(Entry(key, path, "conv" if names[-1] == "kernel" else "copy"))
  return entries


def convert(sd: dict[str, np.ndarray], allow_partial: bool = False,
            dropped: engine.Dropped | None = None) -> dict[str, Any]:
  """State dict -> {"params": ..., "batch_stats": ...}.

  With ``allow_partial``, unmapped entries are dropped and variables the
  checkpoint lacks keep their initial values; both are listed in a warning and
  added to ``dropped``.
  """
  sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
  expected = engine.flat(_expected())
  fc = _classifier(sd)
  out = engine.to_params(sd, key_map(expected), expected, lambda: engine.flat(_init_fn()), model="Inception-v3",
                         hint="it is not a pytorch-fid Inception-v3", allow_partial=allow_partial, dropped=dropped,
                         ignore=IGNORED, used=FC if fc is not None else ())
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
  dropped = engine.Dropped()
  variables = convert(torch_io.read_state_dict(checkpoint), allow_partial, dropped)
  saved.save(out_dir, variables, {"kind": "inception"})
  return "InceptionV3FID" + (f" ({dropped.summary()})" if dropped else "")


load = saved.load_inception  # the converted directory's reader lives with its format
has_classifier = inception_net.has_classifier

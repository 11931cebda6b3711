"""``load_model``: a trained generator and its params in one call.

Opens a directory written by ``python -m ifsq_jax.convert dit`` (an official DiT
checkpoint) or a DiT training work dir (its ``config.json`` has ``task: "dit"``
and the :class:`~ifsq_jax.models.dit.DiT` fields under ``model``; its Orbax
checkpoints hold ``params`` and ``ema_params``).

Usage::

  module, params = ifsq_jax.load_model("out/dit")
  v = module.apply({"params": params}, x, t, y)   # x (B, H, W, C), t (B,), y (B,)
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax
import jax.numpy as jnp
from etils import epath

from ifsq_jax.convert import dit as dit_convert
from ifsq_jax.models.dit import DiT


def _module(fields: dict[str, Any], dtype: Any, where: str) -> DiT:
  names = {f.name for f in dataclasses.fields(DiT)} - {"parent", "name", "dtype"}
  unknown = sorted(set(fields) - names)
  if unknown:
    raise ValueError(f"{where}: the model config has fields {unknown} that DiT lacks; its fields are {sorted(names)}.")
  return DiT(**fields, dtype=dtype)


def load_model(path: str, ema: bool = True, dtype: Any = jnp.float32) -> tuple[DiT, dict[str, Any]]:
  """(module, params) of a converted DiT directory, or of a DiT work dir, its ``checkpoints`` dir or one step dir.

  From a work dir: the newest readable checkpoint (an unreadable newer one is
  skipped with a warning), its EMA weights by default (``ema=False``: the trained
  weights), and the fields saved with that step (else the work dir's
  ``config.json``); fields a config lacks take their defaults.

  Args:
    path: The directory.
    ema: EMA weights (work dirs only; a converted directory holds the weights it was converted from).
    dtype: Compute dtype of the returned module (params are float32 either way).

  Raises:
    FileNotFoundError: ``path`` holds neither a converted DiT nor a work dir.
    ValueError: a work dir of another task, or a model config with fields DiT lacks.
  """
  root = epath.Path(path)
  if dit_convert.exists(str(root)):
    fields, params = dit_convert.load(str(root))
    return _module(fields, dtype, str(root)), params
  workdir = next((d for d in (root, root.parent, root.parent.parent) if (d / "config.json").exists()), None)
  if workdir is None:
    raise FileNotFoundError(f"{path} is neither a DiT work dir (config.json + checkpoints/), a checkpoint of one, nor "
                            "a converted DiT directory (params.safetensors + config.json written by "
                            "python -m ifsq_jax.convert dit).")
  run_config = json.loads((workdir / "config.json").read_text())
  task = run_config.get("task")
  if task != "dit":
    hint = " Open tokenizers with ifsq_jax.load_tokenizer." if task == "tokenizer" else ""
    raise ValueError(f"{workdir} holds a {task!r} run; load_model opens DiT runs (task 'dit').{hint}")
  # Imported here: Orbax is needed only for work dirs.
  from ifsq_jax import checkpoint  # pylint: disable=g-import-not-at-top
  field = "ema_params" if ema else "params"
  step, restored = checkpoint.restore_fields(root, {field: None})
  # The config saved with the step: config.json is rewritten by any later run in the work dir.
  config = checkpoint.read_saved_config(checkpoint.step_directory(root, step)) or run_config
  if not isinstance(config.get("model"), dict):
    raise ValueError(f"{workdir}: the run config has no 'model' group with the DiT fields.")
  return _module(config["model"], dtype, str(workdir)), jax.device_get(restored[field])

"""``load_model``: a trained generator and its params in one call.

Opens a directory written by ``python -m ifsq_jax.convert dit`` or ``... llamagen``
(an official checkpoint), or a training work dir of either generator (its
``config.json`` has ``task: "dit"`` or ``task: "llamagen"`` and the model's fields
under ``model``; its Orbax checkpoints hold ``params`` and ``ema_params``).

Usage::

  module, params = ifsq_jax.load_model("out/dit")
  v = module.apply({"params": params}, x, t, y)   # x (B, H, W, C), t (B,), y (B,)

  module, params = ifsq_jax.load_model("out/llamagen")
  logits = module.apply({"params": params}, tokens, labels)   # tokens (B, N), labels (B,)
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from etils import epath

from ifsq_jax.models import saved
from ifsq_jax.models.dit import DiT
from ifsq_jax.models.llamagen import LlamaGen

# task (work dirs) or kind (converted dirs) -> (module class, reader of a converted directory: (fields, params)).
MODELS: dict[str, tuple[type[DiT] | type[LlamaGen], Callable[[str], tuple[dict[str, Any], dict[str, Any]]]]] = {
    "dit": (DiT, saved.load_dit), "llamagen": (LlamaGen, saved.load_llamagen)}


def _module(cls: type[DiT] | type[LlamaGen], fields: dict[str, Any], dtype: Any, where: str) -> DiT | LlamaGen:
  names = {f.name for f in dataclasses.fields(cls)} - {"parent", "name", "dtype"}
  unknown = sorted(set(fields) - names)
  if unknown:
    raise ValueError(f"{where}: the model config has fields {unknown} that {cls.__name__} lacks; its fields are "
                     f"{sorted(names)}.")
  # JSON gives lists; modules are static jit arguments, so their fields must hash.
  fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
  return cls(**fields, dtype=dtype)


def _converted_kind(path: str) -> str:
  """The ``kind`` of a converted generator directory.

  Raises:
    FileNotFoundError: it has no ``config.json`` to name its kind.
    ValueError: the directory holds another kind, naming it and the valid ones.
  """
  kind = saved.kind(path)
  if kind is None:
    raise FileNotFoundError(f"{path} holds {saved.PARAMS} but no {saved.CONFIG} naming its kind; convert it again "
                            "with python -m ifsq_jax.convert dit or llamagen.")
  if kind not in MODELS:
    raise ValueError(f"{path} holds converted weights of kind={kind!r}; load_model opens the kinds "
                     f"{sorted(MODELS)} (python -m ifsq_jax.convert dit or llamagen).")
  return kind


def is_converted(path: str) -> bool:
  """Whether ``path`` is a directory written by ``python -m ifsq_jax.convert dit`` or ``llamagen``.

  Each kind's own test: its weights file and a ``config.json`` naming that kind.
  """
  return saved.exists(path) and saved.kind(path) in MODELS


def load_model(path: str, ema: bool = True, dtype: Any = jnp.float32) -> tuple[DiT | LlamaGen, dict[str, Any]]:
  """(module, params) of a converted DiT / LlamaGen directory, or of a work dir, its ``checkpoints`` dir or a step dir.

  From a work dir: the newest readable checkpoint (an unreadable newer one is
  skipped with a warning), its EMA weights by default (``ema=False``: the trained
  weights), and the fields saved with that step (else the work dir's
  ``config.json``); fields a config lacks take their defaults.

  Args:
    path: The directory (local or ``gs://...``).
    ema: EMA weights (work dirs only; a converted directory holds the weights it was converted from).
    dtype: Compute dtype of the returned module (params are float32 either way).

  Raises:
    FileNotFoundError: ``path`` holds neither a converted generator nor a work dir.
    ValueError: a work dir of another task, a converted directory of another kind, or a model config with fields
      the model lacks.
  """
  root = epath.Path(path)
  if saved.exists(str(root)):
    cls, read = MODELS[_converted_kind(str(root))]
    fields, params = read(str(root))
    return _module(cls, fields, dtype, str(root)), params
  workdir = next((d for d in (root, root.parent, root.parent.parent) if (d / "config.json").exists()), None)
  if workdir is None:
    raise FileNotFoundError(f"{path} is neither a DiT work dir nor a LlamaGen one (config.json + checkpoints/), a "
                            "checkpoint of one, nor a converted directory (params.safetensors + config.json written "
                            "by python -m ifsq_jax.convert dit or llamagen).")
  run_config = json.loads((workdir / "config.json").read_text())
  task = run_config.get("task")
  if task not in MODELS:
    hint = " Open tokenizers with ifsq_jax.load_tokenizer." if task == "tokenizer" else ""
    raise ValueError(f"{workdir} holds a {task!r} run; load_model opens generator runs (task {' or '.join(MODELS)})."
                     f"{hint}")
  # Imported here: Orbax is needed only for work dirs.
  from ifsq_jax import checkpoint  # pylint: disable=g-import-not-at-top
  field = "ema_params" if ema else "params"
  step, restored = checkpoint.restore_fields(root, {field: None})
  # The config saved with the step: config.json is rewritten by any later run in the work dir.
  config = checkpoint.read_saved_config(checkpoint.step_directory(root, step)) or run_config
  cls = MODELS[task][0]
  if not isinstance(config.get("model"), dict):
    raise ValueError(f"{workdir}: the run config has no 'model' group with the {cls.__name__} fields.")
  return _module(cls, config["model"], dtype, str(workdir)), jax.device_get(restored[field])

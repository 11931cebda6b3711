"""Reading PyTorch checkpoints safely, and the run configs of the official code.

Input: a ``.safetensors`` file, or a ``.pth`` / ``.pt`` / ``.ckpt`` read with
``torch.load(weights_only=True)`` (never unpickling arbitrary code). Every path may be
local or ``gs://...`` (:mod:`ifsq_jax.paths`). The converted output's format lives in
:mod:`ifsq_jax.models.saved` (re-exported here for the converters' callers).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import re

import numpy as np
from etils import epath

from ifsq_jax import paths
from ifsq_jax.convert.engine import Dropped  # pylint: disable=unused-import
from ifsq_jax.models import saved
from ifsq_jax.models.saved import WHERE, ConversionError, flatten, unflatten  # pylint: disable=unused-import

save_converted = saved.save
load_converted = saved.load
exists = saved.exists


def read_state_dict(path: epath.PathLike) -> dict[str, np.ndarray]:
  """A PyTorch state dict as float32/int numpy arrays."""
  return read_checkpoint(path)[0]


def read_checkpoint(path: epath.PathLike, want: Sequence[str] = (), holders: Sequence[str] = (),
                    hint: str = "") -> tuple[dict[str, np.ndarray], dict[str, Any] | None]:
  """(state dict, the run config saved in it or None) of a checkpoint or a bare state dict.

  Args:
    path: A ``.safetensors`` file, or a file ``torch.load(weights_only=True)`` reads.
    want: Entries of a training checkpoint that hold the state dict, in order of preference (e.g. ``("ema",)``).
    holders: The entries that make a file a training checkpoint (e.g. ``("ema", "model")``): if it has one of
      them, one of ``want`` must be there. A file without any is searched for a state dict as a bare one.
    hint: Appended to the message when ``want`` is absent (e.g. which flag takes the other weights).

  Raises:
    FileNotFoundError: no such file.
    ConversionError: the file holds code, or no state dict of tensors, or not the asked one.
  """
  path = epath.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"checkpoint {path} does not exist.")
  if path.name.endswith(".safetensors"):
    return read_safetensors(path), None
  try:
    import torch  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    raise ConversionError(f"reading {path} needs PyTorch (pip install torch==2.13.0), or give a .safetensors file."
                          ) from None
  try:
    obj = _torch_load(path)
  except Exception as e:  # pylint: disable=broad-except
    raise ConversionError(f"{path} is not a plain tensor checkpoint (torch.load(weights_only=True) refused it: "
                          f"{str(e).splitlines()[0][:300]}). Only state dicts of tensors are accepted.") from None
  if not isinstance(obj, dict):
    return _flatten_tensors(obj, str(path)), None
  config = obj.get("config") if isinstance(obj.get("config"), dict) else None
  chosen = next((k for k in want if isinstance(obj.get(k), dict)), None)
  if chosen is None and any(k in obj for k in holders):
    raise ConversionError(f"{path} has no {want[0]!r} state dict; its entries are {sorted(obj)}{hint}.")
  return _flatten_tensors(obj if chosen is None else obj[chosen], str(path)), config


def read_safetensors(path: epath.PathLike) -> dict[str, np.ndarray]:
  """The tensors of a ``.safetensors`` file as numpy arrays (bfloat16 ones as float32, through torch)."""
  data = epath.Path(path).read_bytes()
  from safetensors.numpy import load  # pylint: disable=g-import-not-at-top
  try:
    return dict(load(data))
  except Exception:  # bf16 tensors: go through torch  # pylint: disable=broad-except
    from safetensors.torch import load as load_torch  # pylint: disable=g-import-not-at-top
    return {k: v.float().numpy() for k, v in load_torch(data).items()}


def _torch_load(path: epath.Path) -> Any:
  """``torch.load(weights_only=True)`` of a local file (memory-mapped) or a file in a bucket (read as a stream)."""
  import torch  # pylint: disable=g-import-not-at-top
  if not paths.is_remote(path):
    # mmap: only the weights asked for are read (a training checkpoint also holds other weights and the optimizer
    # state); files in torch's legacy (non-zip) format cannot be mapped and are read whole.
    try:
      return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
      if "mmap" not in str(e):
        raise
  with path.open("rb") as f:
    return torch.load(f, map_location="cpu", weights_only=True)


def _flatten_tensors(obj: Any, path: str) -> dict[str, np.ndarray]:
  import torch  # pylint: disable=g-import-not-at-top
  if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
    return {k: v.detach().float().numpy() if v.is_floating_point() else v.numpy() for k, v in obj.items()}
  for key in ("state_dict", "model", "ema_state_dict", "module"):
    if isinstance(obj, dict) and isinstance(obj.get(key), dict):
      return _flatten_tensors(obj[key], path)
  raise ConversionError(f"{path} holds no state dict of tensors (top-level keys: "
                        f"{list(obj)[:10] if isinstance(obj, dict) else type(obj).__name__}).")


# ------------------------------------------------------------------ the official runs' configs

DINOV2_WIDTHS = {"s": 384, "b": 768, "l": 1024, "g": 1536}  # REPA's dinov2-vit-{s,b,l,g}


def read_training_checkpoint(checkpoint: epath.PathLike, config: epath.PathLike | None, use_ema: bool,
                             config_name: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """(state dict, run config) of an official generator checkpoint (``model``, ``ema``, ``opt``, ``config``).

  Args:
    checkpoint: The checkpoint, or a bare state dict.
    config: The run's YAML; None: the ``config`` saved in the checkpoint.
    use_ema: Take ``ema`` (else ``model``).
    config_name: The YAML's file name in the official runs, for the message (``run.yaml``, ``config.yaml``).
  """
  sd, run = read_checkpoint(checkpoint, want=("ema" if use_ema else "model",), holders=("ema", "model"),
                            hint=" (pass --no_ema to convert 'model')" if use_ema else "")
  if config:
    run = read_yaml(config)
  if not isinstance(run, dict) or not run:
    where = f"{config} is not a run config (a YAML mapping)" if config else f"{checkpoint} holds no run config"
    raise ConversionError(f"{where}; pass --config {config_name.split('.')[0].upper()}_YAML (the run's "
                          f"{config_name}).")
  return sd, run


def read_yaml(path: epath.PathLike) -> Any:
  """A run's YAML config."""
  try:
    import yaml  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ConversionError("reading --config needs PyYAML (pip install pyyaml); without --config the "
                          "run config saved in the checkpoint is used.") from None
  try:
    return yaml.safe_load(epath.Path(path).read_text())
  except yaml.YAMLError as e:
    raise ConversionError(f"{path} is not a YAML run config: {str(e)[:300]}") from None


def repa_fields(run: dict[str, Any]) -> dict[str, int]:
  """``repa.{use_repa, enc_type, encoder_depth}`` of a run config -> the ``encoder_depth`` and ``z_dim`` fields.

  ``z_dim`` is the width of the DINOv2 encoder (``dinov2-vit-{s,b,l,g}``), 0 without REPA.
  """
  repa = run.get("repa") or {}
  z_dim, encoder_depth = 0, repa.get("encoder_depth", 8)  # 8: the official train.py's default
  if repa.get("use_repa", False):
    enc_type = str(repa.get("enc_type", ""))
    enc = re.fullmatch(r"dinov2-vit-([sblg])", enc_type)
    if not enc:
      raise ConversionError(f"repa.enc_type={enc_type!r} is not supported; use one DINOv2 encoder, "
                            "dinov2-vit-{s,b,l,g}.")
    z_dim = DINOV2_WIDTHS[enc.group(1)]
  return {"encoder_depth": encoder_depth, "z_dim": z_dim}

"""Reading PyTorch state dicts safely, and writing / reading converted params.

Input: a ``.safetensors`` file, or a ``.pth`` / ``.pt`` / ``.ckpt`` read with
``torch.load(weights_only=True)`` (never unpickling arbitrary code). Output: a
directory with ``params.safetensors`` (the flattened param tree, keys joined with
``/``) and ``config.json`` (what is needed to rebuild the module). Every path may be
local or ``gs://...`` (:mod:`ifsq_jax.paths`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

import numpy as np
from etils import epath

from ifsq_jax import paths


class ConversionError(ValueError):
  """A checkpoint that cannot be converted (unsafe, unmapped or missing keys)."""


def read_state_dict(path: epath.PathLike) -> dict[str, np.ndarray]:
  """A PyTorch state dict as float32/int numpy arrays."""
  path = epath.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"checkpoint {path} does not exist.")
  if path.name.endswith(".safetensors"):
    return read_safetensors(path)
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ConversionError(f"reading {path} needs PyTorch (pip install torch==2.13.0), or give a .safetensors file."
                          ) from None
  try:
    with path.open("rb") as f:
      obj = torch.load(f, map_location="cpu", weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    raise ConversionError(f"{path} is not a plain tensor checkpoint (torch.load(weights_only=True) refused it: "
                          f"{str(e).splitlines()[0][:300]}). Only state dicts of tensors are accepted.") from None
  return _flatten_tensors(obj, str(path))


def read_safetensors(path: epath.PathLike) -> dict[str, np.ndarray]:
  """The tensors of a ``.safetensors`` file as numpy arrays (bfloat16 ones as float32, through torch)."""
  data = epath.Path(path).read_bytes()
  from safetensors.numpy import load  # pylint: disable=g-import-not-at-top
  try:
    return dict(load(data))
  except Exception:  # bf16 tensors: go through torch  # pylint: disable=broad-except
    from safetensors.torch import load as load_torch  # pylint: disable=g-import-not-at-top
    return {k: v.float().numpy() for k, v in load_torch(data).items()}


def _flatten_tensors(obj: Any, path: str) -> dict[str, np.ndarray]:
  import torch  # pylint: disable=g-import-not-at-top
  if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
    return {k: v.detach().float().numpy() if v.is_floating_point() else v.numpy() for k, v in obj.items()}
  for key in ("state_dict", "model", "ema_state_dict", "module"):
    if isinstance(obj, dict) and isinstance(obj.get(key), dict):
      return _flatten_tensors(obj[key], path)
  raise ConversionError(f"{path} holds no state dict of tensors (top-level keys: "
                        f"{list(obj)[:10] if isinstance(obj, dict) else type(obj).__name__}).")


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
  out = {}
  for k, v in tree.items():
    name = f"{prefix}/{k}" if prefix else k
    if isinstance(v, dict):
      out.update(flatten(v, name))
    else:
      out[name] = np.ascontiguousarray(np.asarray(v))
  return out


def unflatten(flat: dict[str, np.ndarray]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for name, v in flat.items():
    node = tree
    *parents, leaf = name.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = v
  return tree


def save_converted(out_dir: epath.PathLike, params: dict[str, Any], config: dict[str, Any]) -> None:
  """Writes ``params.safetensors`` and ``config.json`` into ``out_dir`` (each file atomically)."""
  from safetensors.numpy import save  # pylint: disable=g-import-not-at-top
  out_dir = epath.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  paths.write_bytes(out_dir / "params.safetensors", save(flatten(params)))
  paths.write_text(out_dir / "config.json", json.dumps(config, indent=2, sort_keys=True))


def exists(path: epath.PathLike) -> bool:
  """Whether ``path`` holds converted weights (``params.safetensors``)."""
  return (epath.Path(path) / "params.safetensors").exists()


WHERE = {
    "dinov2": "a Hugging Face facebook/dinov2-{small,base,large,giant} model.safetensors, or torch hub's "
              "dinov2_vit{s,b,l,g}14_pretrain.pth from the facebookresearch/dinov2 release",
    "inception": "pt_inception-2015-12-05-6726825d.pth from the pytorch-fid GitHub releases (mseitzer/pytorch-fid)",
    "vgg16": "torchvision's vgg16-397923af.pth (ImageNet weights), optionally with the LPIPS heads vgg.pth "
             "of taming-transformers",
}


def load_converted(path: epath.PathLike, expect_kind: str) -> tuple[dict[str, Any], dict[str, Any]]:
  """(params, config) from a directory written by ``python -m ifsq_jax.convert``."""
  root = epath.Path(path)
  cfg_path, par_path = root / "config.json", root / "params.safetensors"
  if not (cfg_path.exists() and par_path.exists()):
    raise FileNotFoundError(
        f"{path} holds no converted {expect_kind} weights (config.json + params.safetensors). They are converted "
        f"from {WHERE.get(expect_kind, 'the original PyTorch checkpoint')}: "
        f"python -m ifsq_jax.convert {expect_kind} --checkpoint FILE --out {path}")
  config = json.loads(cfg_path.read_text())
  if config.get("kind") != expect_kind:
    raise ConversionError(f"{path} holds {config.get('kind')!r} weights, not {expect_kind!r}.")
  from safetensors.numpy import load  # pylint: disable=g-import-not-at-top
  return unflatten(dict(load(par_path.read_bytes()))), config


@dataclasses.dataclass
class Dropped:
  """What a partial conversion (``--allow_partial``) left out.

  Attributes:
    unmapped: Checkpoint entries that were not converted (dropped).
    left_at_init: Model parameters the checkpoint did not provide (they keep their initial values).
  """

  unmapped: list[str] = dataclasses.field(default_factory=list)
  left_at_init: list[str] = dataclasses.field(default_factory=list)

  def __bool__(self) -> bool:
    return bool(self.unmapped or self.left_at_init)

  def summary(self) -> str:
    return (f"partial: {len(self.unmapped)} checkpoint entries dropped, {len(self.left_at_init)} parameters left at "
            "their initial values")


def check_all_used(state_dict: dict[str, np.ndarray], used: set[str], ignore: tuple[str, ...] = (),
                   allow_partial: bool = False, dropped: Dropped | None = None) -> list[str]:
  """Names of state-dict entries that were not mapped; a ConversionError unless ``allow_partial``.

  With ``allow_partial`` they are logged as a warning, one per line, and added to ``dropped``.
  """
  unmapped = sorted(k for k in state_dict if k not in used and not any(k.startswith(p) for p in ignore))
  if unmapped and not allow_partial:
    raise ConversionError(f"{len(unmapped)} checkpoint entries are not mapped: {unmapped[:10]}"
                          f"{' ...' if len(unmapped) > 10 else ''} (pass --allow_partial to convert anyway).")
  report_dropped(unmapped=unmapped, dropped=dropped)
  return unmapped


def report_dropped(unmapped: list[str] = (), left_at_init: list[str] = (), dropped: Dropped | None = None) -> None:
  """Logs what a partial conversion leaves out (every name), and adds it to ``dropped``."""
  if unmapped:
    logging.warning("--allow_partial: %d checkpoint entries are not mapped and were dropped:\n%s", len(unmapped),
                    "\n".join(f"  {k}" for k in unmapped))
  if left_at_init:
    logging.warning("--allow_partial: %d model parameters are not in the checkpoint and keep their initial "
                    "values:\n%s", len(left_at_init), "\n".join(f"  {k}" for k in left_at_init))
  if dropped is not None:
    dropped.unmapped.extend(unmapped)
    dropped.left_at_init.extend(left_at_init)

"""Official iFSQ tokenizer checkpoints -> :class:`ifsq_jax.models.tokenizer.Tokenizer` params.

Input: a ``checkpoint-*.ckpt`` of the official code (its ``ema_state_dict`` by
default, else ``state_dict``; the ``module.`` prefix of DDP is dropped) or a bare
state dict, and the model's ``run.json`` / ``config.json``. Every parameter is
mapped by renaming (``encoder.down.0.block.1.conv1.weight`` ->
``encoder/down_0/block_1/conv1/kernel``); the logging-only ``quantize.running_*``
buffers are dropped.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from etils import epath

from ifsq_jax.convert import torch_io
from ifsq_jax.models.tokenizer import Tokenizer, TokenizerConfig

IGNORED = ("quantize.running_mean", "quantize.running_var")
_ACTIVATIONS = {"scale_sigmoid_16": "ifsq", "scale_sigmoid_20": None}


def config_from_reference(ref: dict[str, Any]) -> TokenizerConfig:
  """The official model config (run.json) -> TokenizerConfig."""
  if ref.get("_class_name", "ImageFSQVAEModel") not in ("ImageFSQVAEModel", "ImageFSQVAE"):
    raise torch_io.ConversionError(f"config is for {ref.get('_class_name')}, not ImageFSQVAEModel.")
  simple = ref.get("do_simple_bound", False)
  act = ref.get("act_fun", "tanh")
  if simple and act != "scale_sigmoid_16":
    raise torch_io.ConversionError(
        f"act_fun={act!r} with the simple bound is not the iFSQ bound; only scale_sigmoid_16 maps to bottleneck 'ifsq'.")
  mult = tuple(ref.get("hidden_size_mult", (1, 2, 4, 4)))
  down = ref.get("encoder_spatial_downsample", ("Downsample",) * (len(mult) - 1) + ("",))
  up = ref.get("decoder_spatial_upsample", ("",) + ("Upsample",) * (len(mult) - 1))
  bits = ref.get("factorized_bits")
  return TokenizerConfig(
      hidden_size=ref.get("hidden_size", 128), hidden_size_mult=mult, num_res_blocks=ref.get("num_res_blocks", 2),
      z_channels=ref.get("z_channels", 4), embed_dim=ref.get("embed_dim", 4), double_z=ref.get("double_z", True),
      downsample=tuple(bool(d) for d in down), upsample=tuple(bool(u) for u in up),
      attn_resolutions=tuple(ref.get("attn_resolutions", ())), resolution=ref.get("resolution", 256),
      dropout=ref.get("dropout", 0.0), bottleneck="ifsq" if simple else "fsq",
      levels=tuple(ref.get("levels", (8, 8, 8, 8))), group_sizes=tuple(bits) if bits else None)


def _flax_path(key: str) -> tuple[list[str], str]:
  parts = key.split(".")
  merged: list[str] = []
  for p in parts[:-1]:
    if p.isdigit() and merged:
      merged[-1] = f"{merged[-1]}_{p}"
    else:
      merged.append(p)
  return merged, parts[-1]


def convert(sd: dict[str, np.ndarray], cfg: TokenizerConfig, allow_partial: bool = False,
            dropped: torch_io.Dropped | None = None) -> dict[str, Any]:
  """State dict -> {"params": ...} for ``Tokenizer(cfg)``.

  Every checkpoint entry must map onto a model parameter of the same shape and
  every parameter must be provided; with ``allow_partial`` the entries that do not
  map are dropped and the parameters not provided keep their initial values
  (``init`` with key 0), all listed in a warning and added to ``dropped``.
  """
  sd = {k.removeprefix("module."): v for k, v in sd.items()}
  init = lambda: Tokenizer(cfg).init(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32))
  abstract = nn.meta.unbox(jax.eval_shape(init))  # the parameters carry logical axis names
  flat: dict[str, tuple[np.ndarray, str]] = {}  # "encoder/conv_in/kernel" -> (value, checkpoint key)
  for key, value in sd.items():
    if key in IGNORED:
      continue
    path, leaf = _flax_path(key)
    value = np.asarray(value, np.float32)
    if path[-1] == "embedding" and path[0] == "quantize":  # VQ codebook
      path, name = ["quantize"], "codebook"
    elif leaf == "bias":
      name = "bias"
    elif value.ndim == 4:
      name, value = "kernel", value.transpose(2, 3, 1, 0)
    elif value.ndim == 2:
      name, value = "kernel", value.T
    elif leaf == "weight" and "norm" in path[-1]:
      name = "scale"
    else:
      continue
    flat["/".join(path + [name])] = (value, key)
  expected = {jax.tree_util.keystr(p, simple=True, separator="/"): leaf
              for p, leaf in jax.tree_util.tree_flatten_with_path(abstract["params"])[0]}
  for name, (value, key) in flat.items():
    if name in expected and value.shape != expected[name].shape:
      raise torch_io.ConversionError(f"{name} ({key}): checkpoint shape {value.shape}, model shape "
                                     f"{expected[name].shape}.")
  used = {key for name, (_, key) in flat.items() if name in expected}
  missing = sorted(name for name in expected if name not in flat)
  if missing and not allow_partial:
    raise torch_io.ConversionError(
        f"the checkpoint has nothing for {len(missing)} model parameters: "
        + ", ".join(f"{n} (shape {expected[n].shape})" for n in missing[:10]) + (" ..." if len(missing) > 10 else "")
        + " (pass --allow_partial to keep their initial values).")
  torch_io.check_all_used(sd, used, ignore=IGNORED, allow_partial=allow_partial, dropped=dropped)
  initial = {}
  if missing:
    torch_io.report_dropped(left_at_init=missing, dropped=dropped)
    initial = {jax.tree_util.keystr(p, simple=True, separator="/"): np.asarray(leaf)
               for p, leaf in jax.tree_util.tree_flatten_with_path(nn.meta.unbox(init())["params"])[0]}

  def take(path, leaf):
    del leaf
    name = jax.tree_util.keystr(path, simple=True, separator="/")
    return flat[name][0] if name in flat else initial[name]

  return {"params": jax.tree_util.tree_map_with_path(take, abstract["params"])}


def read_checkpoint(path: epath.PathLike, use_ema: bool = True) -> dict[str, np.ndarray]:
  """An official checkpoint's (EMA) state dict, or a bare state dict."""
  path = epath.Path(path)
  if path.name.endswith(".safetensors"):
    return torch_io.read_state_dict(path)
  if not path.exists():
    raise FileNotFoundError(f"checkpoint {path} does not exist.")
  import torch  # pylint: disable=g-import-not-at-top
  try:
    with path.open("rb") as f:
      obj = torch.load(f, map_location="cpu", weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    raise torch_io.ConversionError(f"{path} is not a plain tensor checkpoint (torch.load(weights_only=True) "
                                   f"refused it: {str(e).splitlines()[0][:300]}).") from None
  if isinstance(obj, dict):
    for key in (("ema_state_dict", "state_dict") if use_ema else ("state_dict",)):
      if isinstance(obj.get(key), dict):
        obj = obj[key]
        break
  return torch_io._flatten_tensors(obj, str(path))  # pylint: disable=protected-access


def convert_file(checkpoint: epath.PathLike, out_dir: epath.PathLike, allow_partial: bool = False,
                 config: epath.PathLike | None = None, use_ema: bool = True) -> str:
  if not config:
    raise torch_io.ConversionError("the tokenizer converter needs --config RUN_JSON (the model's run.json).")
  cfg = config_from_reference(json.loads(epath.Path(config).read_text()))
  dropped = torch_io.Dropped()
  variables = convert(read_checkpoint(checkpoint, use_ema), cfg, allow_partial, dropped)
  torch_io.save_converted(out_dir, variables["params"], {"kind": "tokenizer", "model": _cfg_json(cfg)})
  return f"Tokenizer({cfg.bottleneck}, levels={cfg.levels})" + (f" ({dropped.summary()})" if dropped else "")


def _cfg_json(cfg: TokenizerConfig) -> dict[str, Any]:
  return dataclasses.asdict(cfg)


def cfg_from_json(d: dict[str, Any]) -> TokenizerConfig:
  d = dict(d)
  for k in ("hidden_size_mult", "downsample", "upsample", "attn_resolutions", "levels"):
    d[k] = tuple(d[k])
  d["group_sizes"] = tuple(d["group_sizes"]) if d.get("group_sizes") else None
  return TokenizerConfig(**d)


def load(path: epath.PathLike) -> tuple[TokenizerConfig, dict[str, Any]]:
  params, config = torch_io.load_converted(path, "tokenizer")
  return cfg_from_json(config["model"]), {"params": params}


def exists(path: epath.PathLike) -> bool:
  return torch_io.exists(path)

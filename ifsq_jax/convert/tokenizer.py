"""Official iFSQ tokenizer checkpoints -> :class:`ifsq_jax.models.tokenizer.Tokenizer` params.

Input: a ``checkpoint-*.ckpt`` of the official code (its ``ema_state_dict`` by
default, else ``state_dict``; the ``module.`` prefix of DDP is dropped) or a bare
state dict, and the model's ``run.json`` / ``config.json``. The table of the
converter engine (:mod:`ifsq_jax.convert.engine`) is the model's own param tree
renamed (``encoder/down_0/block_1/conv1/kernel`` <-
``encoder.down.0.block.1.conv1.weight``: a module index is a ``_N`` suffix here, a
``.N`` list item there); the logging-only ``quantize.running_*`` buffers are dropped.
"""

from __future__ import annotations

import json
import re
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from etils import epath

from ifsq_jax.convert import engine, torch_io
from ifsq_jax.convert.engine import Entry
from ifsq_jax.models import saved
from ifsq_jax.models.tokenizer import Tokenizer, TokenizerConfig

IGNORED = ("quantize.running_mean", "quantize.running_var")
_TORCH_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias"}


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


def key_map(expected: dict[str, Any]) -> list[Entry]:
  """The state-dict key of every param path of ``expected`` ({path: shape}, e.g. ``engine.flat`` of an init)."""
  entries = []
  for path, leaf in expected.items():
    *modules, name = path.split("/")
    if path == "quantize/codebook":  # the VQ codebook is an nn.Embedding
      entries.append(Entry("quantize.embedding.weight", path))
      continue
    key = ".".join([re.sub(r"_(\d+)$", r".\1", m) for m in modules] + [_TORCH_LEAF.get(name, name)])
    kind = {4: "conv", 2: "linear"}.get(len(leaf.shape), "copy") if name == "kernel" else "copy"
    entries.append(Entry(key, path, kind))
  return entries


def convert(sd: dict[str, np.ndarray], cfg: TokenizerConfig, allow_partial: bool = False,
            dropped: engine.Dropped | None = None) -> dict[str, Any]:
  """State dict -> {"params": ...} for ``Tokenizer(cfg)``.

  Every checkpoint entry must map onto a model parameter of the same shape and
  every parameter must be provided; with ``allow_partial`` the entries that do not
  map are dropped and the parameters not provided keep their initial values
  (``init`` with key 0), all listed in a warning and added to ``dropped``.
  """
  sd = {k.removeprefix("module."): v for k, v in sd.items()}
  init = lambda: Tokenizer(cfg).init(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32))
  expected = engine.flat(nn.meta.unbox(jax.eval_shape(init))["params"])  # the params carry logical axis names
  params = engine.to_params(sd, key_map(expected), expected, lambda: engine.flat(nn.meta.unbox(init())["params"]),
                            model="Tokenizer", hint="check the run.json", allow_partial=allow_partial,
                            dropped=dropped, ignore=IGNORED)
  return {"params": params}


def convert_file(checkpoint: epath.PathLike, out_dir: epath.PathLike, allow_partial: bool = False,
                 config: epath.PathLike | None = None, use_ema: bool = True) -> str:
  """Converts an official tokenizer checkpoint into ``out_dir`` (params.safetensors + config.json); returns a summary."""
  if not config:
    raise torch_io.ConversionError("the tokenizer converter needs --config RUN_JSON (the model's run.json).")
  cfg = config_from_reference(json.loads(epath.Path(config).read_text()))
  sd, _ = torch_io.read_checkpoint(checkpoint, want=("ema_state_dict", "state_dict") if use_ema else ("state_dict",))
  dropped = engine.Dropped()
  variables = convert(sd, cfg, allow_partial, dropped)
  saved.save(out_dir, variables["params"], {"kind": "tokenizer", "model": saved.tokenizer_to_json(cfg)})
  return f"Tokenizer({cfg.bottleneck}, levels={cfg.levels})" + (f" ({dropped.summary()})" if dropped else "")


load = saved.load_tokenizer
exists = saved.exists

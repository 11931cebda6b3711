"""DINOv2 PyTorch weights (Hugging Face ``Dinov2Model`` or torch-hub) -> :class:`ifsq_jax.nets.dinov2.DinoV2` params.

A Hugging Face state dict is first renamed to the torch-hub layout (its separate
query / key / value projections, and transformers 5's gate / up projections,
concatenated as the hub's ``qkv`` and ``w12``); the architecture is read from the
checkpoint, and one table of the converter engine (:mod:`ifsq_jax.convert.engine`)
maps the hub layout: ``Linear.weight`` (out, in) -> Dense kernel (in, out);
``Conv2d.weight`` (O, I, kH, kW) -> Conv kernel (kH, kW, I, O); LayerNorm weight ->
scale. Register-token variants are refused.

W width, N tokens.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import numpy as np

from ifsq_jax.convert import engine, torch_io
from ifsq_jax.convert.engine import Entry
from ifsq_jax.models import saved
from ifsq_jax.nets.dinov2 import DinoConfig

# Hugging Face key pieces -> torch-hub ones, applied in order.
_HF_RENAMES = (
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.mask_token$", "mask_token"),
    (r"^encoder\.layer\.(\d+)\.", r"blocks.\1."),
    # Released files name the output projection attention.output.dense; transformers 5 attention.o_proj.
    (r"\.attention\.output\.dense\.|\.attention\.o_proj\.", ".attn.proj."),
    (r"\.layer_scale(\d)\.lambda1$", r".ls\1.gamma"),
    (r"\.mlp\.weights_in\.", ".mlp.w12."),
    (r"\.mlp\.(weights_out|down_proj)\.", ".mlp.w3."),
    (r"^layernorm\.", "norm."),
)
# torch-hub layers that Hugging Face stores as pieces, concatenated along the output axis (in this order).
_HF_PIECES = {
    "attn.qkv": (("attention.attention.query", "attention.attention.key", "attention.attention.value"),
                 ("attention.q_proj", "attention.k_proj", "attention.v_proj")),  # released files; transformers 5
    "mlp.w12": (("mlp.gate_proj", "mlp.up_proj"),),  # transformers 5: [gate | up]
}


def hub_layout(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """A Hugging Face ``Dinov2Model`` state dict -> the torch-hub layout (a hub one is returned as it is)."""
  sd = {k.removeprefix("dinov2."): v for k, v in sd.items()}
  if not any(k.startswith("embeddings.") for k in sd):
    return sd
  out = {}
  for key, value in sd.items():
    for pattern, repl in _HF_RENAMES:
      key = re.sub(pattern, repl, key)
    out[key] = value
  blocks = sorted({m.group(0) for k in out if (m := re.match(r"blocks\.\d+\.", k))})
  for block in blocks:
    for target, alternatives in _HF_PIECES.items():
      for leaf in ("weight", "bias"):
        for pieces in alternatives:
          names = [f"{block}{p}.{leaf}" for p in pieces]
          if all(n in out for n in names):
            out[f"{block}{target}.{leaf}"] = np.concatenate([np.asarray(out.pop(n)) for n in names])
  return out


def key_map(depth: int, swiglu: bool) -> list[Entry]:
  """Every param of a DINOv2 of ``depth`` blocks with its torch-hub key."""
  norm = lambda key, path: [Entry(f"{key}.weight", f"{path}/scale"), Entry(f"{key}.bias", f"{path}/bias")]
  entries = [*engine.conv("patch_embed.proj", "patch_embed"), Entry("cls_token", "cls_token"),
             Entry("pos_embed", "pos_embed")]
  for i in range(depth):
    key, path = f"blocks.{i}", f"blocks_{i}"
    entries += [*norm(f"{key}.norm1", f"{path}/norm1"), *norm(f"{key}.norm2", f"{path}/norm2"),
                *engine.linear(f"{key}.attn.qkv", f"{path}/qkv"), *engine.linear(f"{key}.attn.proj", f"{path}/proj"),
                Entry(f"{key}.ls1.gamma", f"{path}/ls1"), Entry(f"{key}.ls2.gamma", f"{path}/ls2")]
    for name in (("w12", "w3") if swiglu else ("fc1", "fc2")):
      entries += engine.linear(f"{key}.mlp.{name}", f"{path}/{name}")
  return entries + norm("norm", "norm")


def _architecture(sd: dict[str, np.ndarray]) -> DinoConfig:
  """The config a torch-hub layout state dict gives."""
  for key in ("patch_embed.proj.weight", "pos_embed"):
    if key not in sd:
      raise torch_io.ConversionError(f"the checkpoint has no entry {key!r} (nor its Hugging Face name): it is not a "
                                     "DINOv2 state dict of the expected layout.")
  patch_w, pos = sd["patch_embed.proj.weight"], sd["pos_embed"]
  width, patch = patch_w.shape[0], patch_w.shape[-1]
  depth = 1 + max((int(k.split(".")[1]) for k in sd if k.startswith("blocks.")), default=-1)
  swiglu = any(".mlp.w12." in k for k in sd)
  second = f"blocks.0.mlp.{'w3' if swiglu else 'fc2'}.weight"
  if second not in sd:
    raise torch_io.ConversionError(f"the checkpoint has no entry {second!r}: it is not a DINOv2 state dict of the "
                                   "expected layout.")
  mlp_hidden = sd[second].shape[1]
  ratio = 4.0 if swiglu else mlp_hidden / width  # SwiGLU stores the rounded 2/3 of width * mlp_ratio
  cfg = DinoConfig(width=width, depth=depth, heads=width // 64, patch=patch,
                   pos_grid=int(round((pos.shape[1] - 1) ** 0.5)), mlp_ratio=ratio, swiglu=swiglu)
  if cfg.mlp_hidden != mlp_hidden:
    raise torch_io.ConversionError(f"MLP width {mlp_hidden} does not match the architecture ({cfg.mlp_hidden}).")
  return cfg


def convert(sd: dict[str, np.ndarray], allow_partial: bool = False,
            dropped: engine.Dropped | None = None) -> tuple[dict[str, Any], DinoConfig]:
  """State dict -> ({"params": ...}, config).

  The architecture is read from the checkpoint, so every parameter must be in it; with
  ``allow_partial`` entries that do not map are dropped, listed in a warning and added to ``dropped``.
  """
  sd = hub_layout(sd)
  if any("register_tokens" in k for k in sd):
    raise torch_io.ConversionError("DINOv2 with register tokens is not supported; use the models without registers.")
  cfg = _architecture(sd)
  params = engine.to_params(sd, key_map(cfg.depth, cfg.swiglu), model="DINOv2", allow_partial=allow_partial,
                            dropped=dropped, ignore=("mask_token",))
  return {"params": params}, cfg


def convert_file(checkpoint: str, out_dir: str, allow_partial: bool = False) -> str:
  """Converts DINOv2 weights into ``out_dir``; returns a summary."""
  dropped = engine.Dropped()
  params, cfg = convert(torch_io.read_state_dict(checkpoint), allow_partial, dropped)
  saved.save(out_dir, params["params"], {"kind": "dinov2", **dataclasses.asdict(cfg)})
  return f"{cfg}" + (f" ({dropped.summary()})" if dropped else "")


load = saved.load_dinov2  # the converted directory's reader lives with its format

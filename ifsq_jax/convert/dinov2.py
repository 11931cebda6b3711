"""DINOv2 PyTorch weights (Hugging Face ``Dinov2Model`` or torch-hub) -> :class:`ifsq_jax.nets.dinov2.DinoV2` params.

Layouts: ``Linear.weight`` (out, in) -> Dense kernel (in, out); ``Conv2d.weight``
(O, I, kH, kW) -> Conv kernel (kH, kW, I, O); LayerNorm weight -> scale; the
Hugging Face separate query/key/value projections are concatenated into qkv as
the torch-hub layout. Register-token variants are refused.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from ifsq_jax.convert import torch_io
from ifsq_jax.nets.dinov2 import DinoConfig


class _Reader:
  """Takes entries from a state dict and remembers which were used."""

  def __init__(self, sd: dict[str, np.ndarray]):
    self.sd, self.used = sd, set()

  def __call__(self, key: str) -> np.ndarray:
    if key not in self.sd:
      raise torch_io.ConversionError(f"the checkpoint has no entry {key!r}: it is not a DINOv2 state dict of the "
                                     "expected layout.")
    self.used.add(key)
    return np.asarray(self.sd[key], np.float32)


def _linear(w: np.ndarray, b: np.ndarray | None) -> dict[str, np.ndarray]:
  out = {"kernel": w.T}
  if b is not None:
    out["bias"] = b
  return out


def _mlp(r: _Reader, p: str, names: tuple[str, str], swiglu: bool) -> dict[str, dict[str, np.ndarray]]:
  """The two MLP layers, named w12 / w3 (SwiGLU) or fc1 / fc2 in our tree."""
  ours = ("w12", "w3") if swiglu else ("fc1", "fc2")
  return {o: _linear(r(f"{p}{n}.weight"), r(f"{p}{n}.bias")) for o, n in zip(ours, names)}


def _norm(r: _Reader, prefix: str) -> dict[str, np.ndarray]:
  return {"scale": r(f"{prefix}.weight"), "bias": r(f"{prefix}.bias")}


def convert(sd: dict[str, np.ndarray], allow_partial: bool = False,
            dropped: torch_io.Dropped | None = None) -> tuple[dict[str, Any], DinoConfig]:
  """State dict -> ({"params": ...}, config).

  The architecture is read from the checkpoint, so every parameter must be in it; with
  ``allow_partial`` entries that do not map are dropped, listed in a warning and added to ``dropped``.
  """
  hf = any(k.startswith("embeddings.") for k in sd)
  sd = {k.removeprefix("dinov2."): v for k, v in sd.items()}
  if any("register_tokens" in k for k in sd):
    raise torch_io.ConversionError("DINOv2 with register tokens is not supported; use the models without registers.")
  r = _Reader(sd)
  if hf:
    patch_w = r("embeddings.patch_embeddings.projection.weight")
    patch_b = r("embeddings.patch_embeddings.projection.bias")
    cls, pos = r("embeddings.cls_token"), r("embeddings.position_embeddings")
    depth = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.layer."))
    block = "encoder.layer.{}."
    swiglu = any(".mlp.weights_in." in k or ".mlp.gate_proj." in k for k in sd)
  else:
    patch_w, patch_b = r("patch_embed.proj.weight"), r("patch_embed.proj.bias")
    cls, pos = r("cls_token"), r("pos_embed")
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    block = "blocks.{}."
    swiglu = any(".mlp.w12." in k for k in sd)
  width, patch = patch_w.shape[0], patch_w.shape[-1]
  grid = int(round((pos.shape[1] - 1) ** 0.5))
  heads = width // 64
  params: dict[str, Any] = {
      "patch_embed": {"kernel": patch_w.transpose(2, 3, 1, 0), "bias": patch_b},
      "cls_token": cls.reshape(1, 1, width),
      "pos_embed": pos.reshape(1, -1, width),
  }
  mlp_hidden = None
  for i in range(depth):
    p = block.format(i)
    blk: dict[str, Any] = {}
    if hf:
      a = p + "attention."
      # Released files name them attention.{query,key,value} and output.dense; transformers 5 q/k/v/o_proj.
      names = (("q_proj", "k_proj", "v_proj"), "o_proj") if a + "q_proj.weight" in sd else (
          ("attention.query", "attention.key", "attention.value"), "output.dense")
      qkv_w = np.concatenate([r(a + f"{n}.weight") for n in names[0]])
      qkv_b = np.concatenate([r(a + f"{n}.bias") for n in names[0]])
      blk["qkv"] = _linear(qkv_w, qkv_b)
      blk["proj"] = _linear(r(a + f"{names[1]}.weight"), r(a + f"{names[1]}.bias"))
      blk["ls1"], blk["ls2"] = r(p + "layer_scale1.lambda1"), r(p + "layer_scale2.lambda1")
      if swiglu and p + "mlp.gate_proj.weight" in sd:  # transformers 5: [gate | up] as two layers
        w = np.concatenate([r(p + "mlp.gate_proj.weight"), r(p + "mlp.up_proj.weight")])
        b = np.concatenate([r(p + "mlp.gate_proj.bias"), r(p + "mlp.up_proj.bias")])
        blk["w12"] = _linear(w, b)
        blk["w3"] = _linear(r(p + "mlp.down_proj.weight"), r(p + "mlp.down_proj.bias"))
      else:
        blk.update(_mlp(r, p, ("mlp.weights_in", "mlp.weights_out") if swiglu else ("mlp.fc1", "mlp.fc2"), swiglu))
    else:
      blk["qkv"] = _linear(r(p + "attn.qkv.weight"), r(p + "attn.qkv.bias"))
      blk["proj"] = _linear(r(p + "attn.proj.weight"), r(p + "attn.proj.bias"))
      blk["ls1"], blk["ls2"] = r(p + "ls1.gamma"), r(p + "ls2.gamma")
      blk.update(_mlp(r, p, ("mlp.w12", "mlp.w3") if swiglu else ("mlp.fc1", "mlp.fc2"), swiglu))
    blk["norm1"], blk["norm2"] = _norm(r, p + "norm1"), _norm(r, p + "norm2")
    mlp_hidden = blk["w3" if swiglu else "fc2"]["kernel"].shape[0]
    params[f"blocks_{i}"] = blk
  params["norm"] = _norm(r, "layernorm" if hf else "norm")
  torch_io.check_all_used(sd, r.used, ignore=("embeddings.mask_token", "mask_token"), allow_partial=allow_partial,
                         dropped=dropped)
  ratio = mlp_hidden / width
  if swiglu:  # the stored hidden width is the rounded 2/3 of width * mlp_ratio
    ratio = 4.0
  cfg = DinoConfig(width=width, depth=depth, heads=heads, patch=patch, pos_grid=grid, mlp_ratio=ratio, swiglu=swiglu)
  if cfg.mlp_hidden != mlp_hidden:
    raise torch_io.ConversionError(f"MLP width {mlp_hidden} does not match the architecture ({cfg.mlp_hidden}).")
  return {"params": params}, cfg


def convert_file(checkpoint: str, out_dir: str, allow_partial: bool = False) -> str:
  dropped = torch_io.Dropped()
  params, cfg = convert(torch_io.read_state_dict(checkpoint), allow_partial, dropped)
  torch_io.save_converted(out_dir, params["params"], {"kind": "dinov2", **dataclasses.asdict(cfg)})
  return f"{cfg}" + (f" ({dropped.summary()})" if dropped else "")


def load(path: str):
  """(DinoV2 module, {"params": ...}) from a converted directory."""
  from ifsq_jax.nets.dinov2 import DinoV2  # pylint: disable=g-import-not-at-top
  params, config = torch_io.load_converted(path, "dinov2")
  config.pop("kind")
  return DinoV2(DinoConfig(**config)), {"params": params}

"""Official iFSQ DiT checkpoints <-> :class:`ifsq_jax.models.dit.DiT` params.

Input: a checkpoint of the official ``dit/train.py`` (a torch pickle dict with
``model``, ``ema``, ``opt`` and ``config``; its ``ema`` weights by default, ``model``
with ``use_ema=False``), or a bare state dict (``.pt`` or ``.safetensors``), and the
run's ``run.yaml`` (or the ``config`` saved in the checkpoint). The file is read with
``torch.load(weights_only=True)``, which rebuilds tensors and plain containers only.

Every state-dict entry is mapped by one table (:func:`key_map`) that the converter
engine (:mod:`ifsq_jax.convert.engine`) runs both ways: ``blocks.3.attn.qkv.weight``
(3D, D) becomes ``blocks_3/attn/qkv/kernel`` (D, 3, K, d), and with ``scan_layers``
the blocks are stacked into ``blocks/...`` (depth, ...). The RoPE buffers
``feat_rope.freqs_cos/sin`` are not loaded: they are recomputed and checked equal.
An entry that maps nowhere, or a parameter the checkpoint lacks, refuses the
conversion with a message listing them (kept at their initial values with
``allow_partial``).

D width, K heads, d head width, C latent channels, p patch size.
"""

from __future__ import annotations

import re
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from etils import epath

from ifsq_jax.convert import engine, torch_io
from ifsq_jax.convert.engine import Entry, torch_shape  # pylint: disable=unused-import
from ifsq_jax.models import saved
from ifsq_jax.models.dit import DIT_SIZES, DiT, dit_config, example_inputs, rope_tables

ROPE_BUFFERS = ("feat_rope.freqs_cos", "feat_rope.freqs_sin")
ROPE_ATOL = 1e-5  # the buffers are float32 cos / sin: different libm implementations differ by an ulp or two
STACKS = ("blocks",)  # the module list that nn.scan stacks


def key_map(fields: dict[str, Any]) -> list[Entry]:
  """Every param of ``DiT(**fields)`` with its state-dict key (the RoPE buffers aside)."""
  f = {**dit_config(), **fields}
  rms = f["use_rmsnorm"]
  entries = [Entry("pos_embed", "pos_embed"),
             *engine.conv("x_embedder.proj", "x_embedder"),
             *engine.linear("t_embedder.mlp.0", "t_embedder/mlp_0"),
             *engine.linear("t_embedder.mlp.2", "t_embedder/mlp_2"),
             Entry("y_embedder.embedding_table.weight", "y_embedder/embedding_table")]
  for i in range(f["depth"]):
    key, path = f"blocks.{i}", f"blocks_{i}"
    if rms:  # LayerNorm blocks have no norm parameters
      entries += [Entry(f"{key}.norm1.weight", f"{path}/norm1/scale"), Entry(f"{key}.norm2.weight", f"{path}/norm2/scale")]
    entries += engine.linear(f"{key}.attn.qkv", f"{path}/attn/qkv")
    if f["use_qknorm"]:
      for name in ("q_norm", "k_norm"):
        entries.append(Entry(f"{key}.attn.{name}.weight", f"{path}/attn/{name}/scale"))
        if not rms:
          entries.append(Entry(f"{key}.attn.{name}.bias", f"{path}/attn/{name}/bias"))
    entries += engine.linear(f"{key}.attn.proj", f"{path}/attn/proj", n_in=2)
    for name in (("w12", "w3") if f["use_swiglu"] else ("fc1", "fc2")):
      entries += engine.linear(f"{key}.mlp.{name}", f"{path}/mlp/{name}")
    entries += engine.linear(f"{key}.adaLN_modulation.1", f"{path}/adaLN_modulation_1")
  if rms:
    entries.append(Entry("final_layer.norm_final.weight", "final_layer/norm_final/scale"))
  entries += engine.linear("final_layer.adaLN_modulation.1", "final_layer/adaLN_modulation_1")
  entries += engine.linear("final_layer.linear", "final_layer/linear")
  if f["z_dim"]:
    for j, torch_index in enumerate((0, 2, 4)):
      entries += engine.linear(f"projectors.0.{torch_index}", f"projector/linear_{j}")
  return entries


def stack_blocks(params: dict[str, Any], depth: int) -> dict[str, Any]:
  """Unscanned params (``blocks_0`` ... ``blocks_{depth-1}``) -> scanned (``blocks``, leading layer axis)."""
  found = sum(1 for k in params if re.fullmatch(r"blocks_\d+", k))
  if found != depth:
    raise ValueError(f"depth={depth}, but the params have {found} blocks (blocks_0 ...).")
  return engine.stack(params, STACKS)


def _unscanned_init(fields: dict[str, Any], abstract: bool) -> dict[str, Any]:
  """The params of ``DiT(**fields)`` in the unscanned layout, flat: shapes (``abstract``) or the init with key 0.

  The key is an "rbg" one: XLA's CPU backend takes seconds per dozen threefry draws to compile an init, and
  about a tenth of that with rbg.
  """
  module = DiT(**{**fields, "scan_layers": False, "remat_policy": "none"})
  args = (jax.random.key(0, impl="rbg"), *example_inputs(module))
  variables = jax.eval_shape(module.init, *args) if abstract else jax.jit(module.init)(*args)
  return engine.flat(nn.meta.unbox(variables["params"]))


# ------------------------------------------------------------------ state dict <-> params

def to_params(sd: dict[str, np.ndarray], fields: dict[str, Any], allow_partial: bool = False,
              dropped: engine.Dropped | None = None) -> dict[str, Any]:
  """State dict -> params of ``DiT(**fields)`` (numpy, in the layout of ``fields["scan_layers"]``).

  Args:
    sd: The official state dict (a ``module.`` prefix is dropped).
    fields: DiT fields (``dit_config(...)`` style; missing ones take their defaults).
    allow_partial: Drop entries that map nowhere and keep the initial value (init
      with key 0) of params the checkpoint lacks, listing both in a warning.
    dropped: Collects what a partial conversion left out.

  Raises:
    torch_io.ConversionError: an entry of another shape, a RoPE buffer that differs
      from the recomputed one, or (without ``allow_partial``) unmapped or missing entries.
  """
  fields = {**dit_config(), **fields}
  sd = {k.removeprefix("module."): v for k, v in sd.items()}
  if fields["use_rope"]:
    _check_rope(sd, fields)
  params = engine.to_params(
      sd, key_map(fields), _unscanned_init(fields, abstract=True), lambda: _unscanned_init(fields, abstract=False),
      model="DiT", hint="check the run config (model size, patch, classes, REPA encoder)",
      allow_partial=allow_partial, dropped=dropped, used=ROPE_BUFFERS if fields["use_rope"] else ())
  return engine.stack(params, STACKS) if fields["scan_layers"] else params


def _check_rope(sd: dict[str, np.ndarray], fields: dict[str, Any]) -> None:
  """The RoPE buffers are recomputed, not loaded; a checkpoint's must agree with them."""
  tables = rope_tables(fields["hidden_size"] // fields["num_heads"], fields["input_size"] // fields["patch_size"])
  for key, table in zip(ROPE_BUFFERS, tables):
    if key not in sd:
      continue
    value = np.asarray(sd[key], np.float32)
    if value.shape != table.shape or not np.allclose(value, table, rtol=0, atol=ROPE_ATOL):
      err = np.abs(value - table).max() if value.shape == table.shape else None
      raise torch_io.ConversionError(
          f"{key} (shape {value.shape}) differs from the RoPE table this DiT computes (shape {table.shape}"
          + (f", max difference {err:.3g}" if err is not None else "") + "); the checkpoint is of another model "
          "size, patch or input size.")


def to_state_dict(params: dict[str, Any], fields: dict[str, Any]) -> dict[str, np.ndarray]:
  """Params of ``DiT(**fields)`` (either layout) -> the official state dict, RoPE buffers included."""
  fields = {**dit_config(), **fields}
  sd = engine.to_state_dict(engine.unstack(nn.meta.unbox(params), STACKS), key_map(fields))
  if fields["use_rope"]:
    tables = rope_tables(fields["hidden_size"] // fields["num_heads"], fields["input_size"] // fields["patch_size"])
    sd.update(dict(zip(ROPE_BUFFERS, tables)))
  return sd


# ------------------------------------------------------------------ files

def fields_from_reference(run: dict[str, Any]) -> dict[str, Any]:
  """The official ``run.yaml`` (or a checkpoint's ``config``) -> DiT fields.

  ``model.model_type`` ``DiT-{S,B,L,XL}/{p}``, the ``model.use_*`` options, ``model.in_chans``,
  ``data.image_size / vae.downsample_ratio`` (the latent size), ``data.num_classes`` and
  ``repa.{use_repa, enc_type, encoder_depth}`` (``dinov2-vit-{s,b,l,g}`` sets z_dim).
  """
  model, data, vae = run.get("model") or {}, run.get("data") or {}, run.get("vae") or {}
  model_type = str(model.get("model_type", ""))
  match = re.fullmatch(r"DiT-([A-Z]+)/(\d+)", model_type)
  if not match or match.group(1) not in DIT_SIZES:
    raise torch_io.ConversionError(f"model.model_type={model_type!r} is not supported; use DiT-{{S,B,L,XL}}/{{1,2,4}} "
                                   f"(sizes {sorted(DIT_SIZES)}).")
  if (run.get("scheduler") or {}).get("diffusion") and (run.get("diffusion") or {}).get("learn_sigma"):
    raise torch_io.ConversionError("this run trains DDPM with learn_sigma (2 x in_chans outputs); only the "
                                   "flow-matching (transport) DiT converts.")
  if "image_size" not in data or "num_classes" not in data:
    raise torch_io.ConversionError(f"the run config needs data.image_size and data.num_classes; data has "
                                   f"{sorted(data)}.")
  ratio, patch = vae.get("downsample_ratio", 8), int(match.group(2))  # 8: dit/train.py's default
  if data["image_size"] % (ratio * patch):
    raise torch_io.ConversionError(f"data.image_size={data['image_size']} is not a multiple of "
                                   f"vae.downsample_ratio={ratio} times the patch size {patch}.")
  return dit_config(match.group(1), patch, input_size=data["image_size"] // ratio,
                    in_channels=model.get("in_chans", 4), num_classes=data["num_classes"],
                    use_qknorm=bool(model.get("use_qknorm", False)), use_swiglu=bool(model.get("use_swiglu", False)),
                    use_rope=bool(model.get("use_rope", False)), use_rmsnorm=bool(model.get("use_rmsnorm", False)),
                    **torch_io.repa_fields(run))


def convert_file(checkpoint: epath.PathLike, out_dir: epath.PathLike, allow_partial: bool = False,
                 config: epath.PathLike | None = None, use_ema: bool = True) -> str:
  """Converts an official DiT checkpoint into ``out_dir`` (params.safetensors + config.json); returns a summary."""
  sd, run = torch_io.read_training_checkpoint(checkpoint, config, use_ema, "run.yaml")
  fields = fields_from_reference(run)
  dropped = engine.Dropped()
  params = to_params(sd, fields, allow_partial, dropped)
  saved.save(out_dir, params, {"kind": "dit", "model": fields, "weights": "ema" if use_ema else "model"})
  name = next(k for k, v in DIT_SIZES.items() if v == (fields["depth"], fields["hidden_size"], fields["num_heads"]))
  return f"DiT-{name}/{fields['patch_size']}" + (f" ({dropped.summary()})" if dropped else "")


load = saved.load_dit
exists = saved.exists

"""Official iFSQ LlamaGen checkpoints <-> :class:`ifsq_jax.models.llamagen.LlamaGen` params.

Input: a checkpoint of the official ``llamagen/train.py`` (a torch pickle dict with
``model``, ``ema``, ``opt`` and ``config``; its ``ema`` weights by default, ``model``
with ``use_ema=False``), or a bare state dict (``.pt`` or ``.safetensors``), and the
run's ``config.yaml`` (or the ``config`` saved in the checkpoint). The file is read
with ``torch.load(weights_only=True)``, which rebuilds tensors and plain containers only.

The YAML leaves the vocabulary to the tokenizer (``fsq.factorized_bits`` null: one
prod(levels)-way token; ``[2, 2]``: two groups); the sizes are read from the
checkpoint's token embeddings and checked against ``fsq.factorized_bits`` and
``vqvae.codebook_size`` / ``cusvq.codebook_size`` where the YAML gives them.

Every state-dict entry is mapped by one table (:func:`key_map`) that the converter
engine (:mod:`ifsq_jax.convert.engine`) runs both ways: ``layers.3.attention.wqkv.weight`` (3D, D) becomes
``layers_3/attention/wqkv/kernel`` (D, 3, K, d); ``0_emb.weight`` becomes
``emb_0/embedding``, ``output.1.weight`` ``output_1/kernel``. With ``scan_layers``
the layers are stacked into ``layers/...`` (depth, ...), the sub-token blocks into
``factorized_blocks/...``. An entry that maps nowhere, or a parameter the
checkpoint lacks, refuses the conversion with a message listing them (kept at
their initial values with ``allow_partial``).

D width, K heads, d head width, V vocabulary.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from etils import epath

from ifsq_jax.convert import engine, torch_io
from ifsq_jax.convert.engine import Entry, torch_shape  # pylint: disable=unused-import
from ifsq_jax.models import saved
from ifsq_jax.models.llamagen import LLAMAGEN_SIZES, LlamaGen, example_inputs, llamagen_config

# The reference's model_type suffixes (LlamaGen_models) -> our sizes.
REFERENCE_SIZES = {"S": "S", "B": "B", "L": "L", "XL": "XL", "XXL": "XXL", "XXXL": "3B", "3B": "3B"}
STACKS = ("layers", "factorized_blocks")  # module lists that nn.scan stacks


def _block(key: str, path: str) -> list[Entry]:
  entries = [*engine.linear(f"{key}.attention.wqkv", f"{path}/attention/wqkv", bias=False),
             *engine.linear(f"{key}.attention.wo", f"{path}/attention/wo", n_in=2, bias=False)]
  for w in ("w1", "w3", "w2"):
    entries += engine.linear(f"{key}.feed_forward.{w}", f"{path}/feed_forward/{w}", bias=False)
  return entries + [Entry(f"{key}.{n}.weight", f"{path}/{n}/scale") for n in ("attention_norm", "ffn_norm")]


def key_map(fields: dict[str, Any]) -> list[Entry]:
  """Every param of ``LlamaGen(**fields)`` with its state-dict key."""
  f = llamagen_config(**{**fields})
  groups = len(f["vocab_sizes"])
  entries = [Entry("cls_embedding.embedding_table.weight", "cls_embedding/embedding_table")]
  if groups == 1:
    entries.append(Entry("tok_embeddings.weight", "tok_embeddings/embedding"))
  else:
    entries += [Entry(f"{g}_emb.weight", f"emb_{g}/embedding") for g in range(groups)]
  for i in range(f["depth"]):
    entries += _block(f"layers.{i}", f"layers_{i}")
  if groups > 1:
    for i in range(f["factorized_depth"]):
      entries += _block(f"factorized_blocks.{i}", f"factorized_blocks_{i}")
  entries.append(Entry("norm.weight", "norm/scale"))
  if groups == 1:
    entries += engine.linear("output", "output", bias=False)
  else:
    for g in range(groups):
      entries += engine.linear(f"output.{g}", f"output_{g}", bias=False)
  if f["z_dim"]:
    for j, torch_index in enumerate((0, 2, 4)):
      entries += engine.linear(f"projectors.0.{torch_index}", f"projector/linear_{j}")
  return entries


def stack_layers(params: dict[str, Any]) -> dict[str, Any]:
  """Unscanned params (``layers_0`` ..., ``factorized_blocks_0`` ...) -> scanned (leading layer axis)."""
  return engine.stack(params, STACKS)


def unstack_layers(params: dict[str, Any]) -> dict[str, Any]:
  """Scanned params (``layers``, ``factorized_blocks`` with a leading layer axis) -> unscanned."""
  return engine.unstack(params, STACKS)


def _unscanned_init(fields: dict[str, Any], abstract: bool) -> dict[str, Any]:
  """The params of ``LlamaGen(**fields)`` in the unscanned layout, flat: shapes (``abstract``) or the init with key 0.

  The init runs the scanned model (one block to compile whatever the depth) and
  unstacks it, with an "rbg" key: XLA's CPU backend compiles threefry draws slowly.
  """
  module = lambda scan: LlamaGen(**{**fields, "scan_layers": scan, "remat_policy": "none"})
  args = (jax.random.key(0, impl="rbg"), *example_inputs(module(True)))
  if abstract:
    return engine.flat(nn.meta.unbox(jax.eval_shape(module(False).init, *args)["params"]))
  return engine.flat(unstack_layers(jax.device_get(nn.meta.unbox(jax.jit(module(True).init)(*args)["params"]))))


# ------------------------------------------------------------------ state dict <-> params

def to_params(sd: dict[str, np.ndarray], fields: dict[str, Any], allow_partial: bool = False,
              dropped: engine.Dropped | None = None) -> dict[str, Any]:
  """State dict -> params of ``LlamaGen(**fields)`` (numpy, in the layout of ``fields["scan_layers"]``).

  ``fields`` missing take the defaults of :func:`llamagen_config`; a ``module.`` prefix of the keys is dropped.
  With ``allow_partial``, entries that map nowhere are dropped and params the checkpoint lacks keep their initial
  values (init with key 0), all listed in a warning and added to ``dropped``.

  Raises:
    torch_io.ConversionError: an entry of another shape, or (without ``allow_partial``) the report of unmapped
      and missing entries.
  """
  fields = llamagen_config(**fields)
  sd = {k.removeprefix("module."): v for k, v in sd.items()}
  params = engine.to_params(
      sd, key_map(fields), _unscanned_init(fields, abstract=True), lambda: _unscanned_init(fields, abstract=False),
      model="LlamaGen", hint="check the run config (model size, classes, image size / downsampling, REPA encoder)",
      allow_partial=allow_partial, dropped=dropped)
  return stack_layers(params) if fields["scan_layers"] else params


def to_state_dict(params: dict[str, Any], fields: dict[str, Any]) -> dict[str, np.ndarray]:
  """Params of ``LlamaGen(**fields)`` (either layout) -> the official state dict."""
  return engine.to_state_dict(unstack_layers(nn.meta.unbox(params)), key_map(fields))


# ------------------------------------------------------------------ files

def vocab_sizes_of(sd: dict[str, np.ndarray]) -> tuple[int, ...]:
  """The vocabulary sizes a state dict's token embeddings give: (V,) or one per sub-token group."""
  sd = {k.removeprefix("module."): v for k, v in sd.items()}
  if "tok_embeddings.weight" in sd:
    return (int(sd["tok_embeddings.weight"].shape[0]),)
  groups = []
  while f"{len(groups)}_emb.weight" in sd:
    groups.append(int(sd[f"{len(groups)}_emb.weight"].shape[0]))
  if not groups:
    raise torch_io.ConversionError("the checkpoint has no token embeddings (tok_embeddings.weight or 0_emb.weight), "
                                   "so its vocabulary size is unknown; is it a LlamaGen checkpoint?")
  return tuple(groups)


def fields_from_reference(run: dict[str, Any], vocab_sizes: tuple[int, ...]) -> dict[str, Any]:
  """The official ``config.yaml`` (or a checkpoint's ``config``) and the vocabulary -> LlamaGen fields.

  Reads ``model.model_type`` (``LlamaGen-{S,B,L,XL,XXL,XXXL}``), ``model.{dropout_p,
  token_dropout_p, drop_path_rate, cls_token_num}``, ``data.{image_size, num_classes}``,
  the tokenizer group (``fsq``, ``vqvae`` or ``cusvq``: ``downsample_ratio``, and
  ``fsq.{factorized_bits, factorized_n_layer}`` or ``codebook_size``) and
  ``repa.{use_repa, enc_type, encoder_depth}``, with the defaults of ``llamagen/train.py``.

  Args:
    run: The run config.
    vocab_sizes: From the checkpoint (:func:`vocab_sizes_of`); checked against the YAML.
  """
  model, data = run.get("model") or {}, run.get("data") or {}
  model_type = str(model.get("model_type", ""))
  match = re.fullmatch(r"LlamaGen-(\w+)", model_type)
  if not match or match.group(1) not in REFERENCE_SIZES:
    raise torch_io.ConversionError(f"model.model_type={model_type!r} is not supported; use LlamaGen-{{"
                                   f"{','.join(REFERENCE_SIZES)}}}.")
  if model.get("cls_token_num", 1) != 1:
    raise torch_io.ConversionError(f"model.cls_token_num={model['cls_token_num']} is not supported; class-"
                                   "conditional LlamaGen uses 1.")
  if "image_size" not in data or "num_classes" not in data:
    raise torch_io.ConversionError(f"the run config needs data.image_size and data.num_classes; data has "
                                   f"{sorted(data)}.")
  tokenizer = next((run[k] or {} for k in ("cusvq", "vqvae", "fsq") if k in run), {})  # train.py's order
  ratio = tokenizer.get("downsample_ratio", 8)  # 8: train.py's default
  if data["image_size"] % ratio:
    raise torch_io.ConversionError(f"data.image_size={data['image_size']} is not a multiple of the tokenizer's "
                                   f"downsample_ratio={ratio}.")
  _check_vocab(run, vocab_sizes)
  if model.get("drop_path_rate", 0.0) > 0:
    logging.warning("model.drop_path_rate=%s: stochastic depth is not implemented here; dropout_p is 0 as in the "
                    "reference's runs with drop path (this matters only to further training).",
                    model["drop_path_rate"])
  dropout = 0.0 if model.get("drop_path_rate", 0.0) > 0 else model.get("dropout_p", 0.1)
  return llamagen_config(REFERENCE_SIZES[match.group(1)], vocab_sizes=vocab_sizes,
                         grid_size=data["image_size"] // ratio, num_classes=data["num_classes"],
                         factorized_depth=(run.get("fsq") or {}).get("factorized_n_layer", 2),
                         token_dropout_prob=model.get("token_dropout_p", 0.1), dropout_prob=dropout,
                         **torch_io.repa_fields(run))


def _check_vocab(run: dict[str, Any], vocab_sizes: tuple[int, ...]) -> None:
  """The checkpoint's vocabulary agrees with what the YAML says of its tokenizer."""
  for group in ("cusvq", "vqvae"):
    size = (run.get(group) or {}).get("codebook_size")
    if group in run and size is not None and (size,) != vocab_sizes:
      raise torch_io.ConversionError(f"{group}.codebook_size={size}, but the checkpoint's token embeddings have "
                                     f"vocabulary {vocab_sizes}.")
  if "fsq" in run:
    bits = (run["fsq"] or {}).get("factorized_bits")
    groups = 1 if not bits else len(bits)
    if groups != len(vocab_sizes):
      raise torch_io.ConversionError(f"fsq.factorized_bits={bits} means {groups} sub-token group(s), but the "
                                     f"checkpoint's token embeddings have vocabulary {vocab_sizes}.")


def convert_file(checkpoint: epath.PathLike, out_dir: epath.PathLike, allow_partial: bool = False,
                 config: epath.PathLike | None = None, use_ema: bool = True) -> str:
  """Converts an official LlamaGen checkpoint into ``out_dir`` (params.safetensors + config.json); returns a summary."""
  sd, run = torch_io.read_training_checkpoint(checkpoint, config, use_ema, "config.yaml")
  fields = fields_from_reference(run, vocab_sizes_of(sd))
  dropped = engine.Dropped()
  params = to_params(sd, fields, allow_partial, dropped)
  saved.save(out_dir, params, {"kind": "llamagen", "model": fields, "weights": "ema" if use_ema else "model"})
  name = next(k for k, v in LLAMAGEN_SIZES.items()
              if v == (fields["depth"], fields["hidden_size"], fields["num_heads"]))
  summary = f"LlamaGen-{name} (vocabulary {'+'.join(map(str, fields['vocab_sizes']))})"
  return summary + (f" ({dropped.summary()})" if dropped else "")


load = saved.load_llamagen
exists = saved.exists

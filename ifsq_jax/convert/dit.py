"""Official iFSQ DiT checkpoints <-> :class:`ifsq_jax.models.dit.DiT` params.

Input: a checkpoint of the official ``dit/train.py`` (a torch pickle dict with
``model``, ``ema``, ``opt`` and ``config``; its ``ema`` weights by default, ``model``
with ``use_ema=False``), or a bare state dict (``.pt`` or ``.safetensors``), and the
run's ``run.yaml`` (or the ``config`` saved in the checkpoint). The file is read with
``torch.load(weights_only=True)``, which rebuilds tensors and plain containers only.

Every state-dict entry is mapped by one table (:func:`key_map`) that serves both
directions: ``blocks.3.attn.qkv.weight`` (3D, D) becomes ``blocks_3/attn/qkv/kernel``
(D, 3, K, d), and with ``scan_layers`` the blocks are stacked into ``blocks/...``
(depth, ...). The RoPE buffers ``feat_rope.freqs_cos/sin`` are not loaded: they are
recomputed and checked equal. An entry that maps nowhere, or a parameter the
checkpoint lacks, refuses the conversion with a message listing them (kept at their
initial values with ``allow_partial``).

D width, K heads, d head width, C latent channels, p patch size.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from etils import epath

from ifsq_jax import paths
from ifsq_jax.convert import torch_io
from ifsq_jax.models.dit import DIT_SIZES, DiT, dit_config, example_inputs, rope_tables

ROPE_BUFFERS = ("feat_rope.freqs_cos", "feat_rope.freqs_sin")
ROPE_ATOL = 1e-5  # the buffers are float32 cos / sin: different libm implementations differ by an ulp or two
DINOV2_WIDTHS = {"s": 384, "b": 768, "l": 1024, "g": 1536}  # REPA's dinov2-vit-{s,b,l,g}


@dataclasses.dataclass(frozen=True)
class Entry:
  """One state-dict entry and the param it becomes (in the unscanned layout).

  Attributes:
    key: The PyTorch state-dict key.
    path: The param's path, e.g. ``blocks_3/attn/qkv/kernel``.
    kind: "linear" (weight (out, in) <-> kernel (*in, *out)), "patch" (conv weight
      (D, C, p, p) <-> kernel (p, p, C, D)), "bias" (reshaped) or "copy".
    n_in: Input axes of a linear kernel.
  """

  key: str
  path: str
  kind: str = "copy"
  n_in: int = 1


def _linear(key: str, path: str, n_in: int = 1, bias: bool = True) -> list[Entry]:
  out = [Entry(f"{key}.weight", f"{path}/kernel", "linear", n_in)]
  return out + [Entry(f"{key}.bias", f"{path}/bias", "bias")] if bias else out


def key_map(fields: dict[str, Any]) -> list[Entry]:
  """Every param of ``DiT(**fields)`` with its state-dict key (the RoPE buffers aside)."""
  f = {**dit_config(), **fields}
  rms = f["use_rmsnorm"]
  entries = [Entry("pos_embed", "pos_embed"),
             Entry("x_embedder.proj.weight", "x_embedder/kernel", "patch"),
             Entry("x_embedder.proj.bias", "x_embedder/bias", "bias"),
             *_linear("t_embedder.mlp.0", "t_embedder/mlp_0"),
             *_linear("t_embedder.mlp.2", "t_embedder/mlp_2"),
             Entry("y_embedder.embedding_table.weight", "y_embedder/embedding_table")]
  for i in range(f["depth"]):
    key, path = f"blocks.{i}", f"blocks_{i}"
    if rms:  # LayerNorm blocks have no norm parameters
      entries += [Entry(f"{key}.norm1.weight", f"{path}/norm1/scale"), Entry(f"{key}.norm2.weight", f"{path}/norm2/scale")]
    entries += _linear(f"{key}.attn.qkv", f"{path}/attn/qkv")
    if f["use_qknorm"]:
      for name in ("q_norm", "k_norm"):
        entries.append(Entry(f"{key}.attn.{name}.weight", f"{path}/attn/{name}/scale"))
        if not rms:
          entries.append(Entry(f"{key}.attn.{name}.bias", f"{path}/attn/{name}/bias"))
    entries += _linear(f"{key}.attn.proj", f"{path}/attn/proj", n_in=2)
    for name in (("w12", "w3") if f["use_swiglu"] else ("fc1", "fc2")):
      entries += _linear(f"{key}.mlp.{name}", f"{path}/mlp/{name}")
    entries += _linear(f"{key}.adaLN_modulation.1", f"{path}/adaLN_modulation_1")
  if rms:
    entries.append(Entry("final_layer.norm_final.weight", "final_layer/norm_final/scale"))
  entries += _linear("final_layer.adaLN_modulation.1", "final_layer/adaLN_modulation_1")
  entries += _linear("final_layer.linear", "final_layer/linear")
  if f["z_dim"]:
    for j, torch_index in enumerate((0, 2, 4)):
      entries += _linear(f"projectors.0.{torch_index}", f"projector/linear_{j}")
  return entries


def torch_shape(entry: Entry, shape: tuple[int, ...]) -> tuple[int, ...]:
  """The state-dict shape of an entry whose param has ``shape``."""
  if entry.kind == "linear":
    return (math.prod(shape[entry.n_in:]), math.prod(shape[:entry.n_in]))
  if entry.kind == "patch":
    return (shape[3], shape[2], shape[0], shape[1])
  if entry.kind == "bias":
    return (math.prod(shape),)
  return tuple(shape)


def _to_param(entry: Entry, value: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  if entry.kind == "linear":
    return value.T.reshape(shape)
  if entry.kind == "patch":
    return value.transpose(2, 3, 1, 0)
  return value.reshape(shape)


def _to_torch(entry: Entry, value: np.ndarray) -> np.ndarray:
  shape = torch_shape(entry, value.shape)
  if entry.kind == "linear":
    return value.reshape(shape[::-1]).T
  if entry.kind == "patch":
    return value.transpose(3, 2, 0, 1)
  return value.reshape(shape)


# ------------------------------------------------------------------ layouts

def _flat(tree: dict[str, Any]) -> dict[str, Any]:
  return {jax.tree_util.keystr(p, simple=True, separator="/"): leaf
          for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def stack_blocks(params: dict[str, Any], depth: int) -> dict[str, Any]:
  """Unscanned params (``blocks_0`` ... ``blocks_{depth-1}``) -> scanned (``blocks``, leading layer axis)."""
  out = {k: v for k, v in params.items() if not re.fullmatch(r"blocks_\d+", k)}
  out["blocks"] = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]),
                               *[params[f"blocks_{i}"] for i in range(depth)])
  return out


def unstack_blocks(params: dict[str, Any]) -> dict[str, Any]:
  """Scanned params (``blocks`` with a leading layer axis) -> unscanned (``blocks_0`` ...)."""
  out = {k: v for k, v in params.items() if k != "blocks"}
  depth = jax.tree.leaves(params["blocks"])[0].shape[0]
  for i in range(depth):
    out[f"blocks_{i}"] = jax.tree.map(lambda x, i=i: np.asarray(x[i]), params["blocks"])
  return out


def _unscanned_init(fields: dict[str, Any], abstract: bool) -> dict[str, Any]:
  """The params of ``DiT(**fields)`` in the unscanned layout: shapes (``abstract``) or the init with key 0.

  The key is an "rbg" one: XLA's CPU backend takes seconds per dozen threefry draws to compile an init, and
  about a tenth of that with rbg.
  """
  module = DiT(**{**fields, "scan_layers": False, "remat_policy": "none"})
  args = (jax.random.key(0, impl="rbg"), *example_inputs(module))
  variables = jax.eval_shape(module.init, *args) if abstract else jax.jit(module.init)(*args)
  return nn.meta.unbox(variables["params"])


# ------------------------------------------------------------------ state dict <-> params

def to_params(sd: dict[str, np.ndarray], fields: dict[str, Any], allow_partial: bool = False,
              dropped: torch_io.Dropped | None = None) -> dict[str, Any]:
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
  expected = _flat(_unscanned_init(fields, abstract=True))
  flat: dict[str, np.ndarray] = {}
  used = set()
  for entry in key_map(fields):
    if entry.key not in sd:
      continue
    shape = tuple(expected[entry.path].shape)
    value = np.asarray(sd[entry.key], np.float32)
    if value.shape != torch_shape(entry, shape):
      raise torch_io.ConversionError(f"{entry.key}: checkpoint shape {value.shape}, but {entry.path} of this DiT "
                                     f"needs {torch_shape(entry, shape)}; check the run config (model size, "
                                     "patch, classes, REPA encoder).")
    flat[entry.path] = _to_param(entry, value, shape)
    used.add(entry.key)
  if fields["use_rope"]:
    _check_rope(sd, fields, used)
  missing = sorted(p for p in expected if p not in flat)
  if missing and not allow_partial:
    keys = {e.path: e.key for e in key_map(fields)}
    raise torch_io.ConversionError(
        f"the checkpoint has nothing for {len(missing)} model parameters: "
        + ", ".join(f"{keys[p]} -> {p}" for p in missing[:10]) + (" ..." if len(missing) > 10 else "")
        + " (pass --allow_partial to keep their initial values).")
  torch_io.check_all_used(sd, used, allow_partial=allow_partial, dropped=dropped)
  if missing:
    torch_io.report_dropped(left_at_init=missing, dropped=dropped)
    initial = _flat(_unscanned_init(fields, abstract=False))
    flat.update({p: np.asarray(initial[p]) for p in missing})
  params = torch_io.unflatten(flat)
  return stack_blocks(params, fields["depth"]) if fields["scan_layers"] else params


def _check_rope(sd: dict[str, np.ndarray], fields: dict[str, Any], used: set[str]) -> None:
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
    used.add(key)


def to_state_dict(params: dict[str, Any], fields: dict[str, Any]) -> dict[str, np.ndarray]:
  """Params of ``DiT(**fields)`` (either layout) -> the official state dict, RoPE buffers included."""
  fields = {**dit_config(), **fields}
  params = nn.meta.unbox(params)
  if "blocks" in params:
    params = unstack_blocks(params)
  flat = _flat(params)
  sd = {e.key: np.ascontiguousarray(_to_torch(e, np.asarray(flat[e.path], np.float32))) for e in key_map(fields)}
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
  repa = run.get("repa") or {}
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
  z_dim, encoder_depth = 0, repa.get("encoder_depth", 8)
  if repa.get("use_repa", False):
    enc_type = str(repa.get("enc_type", ""))
    enc = re.fullmatch(r"dinov2-vit-([sblg])", enc_type)
    if not enc:
      raise torch_io.ConversionError(f"repa.enc_type={enc_type!r} is not supported; use one DINOv2 encoder, "
                                     "dinov2-vit-{s,b,l,g}.")
    z_dim = DINOV2_WIDTHS[enc.group(1)]
  return dit_config(match.group(1), patch, input_size=data["image_size"] // ratio,
                    in_channels=model.get("in_chans", 4), num_classes=data["num_classes"],
                    use_qknorm=bool(model.get("use_qknorm", False)), use_swiglu=bool(model.get("use_swiglu", False)),
                    use_rope=bool(model.get("use_rope", False)), use_rmsnorm=bool(model.get("use_rmsnorm", False)),
                    encoder_depth=encoder_depth, z_dim=z_dim)


def read_checkpoint(path: epath.PathLike, use_ema: bool = True) -> tuple[dict[str, np.ndarray], dict[str, Any] | None]:
  """(state dict, the run config saved in it or None) of an official DiT checkpoint or a bare state dict."""
  path = epath.Path(path)
  if path.name.endswith(".safetensors"):
    return torch_io.read_state_dict(path), None
  if not path.exists():
    raise FileNotFoundError(f"checkpoint {path} does not exist.")
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise torch_io.ConversionError(f"reading {path} needs PyTorch (pip install torch==2.13.0).") from None
  try:
    obj = _torch_load(path)
  except Exception as e:  # pylint: disable=broad-except
    raise torch_io.ConversionError(f"{path} is not a plain tensor checkpoint (torch.load(weights_only=True) "
                                   f"refused it: {str(e).splitlines()[0][:300]}).") from None
  config = obj.get("config") if isinstance(obj, dict) and isinstance(obj.get("config"), dict) else None
  want = "ema" if use_ema else "model"
  if isinstance(obj, dict) and ("ema" in obj or "model" in obj):
    if not isinstance(obj.get(want), dict):
      hint = " (pass --no_ema to convert 'model')" if use_ema else ""
      raise torch_io.ConversionError(f"{path} has no {want!r} state dict; its entries are {sorted(obj)}{hint}.")
    obj = obj[want]
  return torch_io._flatten_tensors(obj, str(path)), config  # pylint: disable=protected-access


def _torch_load(path: epath.Path) -> Any:
  """``torch.load(weights_only=True)`` of a local file (memory-mapped) or a file in a bucket (read as a stream)."""
  import torch  # pylint: disable=g-import-not-at-top
  if not paths.is_remote(path):
    # mmap: only the weights asked for are read (the file also holds the other weights and the optimizer state);
    # files in torch's legacy (non-zip) format cannot be mapped and are read whole.
    try:
      return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
      if "mmap" not in str(e):
        raise
  with path.open("rb") as f:
    return torch.load(f, map_location="cpu", weights_only=True)


def convert_file(checkpoint: epath.PathLike, out_dir: epath.PathLike, allow_partial: bool = False,
                 config: epath.PathLike | None = None, use_ema: bool = True) -> str:
  """Converts an official DiT checkpoint into ``out_dir`` (params.safetensors + config.json); returns a summary."""
  sd, saved = read_checkpoint(checkpoint, use_ema)
  if config:
    try:
      import yaml  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise torch_io.ConversionError("reading --config needs PyYAML (pip install pyyaml); without --config the "
                                     "run config saved in the checkpoint is used.") from None
    try:
      saved = yaml.safe_load(epath.Path(config).read_text())
    except yaml.YAMLError as e:
      raise torch_io.ConversionError(f"{config} is not a YAML run config: {str(e)[:300]}") from None
  if not isinstance(saved, dict) or not saved:
    where = f"{config} is not a run config (a YAML mapping)" if config else f"{checkpoint} holds no run config"
    raise torch_io.ConversionError(f"{where}; pass --config RUN_YAML (the run's run.yaml).")
  fields = fields_from_reference(saved)
  dropped = torch_io.Dropped()
  params = to_params(sd, fields, allow_partial, dropped)
  torch_io.save_converted(out_dir, params, {"kind": "dit", "model": fields, "weights": "ema" if use_ema else "model"})
  name = next(k for k, v in DIT_SIZES.items() if v == (fields["depth"], fields["hidden_size"], fields["num_heads"]))
  return f"DiT-{name}/{fields['patch_size']}" + (f" ({dropped.summary()})" if dropped else "")


def load(path: epath.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
  """(DiT fields, params) from a directory written by ``python -m ifsq_jax.convert dit``."""
  params, config = torch_io.load_converted(path, "dit")
  return dict(config["model"]), params


def exists(path: epath.PathLike) -> bool:
  return torch_io.exists(path)

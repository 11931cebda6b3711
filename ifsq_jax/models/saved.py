"""The on-disk format of a converted directory, defined once for writers and readers.

``python -m ifsq_jax.convert KIND`` writes a directory with ``params.safetensors``
(the flattened param tree, keys joined with ``/``) and ``config.json`` (``kind`` and
what is needed to rebuild the module, e.g. ``model`` with the module's fields). The
converters in :mod:`ifsq_jax.convert` write it with :func:`save`; the loaders in
:mod:`ifsq_jax.models` read it with :func:`load` and the ``*_from_json`` helpers,
without importing the converters (nor PyTorch). Every path may be local or
``gs://...`` (:mod:`ifsq_jax.paths`).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np
from etils import epath

from ifsq_jax import paths
from ifsq_jax.models.llamagen import llamagen_config
from ifsq_jax.models.tokenizer import TokenizerConfig

PARAMS, CONFIG = "params.safetensors", "config.json"

# Where the original weights of the kinds that have no training run here come from (for the not-found message).
WHERE = {
    "dinov2": "a Hugging Face facebook/dinov2-{small,base,large,giant} model.safetensors, or torch hub's "
              "dinov2_vit{s,b,l,g}14_pretrain.pth from the facebookresearch/dinov2 release",
    "inception": "pt_inception-2015-12-05-6726825d.pth from the pytorch-fid GitHub releases (mseitzer/pytorch-fid)",
    "vgg16": "torchvision's vgg16-397923af.pth (ImageNet weights), optionally with the LPIPS heads vgg.pth "
             "of taming-transformers",
}


class ConversionError(ValueError):
  """A checkpoint that cannot be converted (unsafe, unmapped or missing keys), or a directory of another kind."""


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
  """A nested dict of arrays -> {"a/b/c": contiguous numpy array}."""
  out = {}
  for k, v in tree.items():
    name = f"{prefix}/{k}" if prefix else k
    if isinstance(v, dict):
      out.update(flatten(v, name))
    else:
      out[name] = np.ascontiguousarray(np.asarray(v))
  return out


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
  """{"a/b/c": leaf} -> the nested dict."""
  tree: dict[str, Any] = {}
  for name, v in flat.items():
    node = tree
    *parents, leaf = name.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = v
  return tree


def save(out_dir: epath.PathLike, params: dict[str, Any], config: dict[str, Any]) -> None:
  """Writes ``params.safetensors`` and ``config.json`` into ``out_dir`` (each file atomically)."""
  from safetensors.numpy import save as save_bytes  # pylint: disable=g-import-not-at-top
  out_dir = epath.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  paths.write_bytes(out_dir / PARAMS, save_bytes(flatten(params)))
  paths.write_text(out_dir / CONFIG, json.dumps(config, indent=2, sort_keys=True))


def exists(path: epath.PathLike) -> bool:
  """Whether ``path`` holds converted weights (``params.safetensors``)."""
  return (epath.Path(path) / PARAMS).exists()


def kind(path: epath.PathLike) -> str | None:
  """The ``kind`` a converted directory's ``config.json`` names; None without one."""
  config = epath.Path(path) / CONFIG
  return json.loads(config.read_text()).get("kind") if config.exists() else None


def load(path: epath.PathLike, expect_kind: str) -> tuple[dict[str, Any], dict[str, Any]]:
  """(params, config) from a directory written by ``python -m ifsq_jax.convert expect_kind``.

  Raises:
    FileNotFoundError: ``path`` lacks ``config.json`` or ``params.safetensors``; the message says how to convert.
    ConversionError: the directory holds weights of another kind.
  """
  root = epath.Path(path)
  cfg_path, par_path = root / CONFIG, root / PARAMS
  if not (cfg_path.exists() and par_path.exists()):
    raise FileNotFoundError(
        f"{path} holds no converted {expect_kind} weights ({CONFIG} + {PARAMS}). They are converted "
        f"from {WHERE.get(expect_kind, 'the original PyTorch checkpoint')}: "
        f"python -m ifsq_jax.convert {expect_kind} --checkpoint FILE --out {path}")
  config = json.loads(cfg_path.read_text())
  if config.get("kind") != expect_kind:
    raise ConversionError(f"{path} holds {config.get('kind')!r} weights, not {expect_kind!r}.")
  from safetensors.numpy import load as load_bytes  # pylint: disable=g-import-not-at-top
  return unflatten(dict(load_bytes(par_path.read_bytes()))), config


# ------------------------------------------------------------------ the model fields of each kind

def tokenizer_to_json(cfg: TokenizerConfig) -> dict[str, Any]:
  """The ``model`` entry of a converted tokenizer's ``config.json``."""
  return dataclasses.asdict(cfg)


def tokenizer_from_json(d: dict[str, Any]) -> TokenizerConfig:
  """A converted tokenizer's ``model`` entry -> its config (JSON lists back to tuples)."""
  d = dict(d)
  for k in ("hidden_size_mult", "downsample", "upsample", "attn_resolutions", "levels"):
    d[k] = tuple(d[k])
  d["group_sizes"] = tuple(d["group_sizes"]) if d.get("group_sizes") else None
  return TokenizerConfig(**d)


def load_tokenizer(path: epath.PathLike) -> tuple[TokenizerConfig, dict[str, Any]]:
  """(config, {"params": ...}) from a directory written by ``python -m ifsq_jax.convert tokenizer``."""
  params, config = load(path, "tokenizer")
  return tokenizer_from_json(config["model"]), {"params": params}


def load_dit(path: epath.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
  """(DiT fields, params) from a directory written by ``python -m ifsq_jax.convert dit``."""
  params, config = load(path, "dit")
  return dict(config["model"]), params


def load_llamagen(path: epath.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
  """(LlamaGen fields, params) from a directory written by ``python -m ifsq_jax.convert llamagen``."""
  params, config = load(path, "llamagen")
  return llamagen_config(**{k: v for k, v in config["model"].items() if k != "dtype"}), params


def load_inception(path: str, **fields) -> tuple[Any, dict[str, Any]]:
  """(InceptionV3FID module, variables) of ``python -m ifsq_jax.convert inception``; ``fields`` set the module's."""
  from ifsq_jax.nets.inception import InceptionV3FID  # pylint: disable=g-import-not-at-top
  variables, _ = load(path, "inception")
  return InceptionV3FID(**fields), variables


def load_dinov2(path: str) -> tuple[Any, dict[str, Any]]:
  """(DinoV2 module, {"params": ...}) of ``python -m ifsq_jax.convert dinov2``."""
  from ifsq_jax.nets.dinov2 import DinoConfig, DinoV2  # pylint: disable=g-import-not-at-top
  params, config = load(path, "dinov2")
  config.pop("kind")
  return DinoV2(DinoConfig(**config)), {"params": params}

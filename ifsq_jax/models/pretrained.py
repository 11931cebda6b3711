"""``load_tokenizer``: a trained tokenizer, ready to encode and decode, in one call.

NHWC float images in [-1, 1]; B batch, h w latent size.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from etils import epath

from ifsq_jax import config_lib, shapes_only
from ifsq_jax.models import saved
from ifsq_jax.models.tokenizer import Tokenizer, TokenizerConfig


class LoadedTokenizer:
  """A tokenizer with its parameters; every method is jitted.

  Attributes:
    config: The architecture.
    model: The Linen module.
    variables: ``{"params": ...}``.
  """

  def __init__(self, config: TokenizerConfig, variables: dict[str, Any], dtype: Any = jnp.float32):
    self.config = config
    self.model = Tokenizer(config, dtype=dtype)
    self.variables = variables
    apply = lambda method: jax.jit(lambda v, x: self.model.apply(v, x, method=method))
    self._encode = apply(lambda m, x: m.encode(x).codes)
    self._indices = apply(lambda m, x: m.encode(x).indices)
    self._decode = apply(lambda m, z: m.decode(z))
    self._decode_indices = apply(lambda m, i: m.decode_indices(i))

  def encode(self, images: jax.Array) -> jax.Array:
    """(B, H, W, 3) -> codes (B, h, w, embed_dim)."""
    return self._encode(self.variables, images)

  def encode_to_indices(self, images: jax.Array) -> jax.Array:
    """(B, H, W, 3) -> indices (B, h, w) (or (B, h, w, G) with factorized groups)."""
    return self._indices(self.variables, images)

  def decode(self, codes: jax.Array) -> jax.Array:
    """Codes (B, h, w, embed_dim) -> images (B, H, W, 3), not clamped."""
    return self._decode(self.variables, codes)

  def decode_indices(self, indices: jax.Array) -> jax.Array:
    """Indices -> images (B, H, W, 3)."""
    return self._decode_indices(self.variables, indices)


def load_tokenizer(path: str, dtype: Any = jnp.float32, ema: bool = True) -> LoadedTokenizer:
  """A ready tokenizer from a training work dir, its ``checkpoints`` dir or one step dir, or a directory written by
  ``python -m ifsq_jax.convert tokenizer``; local or ``gs://...``.

  From a work dir: the newest readable checkpoint (an unreadable newer one is
  skipped with a warning), its EMA weights by default (``ema=False``: the trained
  generator weights), and the architecture from the config saved with that step
  (else the work dir's ``config.json``). Configs of older versions load: fields
  they lack take their defaults.

  Inside :func:`ifsq_jax.shapes_only.enabled` only the architecture is read (``path``
  may also be a tokenizer config file) and the variables are shapes.
  """
  if shapes_only.active():
    config = _architecture(path)
    x = jnp.zeros((1, config.resolution, config.resolution, 3), jnp.float32)
    return LoadedTokenizer(config, {"params": shapes_only.init_shapes(Tokenizer(config).init, x)["params"]}, dtype)
  root = epath.Path(path)
  if saved.exists(str(root)):
    config, variables = saved.load_tokenizer(str(root))
    return LoadedTokenizer(config, variables, dtype)
  workdir = next((d for d in (root, root.parent, root.parent.parent) if (d / "config.json").exists()), None)
  if workdir is None:
    raise FileNotFoundError(f"{path} is neither a tokenizer work dir (config.json + checkpoints/), a checkpoint of "
                            "one, nor a converted directory (python -m ifsq_jax.convert tokenizer).")
  run_config = json.loads((workdir / "config.json").read_text())
  if run_config.get("kind") == "tokenizer":
    raise FileNotFoundError(f"{workdir} holds a converted tokenizer's config.json but no params.safetensors.")
  if run_config.get("task") != "tokenizer":
    raise ValueError(f"{workdir} holds a {run_config.get('task')!r} run, not a tokenizer.")
  # Imported here: Orbax is needed only for work dirs.
  from ifsq_jax import checkpoint  # pylint: disable=g-import-not-at-top
  field = "ema_params" if ema else "params"
  step, fields = checkpoint.restore_fields(root, {field: None})
  params = fields[field]
  # The config saved with the step: config.json is rewritten by any later run in the work dir.
  config = ml_collections.ConfigDict(checkpoint.read_saved_config(checkpoint.step_directory(root, step)) or run_config)
  if not ema:
    params = params["gen"]
  return LoadedTokenizer(model_config(config), {"params": jax.device_get(params)}, dtype)


def _architecture(path: str) -> TokenizerConfig:
  """The architecture of a tokenizer config file, converted directory or work dir (no weights read)."""
  if shapes_only.is_config_file(path):
    config = shapes_only.load_config_file(path)
    if config.get("task") != "tokenizer":
      raise ValueError(f"{path} is a {config.get('task')!r} config, not a tokenizer's.")
    return model_config(config)
  root = epath.Path(path)
  workdir = next((d for d in (root, root.parent, root.parent.parent) if (d / "config.json").exists()), None)
  if workdir is None:
    raise FileNotFoundError(f"{path} is neither a tokenizer config file, work dir (config.json + checkpoints/), a "
                            "checkpoint of one, nor a converted directory (python -m ifsq_jax.convert tokenizer).")
  written = json.loads((workdir / "config.json").read_text())
  if written.get("kind") == "tokenizer":  # a converted directory
    return saved.tokenizer_from_json(written["model"])
  if written.get("task") != "tokenizer":
    raise ValueError(f"{workdir} holds a {written.get('task') or written.get('kind')!r} run, not a tokenizer.")
  return model_config(ml_collections.ConfigDict(written))


def model_config(config: ml_collections.ConfigDict) -> TokenizerConfig:
  """The :class:`TokenizerConfig` of a tokenizer run's config (its ``model`` group and ``data.image_size``).

  ``group_sizes: ()`` (or ``[]`` in a saved ``config.json``) means one index per token (None).
  """
  model = config.model
  group_sizes = tuple(model.get("group_sizes") or ()) or None
  return config_lib.to_dataclass(TokenizerConfig, model, resolution=config.data.image_size, group_sizes=group_sizes)

"""Frozen networks opened without their weights (``--compile_only``): the shapes a real load gives."""

import dataclasses
import json

import flax.linen as nn
import jax
import numpy as np
import pytest

from conftest import REPO
from ifsq_jax import shapes_only
from ifsq_jax.convert import torch_io
from ifsq_jax.models.pretrained import load_tokenizer
from ifsq_jax.models.tokenizer import Tokenizer, TokenizerConfig
from ifsq_jax.nets import repa

_shapes = lambda tree: jax.tree.map(lambda x: (tuple(x.shape), np.dtype(x.dtype)), tree)


def test_a_converted_tokenizer_opens_as_the_shapes_of_its_weights(tmp_path):
  cfg = TokenizerConfig(hidden_size=32, hidden_size_mult=(1, 1), num_res_blocks=1, downsample=(True, False),
                        upsample=(False, True), resolution=16, levels=(5, 5, 5, 5))
  params = nn.meta.unbox(Tokenizer(cfg).init(jax.random.key(0), np.zeros((1, 16, 16, 3), np.float32))["params"])
  torch_io.save_converted(str(tmp_path / "tok"), params, {"kind": "tokenizer", "model": dataclasses.asdict(cfg)})
  real = load_tokenizer(str(tmp_path / "tok"))
  (tmp_path / "tok" / "params.safetensors").unlink()  # shapes only read the config
  with shapes_only.enabled():
    abstract = load_tokenizer(str(tmp_path / "tok"))
    from_file = load_tokenizer(str(REPO / "configs" / "ifsq_f16_d4.py") + ":tiny")
    with pytest.raises(ValueError, match="is a 'dit' config, not a tokenizer's"):
      load_tokenizer(str(REPO / "configs" / "dit_l2.py"))
  assert abstract.config == real.config
  assert _shapes(abstract.variables) == _shapes(real.variables)
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(abstract.variables))
  assert from_file.config.resolution == shapes_only.load_config_file(
      str(REPO / "configs" / "ifsq_f16_d4.py") + ":tiny").data.image_size
  with pytest.raises(FileNotFoundError, match="but no params.safetensors"):  # outside the block: weights needed
    load_tokenizer(str(tmp_path / "tok"))


def test_the_dinov2_target_opens_as_b14_shapes_or_a_converted_config(tmp_path):
  with shapes_only.enabled():
    b14 = repa.load_target("dinov2", "")
    (tmp_path / "small").mkdir()
    (tmp_path / "small" / "config.json").write_text(json.dumps(
        {"kind": "dinov2", "width": 384, "depth": 12, "heads": 6, "patch": 14, "pos_grid": 37}))
    small = repa.load_target("dinov2", str(tmp_path / "small"))
    with pytest.raises(ValueError, match="holds no converted DINOv2 config.json"):
      repa.load_target("dinov2", str(tmp_path))
  assert b14.dim == 768 and small.dim == 384
  n_params = lambda t: sum(x.size for x in jax.tree.leaves(t.params))
  assert 86e6 < n_params(b14) < 87.5e6  # DINOv2-B/14: 86.6M parameters
  images = jax.ShapeDtypeStruct((2, 64, 64, 3), np.float32)
  feats = jax.eval_shape(lambda p, x: b14.features(p, x, 16), b14.params, images)
  assert feats.shape == (2, 256, 768)  # 16 x 16 patch tokens for the DiT's grid
  with pytest.raises(ValueError, match="needs converted DINOv2 weights"):
    repa.load_target("dinov2", "")

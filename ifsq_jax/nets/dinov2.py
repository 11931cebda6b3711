"""DINOv2 ViT (Oquab et al. 2023) as a frozen Linen module: the REPA target encoder.

Sizes S/14, B/14 (the REPA default), L/14 and G/14 (SwiGLU MLP). The module
returns the final-LayerNorm tokens; :func:`patch_tokens` drops the class token
(``x_norm_patchtokens``). The position embedding is stored at the checkpoint's
grid (37 x 37 for the released models) and resampled to the input's grid as
timm's ``resample_abs_pos_embed`` does for REPA: bicubic with antialias, the
class-token embedding kept (``jax.image.resize`` matches PyTorch's antialiased
bicubic to 1e-6).

Weights: converted from a Hugging Face ``facebook/dinov2-*`` safetensors file or
a torch-hub ``dinov2_vit*14.pth`` (``python -m ifsq_jax.convert dinov2``).

B batch, N tokens, D width, P patch size.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

SIZES = {  # width, depth, heads, swiglu
    "small": (384, 12, 6, False),
    "base": (768, 12, 12, False),
    "large": (1024, 24, 16, False),
    "giant": (1536, 40, 24, True),
}


@dataclasses.dataclass(frozen=True)
class DinoConfig:
  """Architecture of one DINOv2 model (stored beside converted weights)."""

  width: int = 768
  depth: int = 12
  heads: int = 12
  patch: int = 14
  pos_grid: int = 37  # side of the stored position-embedding grid
  mlp_ratio: float = 4.0
  swiglu: bool = False
  layer_norm_eps: float = 1e-6

  @property
  def mlp_hidden(self) -> int:
    hidden = int(self.width * self.mlp_ratio)
    return (int(hidden * 2 / 3) + 7) // 8 * 8 if self.swiglu else hidden


def resample_pos_embed(pos: jax.Array, grid: tuple[int, int]) -> jax.Array:
  """(1, 1 + g*g, D) -> (1, 1 + h*w, D): bicubic with antialias, class token kept (timm's REPA resampling)."""
  cls, patches = pos[:, :1], pos[:, 1:]
  g = int(round(patches.shape[1] ** 0.5))
  if (g, g) == tuple(grid):
    return pos
  d = patches.shape[-1]
  img = patches.reshape(1, g, g, d).astype(jnp.float32)
  img = jax.image.resize(img, (1, grid[0], grid[1], d), "bicubic", antialias=True)
  return jnp.concatenate([cls, img.reshape(1, grid[0] * grid[1], d).astype(pos.dtype)], axis=1)


class _Block(nn.Module):
  cfg: DinoConfig

  @nn.compact
  def __call__(self, x):
    c = self.cfg
    h = nn.LayerNorm(epsilon=c.layer_norm_eps, name="norm1")(x)
    b, n, _ = h.shape
    qkv = nn.Dense(3 * c.width, name="qkv")(h).reshape(b, n, 3, c.heads, c.width // c.heads)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    att = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=jax.lax.Precision.HIGHEST) / jnp.sqrt(c.width / c.heads)
    h = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(att, axis=-1), v,
                   precision=jax.lax.Precision.HIGHEST).reshape(b, n, c.width)
    h = nn.Dense(c.width, name="proj")(h)
    x = x + h * self.param("ls1", nn.initializers.ones, (c.width,))
    h = nn.LayerNorm(epsilon=c.layer_norm_eps, name="norm2")(x)
    if c.swiglu:
      a, g = jnp.split(nn.Dense(2 * c.mlp_hidden, name="w12")(h), 2, axis=-1)
      h = nn.Dense(c.width, name="w3")(jax.nn.silu(a) * g)
    else:
      h = nn.Dense(c.width, name="fc2")(nn.gelu(nn.Dense(c.mlp_hidden, name="fc1")(h), approximate=False))
    return x + h * self.param("ls2", nn.initializers.ones, (c.width,))


class DinoV2(nn.Module):
  """(B, H, W, 3) ImageNet-normalised images (H, W multiples of the patch) -> (B, 1 + N, D) normed tokens."""

  cfg: DinoConfig = DinoConfig()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.cfg
    if x.shape[1] % c.patch or x.shape[2] % c.patch:
      raise ValueError(f"image size {x.shape[1:3]} is not a multiple of the patch size {c.patch}.")
    h = nn.Conv(c.width, (c.patch, c.patch), strides=c.patch, padding="VALID", name="patch_embed")(x)
    b, gh, gw, _ = h.shape
    h = h.reshape(b, gh * gw, c.width)
    cls = self.param("cls_token", nn.initializers.zeros, (1, 1, c.width))
    pos = self.param("pos_embed", nn.initializers.zeros, (1, 1 + c.pos_grid ** 2, c.width))
    h = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, c.width)), h], axis=1) + resample_pos_embed(pos, (gh, gw))
    for i in range(c.depth):
      h = _Block(c, name=f"blocks_{i}")(h)
    return nn.LayerNorm(epsilon=c.layer_norm_eps, name="norm")(h)


def patch_tokens(tokens: jax.Array) -> jax.Array:
  """(B, 1 + N, D) -> (B, N, D): ``x_norm_patchtokens``."""
  return tokens[:, 1:]


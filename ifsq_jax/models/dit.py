"""The DiT generator of the iFSQ paper (LightningDiT options, REPA projector) in Linen.

A diffusion transformer (Peebles & Xie 2023) as the official ``dit/models/dit.py``
trains it on iFSQ latents: patch embedding plus the fixed MAE 2D sin-cos position
table, a timestep embedding (t in [0, 1], unscaled; 256 frequencies, cos first,
float32) plus a label embedding (``num_classes + 1`` rows, the last one the null
class of classifier-free guidance), ``depth`` adaLN-Zero blocks and a final
adaLN layer. The LightningDiT options, each a field and all on by default:

* ``use_rmsnorm``: RMSNorm (eps 1e-6, float32 statistics, learnable scale) for the
  block and final norms; otherwise a LayerNorm without affine parameters (eps 1e-6).
* ``use_qknorm``: a norm over the head width on q and k before RoPE, its scale shared
  by the heads (separate for q and k): RMSNorm, or with ``use_rmsnorm=False`` the
  reference's LayerNorm with scale and bias (eps 1e-5).
* ``use_swiglu``: SwiGLU MLP, hidden ``int(2/3 * mlp_ratio * D)``, biases, the
  ``w12`` output split into ``[x1 | x2]`` with ``silu(x1) * x2``; otherwise a
  GELU(tanh) MLP of hidden ``mlp_ratio * D`` (``fc1``, ``fc2``).
* ``use_rope``: 2D rotary embedding in the EVA-02 style (interleaved pairs, theta
  10000, the first half of the head width rotated by the token's row, the second by
  its column). The absolute sin-cos table is added as well, as the reference does.

The REPA projector (D -> projector_dim -> projector_dim -> z_dim, SiLU between)
reads the residual stream after block ``encoder_depth`` (counted from 1; 0 is the
embedded input). ``z_dim = 0`` builds no projector.

Module names mirror the reference's (``blocks.3.attn.qkv`` becomes
``blocks_3/attn/qkv``; ``adaLN_modulation.1`` becomes ``adaLN_modulation_1``), with
kernels laid out for sharding: ``qkv`` is (D, 3, heads, head_dim), ``proj``
(heads, head_dim, D), ``w12`` (D, 2, hidden) and the adaLN kernels (D, 6, D) and
(D, 2, D), so that the heads and the MLP hidden width split over the tensor axis
without cutting across q/k/v or x1/x2. :mod:`ifsq_jax.convert.dit` maps the
official state dict onto these params and back.

With ``scan_layers`` (the default) the blocks run under ``nn.scan`` and their
params are stacked on a leading layer axis (``blocks/attn/qkv/kernel`` is
(depth, D, 3, heads, head_dim)), so the program compiles one block whatever the
depth. The REPA tap rides in the scan's carry (a select per layer), which keeps a
single stacked ``blocks`` tree whatever ``encoder_depth`` is; the select needs only
the layer index in the backward pass, so the tap adds no saved activations. Without
``scan_layers`` the blocks are ``blocks_0`` ... ``blocks_{depth-1}``. ``remat_policy``
wraps each block in ``nn.remat``.

The attention, SwiGLU, norms, block stack, projector and label table are the
shared parts of :mod:`ifsq_jax.models.transformer`; this file holds what is DiT's
own: the patch embedding, the fixed tables, the timestep embedding, the
adaLN-Zero block and the final layer.

Precision: params are float32; ``dtype`` is the compute dtype of the matmuls and
the branches; every matmul accumulates in float32 and adds its bias in float32
before the cast to ``dtype``. The residual stream stays float32 (under the reference's bf16
autocast it is float32 too: the float32 position table promotes it); norm
statistics, the timestep frequencies, RoPE and the attention softmax are float32;
outputs are float32.

Initialisation as the reference's ``initialize_weights``: xavier-uniform linear
kernels (the patch embedding on its (D, C * p * p) view) with zero biases, label
table and timestep MLP kernels N(0, 0.02), zero adaLN and final-layer kernels and
biases, norm scales 1. ``pos_embed`` (1, N, D) is a param initialised to the sin-cos
table; the module stops its gradient and trainers freeze it with
:func:`trainable_mask`, as the reference's ``requires_grad=False`` parameter.

Differences from the reference: inputs and outputs are channels last; there is
no ``forward_with_cfg`` (its guidance of 3 of 4 channels is a sampler option,
``ifsq_jax.sampling``); only one REPA projector (``z_dims`` of length 1).

B batch, H W latent height and width, C latent channels, p patch size,
h w token grid (H / p, W / p), N tokens (h * w, raster order), D width,
K heads, d head width (D / K), F MLP hidden width, Z REPA width.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ifsq_jax.models import transformer
# Re-exported: the trainers, converters and tests read these from here.
from ifsq_jax.models.transformer import (ATTENTION_IMPLS, REMAT_POLICIES, Dense, LabelEmbedder,  # pylint: disable=unused-import
                                         Projector, num_params, xavier_uniform)
from ifsq_jax.parallel import BATCH, CONV_IN, EMBED, KERNEL_H, KERNEL_W, MLP, constrain

# name: (depth, width, heads).
DIT_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}

FREQ_DIM = 256  # timestep frequencies
MAX_PERIOD = 10000.0
ROPE_THETA = 10000.0
NORM_EPS = 1e-6
QK_LAYERNORM_EPS = 1e-5  # nn.LayerNorm's default, for the QK-norm without RMSNorm



# ------------------------------------------------------------------ fixed tables

def sincos_pos_embed(width: int, grid: int) -> np.ndarray:
  """The MAE 2D sin-cos table (N, D) float32, N = grid * grid in raster order.

  The first D/2 dims encode the column, the last D/2 the row (the reference's
  ``meshgrid(w, h)``); each half is ``[sin(p w_k), cos(p w_k)]`` with
  ``w_k = 10000^(-k / (D/4))``. Computed in float64 and rounded, as the reference.
  """
  if width % 4:
    raise ValueError(f"hidden_size={width}: the 2D sin-cos table needs a multiple of 4.")
  omega = 1.0 / 10000 ** (np.arange(width // 4, dtype=np.float64) / (width / 4))

  def one_axis(pos):
    out = np.outer(pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  rows, cols = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32), indexing="ij")
  return np.concatenate([one_axis(cols), one_axis(rows)], axis=1).astype(np.float32)


def _rope_angles(head_dim: int, grid: int) -> np.ndarray:
  """(N, d/2) angles of the EVA-02 2D RoPE, one per rotated pair (see :func:`rope_tables`)."""
  coords = np.arange(grid, dtype=np.float32) / np.float32(grid) * np.float32(grid)  # the reference's t
  return transformer.rope_angles_2d(grid, head_dim, ROPE_THETA, coords)


def rope_tables(head_dim: int, grid: int) -> tuple[np.ndarray, np.ndarray]:
  """cos and sin (N, d) float32 of the EVA-02 2D RoPE (``VisionRotaryEmbeddingFast(d / 2, grid)``).

  Per token (row r, column c) the d angles are ``[r theta | c theta]``, each
  frequency ``theta_j = 10000^(-2j / (d/2))`` repeated twice (interleaved pairs):
  the reference's buffers. Computed in float32 as the reference computes them.
  """
  angles = np.repeat(_rope_angles(head_dim, grid), 2, axis=1)
  return np.cos(angles), np.sin(angles)


def timestep_embedding(t: jax.Array, dim: int = FREQ_DIM) -> jax.Array:
  """t (B,) -> (B, dim) float32 ``[cos(t f), sin(t f)]``, ``f_k = 10000^(-k / (dim/2))``; t is not rescaled."""
  half = dim // 2
  freqs = jnp.exp(-math.log(MAX_PERIOD) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


# ------------------------------------------------------------------ layers

def _norm(rms: bool, dtype: Any, name: str, affine: bool = True, eps: float = NORM_EPS) -> nn.Module:
  """RMSNorm (always with a scale), or LayerNorm (with scale and bias when ``affine``)."""
  return transformer.norm("rmsnorm" if rms else "layernorm", dtype, name, eps=eps, affine=affine)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
  """x (B, N, D) * (1 + scale) + shift, with shift and scale (B, D) per sample."""
  return x * (1 + scale[:, None]) + shift[:, None]


class PatchEmbed(nn.Module):
  """(B, H, W, C) -> (B, N, D): a stride-p p x p convolution, written as a matmul on patches."""

  patch_size: int
  hidden_size: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, hh, ww, c = x.shape
    p = self.patch_size
    kernel = self.param("kernel", nn.with_logical_partitioning(xavier_uniform(3), (KERNEL_H, KERNEL_W, CONV_IN, EMBED)),
                        (p, p, c, self.hidden_size))
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), (EMBED,)),
                      (self.hidden_size,))
    patches = x.astype(self.dtype).reshape(b, hh // p, p, ww // p, p, c)
    # Accumulated in float32, as every other matmul (Dense).
    out = jnp.einsum("bhuwvc,uvcd->bhwd", patches, kernel.astype(self.dtype), preferred_element_type=jnp.float32)
    return (out + bias).astype(self.dtype).reshape(b, -1, self.hidden_size)


class TimestepEmbedder(nn.Module):
  hidden_size: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, t: jax.Array) -> jax.Array:
    """t (B,) in [0, 1] -> (B, D)."""
    normal = nn.initializers.normal(0.02)
    h = Dense((self.hidden_size,), (None, EMBED), kernel_init=normal, dtype=self.dtype, name="mlp_0")(
        timestep_embedding(t))
    return Dense((self.hidden_size,), (MLP, EMBED), kernel_init=normal, dtype=self.dtype, name="mlp_2")(nn.silu(h))


class GeluMlp(nn.Module):
  hidden: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = Dense((self.hidden,), (EMBED, MLP), dtype=self.dtype, name="fc1")(x)
    h = constrain(nn.gelu(h, approximate=True), (BATCH, None, MLP))
    return Dense((x.shape[-1],), (MLP, EMBED), dtype=self.dtype, name="fc2")(h)


class DiTBlock(nn.Module):
  """adaLN-Zero transformer block: (x (B, N, D) float32, c (B, D), rope) -> (B, N, D) float32."""

  num_heads: int
  mlp_ratio: float = 4.0
  use_qknorm: bool = True
  use_swiglu: bool = True
  use_rmsnorm: bool = True
  attention_impl: str = "xla"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, c: jax.Array, rope: tuple[jax.Array, jax.Array] | None) -> jax.Array:
    """rope: (cos, sin) each (N, d/2), or None."""
    width = x.shape[-1]
    mod = Dense((6, width), (EMBED, None, MLP), zero_init=True, dtype=self.dtype, name="adaLN_modulation_1")(
        nn.silu(c))  # (B, 6, D)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (mod[:, i] for i in range(6))
    norm = lambda name: _norm(self.use_rmsnorm, self.dtype, name, affine=False)
    h = modulate(norm("norm1")(x), shift_msa, scale_msa)
    qk_norm = ("rmsnorm" if self.use_rmsnorm else "layernorm") if self.use_qknorm else None
    h = transformer.Attention(self.num_heads, qk_norm, NORM_EPS if self.use_rmsnorm else QK_LAYERNORM_EPS,
                              use_bias=True, names=("qkv", "proj"), attention_impl=self.attention_impl,
                              dtype=self.dtype, name="attn")(h, rope)
    x = x + gate_msa[:, None] * h
    h = modulate(norm("norm2")(x), shift_mlp, scale_mlp)
    hidden = int(width * self.mlp_ratio)
    mlp = (transformer.SwiGLU(int(2 / 3 * hidden), ("w12", "w3"), dtype=self.dtype, name="mlp") if self.use_swiglu
           else GeluMlp(hidden, self.dtype, name="mlp"))
    x = x + gate_mlp[:, None] * mlp(h)
    return constrain(x, (BATCH, None, EMBED))


class FinalLayer(nn.Module):
  """(x (B, N, D), c (B, D)) -> (B, N, p * p * C): norm, adaLN shift and scale, linear."""

  patch_size: int
  out_channels: int
  use_rmsnorm: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
    width = x.shape[-1]
    mod = Dense((2, width), (EMBED, None, MLP), zero_init=True, dtype=self.dtype, name="adaLN_modulation_1")(
        nn.silu(c))
    h = modulate(_norm(self.use_rmsnorm, self.dtype, "norm_final", affine=False)(x), mod[:, 0], mod[:, 1])
    return Dense((self.patch_size ** 2 * self.out_channels,), (EMBED, None), zero_init=True, dtype=self.dtype,
                 name="linear")(h)


# ------------------------------------------------------------------ the model

class DiT(transformer.Generator):
  """The DiT velocity model (see the module docstring).

  Attributes:
    input_size: Latent height = width.
    patch_size: Patch side p (1, 2 or 4 in the reference's sizes); divides input_size.
    in_channels: Latent channels C (output channels too: no learned sigma).
    mlp_ratio: MLP hidden width / D.
    use_qknorm, use_swiglu, use_rope, use_rmsnorm: The LightningDiT options.
    ...: The fields of :class:`ifsq_jax.models.transformer.Generator` (width, depth, heads,
      labels, REPA projector, dtype, attention, remat, scan).
  """

  input_size: int = 16
  patch_size: int = 1
  in_channels: int = 4
  mlp_ratio: float = 4.0
  use_qknorm: bool = True
  use_swiglu: bool = True
  use_rope: bool = True
  use_rmsnorm: bool = True

  def _check(self) -> None:
    self._check_shared()
    if self.patch_size < 1 or self.input_size % self.patch_size:
      raise ValueError(f"patch_size={self.patch_size} must divide input_size={self.input_size}.")

  @property
  def grid(self) -> int:
    return self.input_size // self.patch_size

  def setup(self):
    self._check()
    table = sincos_pos_embed(self.hidden_size, self.grid)[None]
    self.pos_embed = self.param("pos_embed", nn.with_logical_partitioning(lambda *_: jnp.asarray(table),
                                                                          (None, None, EMBED)))
    self.x_embedder = PatchEmbed(self.patch_size, self.hidden_size, self.dtype)
    self.t_embedder = TimestepEmbedder(self.hidden_size, self.dtype)
    self.y_embedder = LabelEmbedder(self.num_classes, self.hidden_size, self.class_dropout_prob, self.dtype)
    self.blocks = transformer.block_stack(
        DiTBlock, self.depth, scan_layers=self.scan_layers, remat=self.remat_policy, num_heads=self.num_heads,
        mlp_ratio=self.mlp_ratio, use_qknorm=self.use_qknorm, use_swiglu=self.use_swiglu,
        use_rmsnorm=self.use_rmsnorm, attention_impl=self.attention_impl, dtype=self.dtype)
    self.final_layer = FinalLayer(self.patch_size, self.in_channels, self.use_rmsnorm, self.dtype)
    if self.z_dim:
      self.projector = Projector(self.projector_dim, self.z_dim, dtype=self.dtype)

  def _conditioning(self, t: jax.Array, y: jax.Array, train: bool) -> jax.Array:
    return constrain(self.t_embedder(t) + self.y_embedder(y, train), (BATCH, EMBED))

  def conditioning(self, t: jax.Array, y: jax.Array, train: bool = False) -> jax.Array:
    """c (B, D) float32 = timestep embedding + label embedding (labels dropped with ``train=True``)."""
    return self._conditioning(t, y, train).astype(jnp.float32)

  def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array, *, train: bool = False,
               return_repa: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
    """The velocity at (x, t) for labels y.

    Args:
      x: (B, H, W, C) latents, channels last.
      t: (B,) float in [0, 1] (t = 1 is data).
      y: (B,) int labels in [0, num_classes] (num_classes = the null class).
      train: Replace labels by the null class with probability ``class_dropout_prob`` (rng "dropout").
      return_repa: Also return the REPA projector's output.

    Returns:
      The velocity (B, H, W, C) float32, or (velocity, repa_features (B, N, Z) float32).
    """
    want = (self.input_size, self.input_size, self.in_channels)
    if x.ndim != 4 or tuple(x.shape[1:]) != want:
      raise ValueError(f"x has shape {x.shape}; this DiT takes (B, {want[0]}, {want[1]}, {want[2]}) latents.")
    b = x.shape[0]
    h = self.x_embedder(x).astype(jnp.float32) + jax.lax.stop_gradient(self.pos_embed)  # (B, N, D) float32
    h = constrain(h, (BATCH, None, EMBED))
    c = self._conditioning(t, y, train)
    repa = self._wants_repa(return_repa)
    rope = None
    if self.use_rope:
      angles = jnp.asarray(_rope_angles(self.hidden_size // self.num_heads, self.grid))
      rope = (jnp.cos(angles), jnp.sin(angles))
    h, tap = transformer.run_stack(self.blocks, self.depth, h, c, rope,
                                   tap_layer=self.encoder_depth if repa else None)
    out = self.final_layer(h, c).astype(jnp.float32)  # (B, N, p * p * C)
    p, g = self.patch_size, self.grid
    out = out.reshape(b, g, g, p, p, self.in_channels).transpose(0, 1, 3, 2, 4, 5)
    out = out.reshape(b, g * p, g * p, self.in_channels)
    if not repa:
      return out
    z = self.projector(tap).astype(jnp.float32)
    return (out, z) if return_repa else out


# ------------------------------------------------------------------ helpers

def dit_config(size: str = "L", patch: int = 1, **overrides: Any) -> dict[str, Any]:
  """Keyword arguments for ``DiT(...)``: DiT-{size}/{patch} with every other field at its default.

  The dict holds every field but ``dtype`` (pass it as an override, or to ``DiT``), so
  that a config built from it can override any field.

  Args:
    size: A key of DIT_SIZES ("S", "B", "L", "XL").
    patch: Patch side (1, 2 or 4).
    **overrides: DiT field values.
  """
  return transformer.sized_config(DiT, DIT_SIZES, size, **{"patch_size": patch, **overrides})


def example_inputs(module: DiT, batch: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Zero (x (B, H, W, C), t (B,), y (B,)) of the shapes ``module`` takes: ``module.init(key, *example_inputs(m))``."""
  size = module.input_size
  return (np.zeros((batch, size, size, module.in_channels), np.float32), np.zeros((batch,), np.float32),
          np.zeros((batch,), np.int32))


def trainable_mask(params: Any) -> Any:
  """A tree of bools like ``params``: False for the fixed sin-cos table ``pos_embed``, True elsewhere."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: not any(getattr(k, "key", None) == "pos_embed" for k in path), params)


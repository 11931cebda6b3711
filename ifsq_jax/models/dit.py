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

Precision: params are float32; ``dtype`` is the compute dtype of the matmuls and
the branches. The residual stream stays float32 (under the reference's bf16
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

import dataclasses
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ifsq_jax.parallel import (BATCH, CONV_IN, EMBED, HEADS, KERNEL_H, KERNEL_W, KV, LAYERS, MLP, NORM, VOCAB,
                               constrain)

# name: (depth, width, heads).
DIT_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}

ATTENTION_IMPLS = {"xla": "xla", "cudnn": "cudnn"}  # field value -> jax.nn.dot_product_attention(implementation=)
# "full" saves nothing inside a block; "dots" saves matmul outputs; the others are jax.checkpoint_policies names.
REMAT_POLICIES = ("none", "full", "dots", "dots_with_no_batch_dims_saveable", "nothing_saveable",
                  "everything_saveable", "dots_saveable")

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


def rope_tables(head_dim: int, grid: int) -> tuple[np.ndarray, np.ndarray]:
  """cos and sin (N, d) float32 of the EVA-02 2D RoPE (``VisionRotaryEmbeddingFast(d / 2, grid)``).

  Per token (row r, column c) the d angles are ``[r theta | c theta]``, each
  frequency ``theta_j = 10000^(-2j / (d/2))`` repeated twice (interleaved pairs).
  Computed in float32 as the reference computes its buffers.
  """
  if head_dim % 4:
    raise ValueError(f"head width {head_dim}: 2D RoPE needs a multiple of 4 (hidden_size / num_heads).")
  dim = head_dim // 2
  freqs = (1.0 / (np.float32(ROPE_THETA) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))))
  freqs = freqs.astype(np.float32)
  pos = np.arange(grid, dtype=np.float32) / np.float32(grid) * np.float32(grid)  # the reference's t
  angles = np.repeat(np.outer(pos, freqs).astype(np.float32), 2, axis=1)  # (grid, dim)
  table = np.concatenate([np.broadcast_to(angles[:, None], (grid, grid, dim)),
                          np.broadcast_to(angles[None, :], (grid, grid, dim))], axis=-1).reshape(grid * grid, -1)
  return np.cos(table), np.sin(table)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x (B, N, K, d) rotated in interleaved pairs: ``x cos + rotate_half(x) sin``, in float32."""
  x = x.astype(jnp.float32)
  pairs = x.reshape(x.shape[:-1] + (-1, 2))
  rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)  # (-x1, x0, -x3, x2, ...)
  return x * cos[:, None] + rotated * sin[:, None]


def timestep_embedding(t: jax.Array, dim: int = FREQ_DIM) -> jax.Array:
  """t (B,) -> (B, dim) float32 ``[cos(t f), sin(t f)]``, ``f_k = 10000^(-k / (dim/2))``; t is not rescaled."""
  half = dim // 2
  freqs = jnp.exp(-math.log(MAX_PERIOD) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


# ------------------------------------------------------------------ layers

def xavier_uniform(n_in: int = 1) -> Callable[..., jax.Array]:
  """PyTorch's ``xavier_uniform_`` on the (prod(in), prod(out)) view of a kernel with ``n_in`` input axes."""

  def init(key, shape, dtype=jnp.float32):
    fan_in, fan_out = math.prod(shape[:n_in]), math.prod(shape[n_in:])
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


class Dense(nn.Module):
  """``x @ kernel + bias`` over the last ``n_in`` axes of x; kernel (*in, *features).

  Attributes:
    features: Output shape.
    axes: Logical names of the kernel's axes (inputs then outputs); the bias takes the output names.
    n_in: Input axes contracted.
    kernel_init: Defaults to xavier-uniform on the (prod(in), prod(out)) view.
    zero_init: Zero kernel and bias (adaLN-Zero, the final layer).
    dtype: Compute dtype.
  """

  features: Sequence[int]
  axes: Sequence[str | None]
  n_in: int = 1
  kernel_init: Callable[..., jax.Array] | None = None
  zero_init: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = tuple(self.features)
    init = nn.initializers.zeros_init() if self.zero_init else self.kernel_init or xavier_uniform(self.n_in)
    kernel = self.param("kernel", nn.with_logical_partitioning(init, tuple(self.axes)),
                        tuple(x.shape[-self.n_in:]) + features)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), tuple(self.axes[self.n_in:])),
                      features)
    x, kernel, bias = x.astype(self.dtype), kernel.astype(self.dtype), bias.astype(self.dtype)
    contract = (tuple(range(x.ndim - self.n_in, x.ndim)), tuple(range(self.n_in)))
    return jax.lax.dot_general(x, kernel, (contract, ((), ()))) + bias


def _norm(rms: bool, dtype: Any, name: str, affine: bool = True, eps: float = NORM_EPS) -> nn.Module:
  """RMSNorm, or LayerNorm (with scale and bias when ``affine``); float32 statistics either way."""
  ones = nn.with_logical_partitioning(nn.initializers.ones_init(), (NORM,))
  if rms:
    return nn.RMSNorm(epsilon=eps, dtype=dtype, scale_init=ones, name=name)
  zeros = nn.with_logical_partitioning(nn.initializers.zeros_init(), (NORM,))
  return nn.LayerNorm(epsilon=eps, dtype=dtype, use_scale=affine, use_bias=affine, scale_init=ones, bias_init=zeros,
                      name=name)


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
    out = jnp.einsum("bhuwvc,uvcd->bhwd", patches, kernel.astype(self.dtype)) + bias.astype(self.dtype)
    return out.reshape(b, -1, self.hidden_size)


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


class LabelEmbedder(nn.Module):
  """Label table with ``num_classes + 1`` rows (the last one the null class) and label dropout."""

  num_classes: int
  hidden_size: int
  dropout_prob: float = 0.1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, y: jax.Array, train: bool) -> jax.Array:
    """y (B,) int -> (B, D); with ``train`` each label becomes the null class with ``dropout_prob`` (rng "dropout")."""
    table = self.param("embedding_table", nn.with_logical_partitioning(nn.initializers.normal(0.02), (VOCAB, EMBED)),
                       (self.num_classes + 1, self.hidden_size))
    if train and self.dropout_prob > 0:
      drop = jax.random.uniform(self.make_rng("dropout"), y.shape) < self.dropout_prob
      y = jnp.where(drop, self.num_classes, y)
    return jnp.take(table, y, axis=0).astype(self.dtype)


class Attention(nn.Module):
  """Multi-head self-attention with optional QK-norm and 2D RoPE (no mask)."""

  num_heads: int
  use_qknorm: bool = True
  use_rmsnorm: bool = True
  attention_impl: str = "xla"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, rope: tuple[jax.Array, jax.Array] | None) -> jax.Array:
    """x (B, N, D), rope (cos, sin) each (N, d) or None -> (B, N, D)."""
    heads, head_dim = self.num_heads, x.shape[-1] // self.num_heads
    qkv = Dense((3, heads, head_dim), (EMBED, None, HEADS, KV), dtype=self.dtype, name="qkv")(x)  # (B, N, 3, K, d)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    if self.use_qknorm:
      # float32 out: RoPE then rotates in float32, as under the reference's autocast.
      eps = NORM_EPS if self.use_rmsnorm else QK_LAYERNORM_EPS
      q = _norm(self.use_rmsnorm, jnp.float32, "q_norm", eps=eps)(q)
      k = _norm(self.use_rmsnorm, jnp.float32, "k_norm", eps=eps)(k)
    if rope is not None:
      q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    q, k, v = (constrain(a.astype(self.dtype), (BATCH, None, HEADS, KV)) for a in (q, k, v))
    out = jax.nn.dot_product_attention(q, k, v, implementation=ATTENTION_IMPLS[self.attention_impl])
    return Dense((x.shape[-1],), (HEADS, KV, EMBED), n_in=2, dtype=self.dtype, name="proj")(out)


class SwiGLU(nn.Module):
  hidden: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = Dense((2, self.hidden), (EMBED, None, MLP), dtype=self.dtype, name="w12")(x)  # (B, N, 2, F): [x1 | x2]
    h = constrain(nn.silu(h[..., 0, :]) * h[..., 1, :], (BATCH, None, MLP))
    return Dense((x.shape[-1],), (MLP, EMBED), dtype=self.dtype, name="w3")(h)


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
    width = x.shape[-1]
    mod = Dense((6, width), (EMBED, None, MLP), zero_init=True, dtype=self.dtype, name="adaLN_modulation_1")(
        nn.silu(c))  # (B, 6, D)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (mod[:, i] for i in range(6))
    norm = lambda name: _norm(self.use_rmsnorm, self.dtype, name, affine=False)
    h = modulate(norm("norm1")(x), shift_msa, scale_msa)
    h = Attention(self.num_heads, self.use_qknorm, self.use_rmsnorm, self.attention_impl, self.dtype, name="attn")(
        h, rope)
    x = x + gate_msa[:, None] * h
    h = modulate(norm("norm2")(x), shift_mlp, scale_mlp)
    hidden = int(width * self.mlp_ratio)
    mlp = (SwiGLU(int(2 / 3 * hidden), self.dtype, name="mlp") if self.use_swiglu
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


class Projector(nn.Module):
  """REPA projector: (B, N, D) -> (B, N, Z), D -> P -> P -> Z with SiLU between."""

  projector_dim: int
  z_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = nn.silu(Dense((self.projector_dim,), (EMBED, MLP), dtype=self.dtype, name="linear_0")(x))
    h = nn.silu(Dense((self.projector_dim,), (MLP, EMBED), dtype=self.dtype, name="linear_1")(h))
    return Dense((self.z_dim,), (EMBED, MLP), dtype=self.dtype, name="linear_2")(h)


def _remat_policy(name: str) -> Any:
  if name == "full":
    return None  # nn.remat's default: save nothing
  if name == "dots":
    return jax.checkpoint_policies.dots_saveable
  return getattr(jax.checkpoint_policies, name)


# ------------------------------------------------------------------ the model

class DiT(nn.Module):
  """The DiT velocity model (see the module docstring).

  Attributes:
    input_size: Latent height = width.
    patch_size: Patch side p (1, 2 or 4 in the reference's sizes); divides input_size.
    in_channels: Latent channels C (output channels too: no learned sigma).
    hidden_size: Width D.
    depth: Blocks.
    num_heads: Attention heads K.
    mlp_ratio: MLP hidden width / D.
    num_classes: Labels 0..num_classes-1; ``num_classes`` itself is the null class.
    class_dropout_prob: Probability of replacing a label by the null class with ``train=True``.
    use_qknorm, use_swiglu, use_rope, use_rmsnorm: The LightningDiT options.
    encoder_depth: The REPA projector reads the stream after this block (from 1; 0 = the embedded input).
    projector_dim: REPA projector hidden width.
    z_dim: REPA target width Z; 0 = no projector.
    dtype: Compute dtype (bfloat16 on accelerators); params are float32.
    attention_impl: "xla" or "cudnn" (cuDNN flash attention: GPU, bfloat16 or float16 compute).
    remat_policy: One of REMAT_POLICIES: "none", "full" (recompute each block), "dots" (save matmul outputs), ...
    scan_layers: Blocks under ``nn.scan`` with params stacked on a leading layer axis.
  """

  input_size: int = 16
  patch_size: int = 1
  in_channels: int = 4
  hidden_size: int = 1024
  depth: int = 24
  num_heads: int = 16
  mlp_ratio: float = 4.0
  num_classes: int = 1000
  class_dropout_prob: float = 0.1
  use_qknorm: bool = True
  use_swiglu: bool = True
  use_rope: bool = True
  use_rmsnorm: bool = True
  encoder_depth: int = 8
  projector_dim: int = 2048
  z_dim: int = 768
  dtype: Any = jnp.float32
  attention_impl: str = "xla"
  remat_policy: str = "none"
  scan_layers: bool = True

  def _check(self) -> None:
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f"attention_impl={self.attention_impl!r} is not valid; use one of {tuple(ATTENTION_IMPLS)}.")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"remat_policy={self.remat_policy!r} is not valid; use one of {REMAT_POLICIES}.")
    if self.patch_size < 1 or self.input_size % self.patch_size:
      raise ValueError(f"patch_size={self.patch_size} must divide input_size={self.input_size}.")
    if self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}.")
    if self.z_dim < 0 or (self.z_dim and not 0 <= self.encoder_depth <= self.depth):
      raise ValueError(f"encoder_depth={self.encoder_depth} must be in [0, depth={self.depth}] and z_dim={self.z_dim}"
                       " >= 0 (0: no REPA projector).")
    if not 0 <= self.class_dropout_prob < 1:
      raise ValueError(f"class_dropout_prob={self.class_dropout_prob} must be in [0, 1).")

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
    block = DiTBlock
    if self.remat_policy != "none":
      # Outside scan, prevent_cse keeps XLA from merging the recomputation with the forward pass.
      block = nn.remat(DiTBlock, policy=_remat_policy(self.remat_policy), prevent_cse=not self.scan_layers)
    kwargs = dict(num_heads=self.num_heads, mlp_ratio=self.mlp_ratio, use_qknorm=self.use_qknorm,
                  use_swiglu=self.use_swiglu, use_rmsnorm=self.use_rmsnorm, attention_impl=self.attention_impl,
                  dtype=self.dtype)
    if self.scan_layers:
      self.blocks = block(**kwargs)
    else:
      self.blocks = [block(**kwargs) for _ in range(self.depth)]
    self.final_layer = FinalLayer(self.patch_size, self.in_channels, self.use_rmsnorm, self.dtype)
    if self.z_dim:
      self.projector = Projector(self.projector_dim, self.z_dim, self.dtype)

  def _conditioning(self, t: jax.Array, y: jax.Array, train: bool) -> jax.Array:
    return constrain(self.t_embedder(t) + self.y_embedder(y, train), (BATCH, EMBED))

  def conditioning(self, t: jax.Array, y: jax.Array, train: bool = False) -> jax.Array:
    """c (B, D) float32 = timestep embedding + label embedding (labels dropped with ``train=True``)."""
    return self._conditioning(t, y, train).astype(jnp.float32)

  def _blocks(self, x: jax.Array, c: jax.Array, tap: jax.Array | None) -> tuple[jax.Array, jax.Array | None]:
    """Runs every block; ``tap`` (if not None) becomes the stream after block ``encoder_depth``."""
    rope = None
    if self.use_rope:
      rope = tuple(jnp.asarray(a) for a in rope_tables(self.hidden_size // self.num_heads, self.grid))
    if not self.scan_layers:
      for i, block in enumerate(self.blocks):
        x = block(x, c, rope)
        if tap is not None and i + 1 == self.encoder_depth:
          tap = x
      return x, tap

    def body(block, carry, layer, c, rope):
      x, tap = carry
      x = block(x, c, rope)
      if tap is not None:
        tap = jnp.where(layer + 1 == self.encoder_depth, x, tap)
      return (x, tap), None

    scan = nn.scan(body, variable_axes={"params": 0, "intermediates": 0}, split_rngs={"params": True},
                   in_axes=(0, nn.broadcast, nn.broadcast), length=self.depth,
                   metadata_params={nn.PARTITION_NAME: LAYERS})
    (x, tap), _ = scan(self.blocks, (x, tap), jnp.arange(self.depth), c, rope)
    return x, tap

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
    if return_repa and not self.z_dim:
      raise ValueError("return_repa=True needs a REPA projector; this DiT has z_dim=0.")
    b = x.shape[0]
    h = self.x_embedder(x).astype(jnp.float32) + jax.lax.stop_gradient(self.pos_embed)  # (B, N, D) float32
    h = constrain(h, (BATCH, None, EMBED))
    c = self._conditioning(t, y, train)
    repa = bool(self.z_dim) and (return_repa or self.is_initializing())  # init creates the projector's params
    h, tap = self._blocks(h, c, h if repa else None)
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
  if size not in DIT_SIZES:
    raise ValueError(f"size={size!r} is not valid; use one of {sorted(DIT_SIZES)}.")
  names = [f.name for f in dataclasses.fields(DiT) if f.name not in ("parent", "name")]
  unknown = sorted(set(overrides) - set(names))
  if unknown:
    raise ValueError(f"DiT has no fields {unknown}; its fields are {sorted(names)}.")
  defaults = {f.name: f.default for f in dataclasses.fields(DiT) if f.name in names and f.name != "dtype"}
  depth, width, heads = DIT_SIZES[size]
  return {**defaults, "depth": depth, "hidden_size": width, "num_heads": heads, "patch_size": patch, **overrides}


def example_inputs(module: DiT, batch: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Zero (x (B, H, W, C), t (B,), y (B,)) of the shapes ``module`` takes: ``module.init(key, *example_inputs(m))``."""
  size = module.input_size
  return (np.zeros((batch, size, size, module.in_channels), np.float32), np.zeros((batch,), np.float32),
          np.zeros((batch,), np.int32))


def trainable_mask(params: Any) -> Any:
  """A tree of bools like ``params``: False for the fixed sin-cos table ``pos_embed``, True elsewhere."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: not any(getattr(k, "key", None) == "pos_embed" for k in path), params)


def num_params(params: Any) -> int:
  """Number of parameters, the fixed position table included (boxed or plain leaves)."""
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(nn.meta.unbox(params)))

"""The iFSQ image tokenizer: the reference's ``ImageFSQVAEModel`` encoder and decoder in Linen.

A convolutional autoencoder (GroupNorm(32, eps 1e-6), SiLU, ResNet blocks with a
1x1 skip when widths differ, asymmetric (0, 1, 0, 1) zero padding before each
stride-2 3x3 downsampling conv, nearest x2 upsampling + 3x3 conv, optional
single-head attention at chosen resolutions, ``double_z``), a 1x1 ``quant_conv``
into the bottleneck and a 1x1 ``post_quant_conv`` out of it. The bottleneck is
chosen by name, with the same encoder and decoder around each: ``ifsq`` (the
paper), ``fsq`` (tanh bound), ``vq``, ``kl``, ``ae``.

Module names mirror the PyTorch ones (``encoder.down.0.block.1.conv1`` becomes
``encoder/down_0/block_1/conv1``), so checkpoints convert by renaming.

Initialisation as the reference (PyTorch's defaults): conv and linear weights and
biases U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with fan_in = kh * kw * C_in (C_in for a
linear layer), GroupNorm scale 1 and bias 0. Every parameter carries logical axis
names (``nn.with_logical_partitioning``; conv kernels ``KERNEL_H, KERNEL_W, CONV_IN,
CONV_OUT``, biases ``CONV_OUT``, norms ``NORM``, attention ``EMBED``/``MLP``), so
``model.init`` returns boxed leaves: ``nn.meta.unbox`` gives the plain arrays, and
the mesh rules shard them. The convolution is chosen by ``TokenizerConfig.conv_impl``
(:mod:`ifsq_jax.models.conv`).

Channels last: B batch, H W image size, h w latent size (H / 2^levels), C channels, d latent channels.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ifsq_jax.models.conv import IMPLS, Conv, check_impl, conv2d, torch_bias_init, torch_kernel_init
from ifsq_jax.models.norm import GroupNorm
from ifsq_jax.parallel import EMBED, MLP
from ifsq_jax.quantizers import (FSQ, BottleneckOutput, FSQBottleneck, GaussianBottleneck, IdentityBottleneck,
                                 VectorQuantizer)

BOTTLENECKS = ("ifsq", "fsq", "vq", "kl", "ae")


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
  """Architecture; defaults are the paper's ``f16, d4, levels (17, 17, 17, 17)`` (83,324,099 parameters)."""

  hidden_size: int = 128
  hidden_size_mult: tuple[int, ...] = (1, 1, 2, 4, 4)
  num_res_blocks: int = 2
  z_channels: int = 4
  embed_dim: int = 4
  double_z: bool = True
  downsample: tuple[bool, ...] = (True, True, True, True, False)  # per encoder level
  upsample: tuple[bool, ...] = (False, True, True, True, True)  # per decoder level (applied after its blocks)
  attn_resolutions: tuple[int, ...] = ()
  resolution: int = 256
  dropout: float = 0.0
  bottleneck: str = "ifsq"
  levels: tuple[int, ...] = (17, 17, 17, 17)
  group_sizes: tuple[int, ...] | None = None
  vq_codebook_size: int = 16384
  vq_beta: float = 0.5
  conv_impl: str = "auto"  # the convolutions: one of models.conv.IMPLS ("auto", "xla", "onednn")

  def __post_init__(self):
    if self.group_sizes is not None and not tuple(self.group_sizes):
      object.__setattr__(self, "group_sizes", None)  # configs store "no groups" as ()
    if self.bottleneck not in BOTTLENECKS:
      raise ValueError(f"bottleneck={self.bottleneck!r} is not valid; use one of {BOTTLENECKS}.")
    if not self.levels or any(not isinstance(v, numbers.Integral) or v < 2 for v in self.levels):
      raise ValueError(f"levels={self.levels!r} is not valid; give one integer >= 2 per latent channel, "
                       "e.g. (17, 17, 17, 17).")
    if self.conv_impl not in IMPLS:
      raise ValueError(f"conv_impl={self.conv_impl!r} is not valid; use one of {IMPLS}.")
    n = len(self.hidden_size_mult)
    if len(self.downsample) != n or len(self.upsample) != n:
      raise ValueError(f"downsample {self.downsample} and upsample {self.upsample} need one entry per level ({n}).")
    if self.bottleneck in ("ifsq", "fsq") and len(self.levels) != self.embed_dim:
      raise ValueError(f"levels={self.levels} must have embed_dim={self.embed_dim} entries.")

  @property
  def fsq(self) -> FSQ:
    return FSQ(self.levels, bound="ifsq" if self.bottleneck == "ifsq" else "tanh", group_sizes=self.group_sizes)

  @property
  def index_sizes(self) -> tuple[int, ...]:
    """Codebook size of each index column (one per factorized group); () without indices."""
    if self.bottleneck in ("ifsq", "fsq"):
      return self.fsq.group_codebook_sizes
    if self.bottleneck == "vq":
      return (self.vq_codebook_size,)
    return ()

  @property
  def downsample_factor(self) -> int:
    return 2 ** sum(self.downsample)


def _conv(features: int, kernel: int, dtype, impl: str, name: str, stride: int = 1, padding: Any = "SAME") -> Conv:
  return Conv(features, kernel, stride, padding, impl=impl, dtype=dtype, name=name)


def _dense(features: int, fan_in: int, axes: tuple[str, str], dtype, name: str) -> nn.Dense:
  """PyTorch's nn.Linear initialisation, with logical axis names on the kernel and the bias."""
  return nn.Dense(features, dtype=dtype, name=name,
                  kernel_init=nn.with_logical_partitioning(torch_kernel_init, axes),
                  bias_init=nn.with_logical_partitioning(torch_bias_init(fan_in), axes[1:]))


def _norm(dtype, name: str) -> GroupNorm:
  return GroupNorm(num_groups=32, epsilon=1e-6, dtype=dtype, name=name)  # nn.GroupNorm's layer, faster on CPU


class ResnetBlock(nn.Module):
  out_channels: int
  dropout: float = 0.0
  dtype: Any = jnp.float32
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x, train: bool = False):
    conv = lambda features, kernel, name: _conv(features, kernel, self.dtype, self.conv_impl, name)
    h = conv(self.out_channels, 3, "conv1")(nn.swish(_norm(self.dtype, "norm1")(x)))
    h = nn.swish(_norm(self.dtype, "norm2")(h))
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = conv(self.out_channels, 3, "conv2")(h)
    if x.shape[-1] != self.out_channels:
      x = conv(self.out_channels, 1, "nin_shortcut")(x)
    return x + h


class AttnBlock(nn.Module):
  """Single-head self-attention over all positions (the reference's AttnBlock2D)."""

  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    t = _norm(self.dtype, "norm")(x).reshape(b, h * w, c)
    q, k, v = (_dense(c, c, (EMBED, MLP), self.dtype, n)(t) for n in ("q", "k", "v"))
    att = jax.nn.softmax(jnp.einsum("bqc,bkc->bqk", q, k) / jnp.sqrt(c).astype(q.dtype), axis=-1)
    out = _dense(c, c, (MLP, EMBED), self.dtype, "proj_out")(jnp.einsum("bqk,bkc->bqc", att, v))
    return x + out.reshape(b, h, w, c)


class Downsample(nn.Module):
  dtype: Any = jnp.float32
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x):
    x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))  # the reference pads right and bottom only
    return _conv(x.shape[-1], 3, self.dtype, self.conv_impl, "conv", stride=2, padding="VALID")(x)


class Upsample(nn.Module):
  dtype: Any = jnp.float32
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x):
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # nearest x2
    return _conv(x.shape[-1], 3, self.dtype, self.conv_impl, "conv")(x)


class _Level(nn.Module):
  """One resolution: ResNet blocks (+ attention), then an optional resampling."""

  out_channels: int
  num_blocks: int
  attention: bool
  resample: str  # "down" | "up" | ""
  dropout: float
  dtype: Any
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x, train: bool = False):
    for i in range(self.num_blocks):
      x = ResnetBlock(self.out_channels, self.dropout, self.dtype, self.conv_impl, name=f"block_{i}")(x, train)
      if self.attention:
        x = AttnBlock(self.dtype, name=f"attn_{i}")(x)
    if self.resample == "down":
      x = Downsample(self.dtype, self.conv_impl, name="downsample")(x)
    elif self.resample == "up":
      x = Upsample(self.dtype, self.conv_impl, name="upsample")(x)
    return x


class Encoder(nn.Module):
  """(B, H, W, 3) in [-1, 1] -> (B, h, w, 2 z_channels) (or z_channels without double_z)."""

  cfg: TokenizerConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    c = self.cfg
    h = _conv(c.hidden_size, 3, self.dtype, c.conv_impl, "conv_in")(x.astype(self.dtype))
    res = c.resolution
    for i, mult in enumerate(c.hidden_size_mult):
      h = _Level(c.hidden_size * mult, c.num_res_blocks, res in c.attn_resolutions, "down" if c.downsample[i] else "",
                 c.dropout, self.dtype, c.conv_impl, name=f"down_{i}")(h, train)
      res = res // 2 if c.downsample[i] else res
    for i in range(c.num_res_blocks):
      h = ResnetBlock(h.shape[-1], c.dropout, self.dtype, c.conv_impl, name=f"mid_block_{i}")(h, train)
    h = nn.swish(_norm(self.dtype, "norm_out")(h))
    return _conv(2 * c.z_channels if c.double_z else c.z_channels, 3, self.dtype, c.conv_impl, "conv_out")(h)


class Decoder(nn.Module):
  """(B, h, w, z_channels) -> (B, H, W, 3), not clamped."""

  cfg: TokenizerConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z, train: bool = False, features_only: bool = False):
    """``features_only``: stop before ``conv_out`` (the GAN's adaptive weight differentiates at that layer)."""
    c = self.cfg
    n = len(c.hidden_size_mult)
    h = _conv(c.hidden_size * c.hidden_size_mult[-1], 3, self.dtype, c.conv_impl, "conv_in")(z.astype(self.dtype))
    for i in range(c.num_res_blocks):
      h = ResnetBlock(h.shape[-1], c.dropout, self.dtype, c.conv_impl, name=f"mid_block_{i}")(h, train)
    res = c.resolution // c.downsample_factor
    for i in reversed(range(n)):
      h = _Level(c.hidden_size * c.hidden_size_mult[i], c.num_res_blocks + 1, res in c.attn_resolutions,
                 "up" if c.upsample[i] else "", c.dropout, self.dtype, c.conv_impl, name=f"up_{i}")(h, train)
      res = res * 2 if c.upsample[i] else res
    h = nn.swish(_norm(self.dtype, "norm_out")(h))
    if features_only:
      return h
    return _conv(3, 3, self.dtype, c.conv_impl, "conv_out")(h)


def conv_out(features: jax.Array, kernel: jax.Array, bias: jax.Array, impl: str = "auto") -> jax.Array:
  """The decoder's last layer as a function of its weights: (B, H, W, C) -> (B, H, W, 3) float32.

  ``impl``: the convolution (pass the model's ``cfg.conv_impl``).
  """
  return conv2d(features.astype(jnp.float32), kernel.astype(jnp.float32), 1, "SAME", check_impl(impl)) + bias


class Tokenizer(nn.Module):
  """Encoder -> quant_conv -> bottleneck -> post_quant_conv -> decoder.

  Attributes:
    cfg: The architecture and bottleneck.
    dtype: Compute dtype of the convolutions (bf16 on accelerators); the
      quantizer and the losses always run in float32.
    compute_stats: Return codebook statistics from the bottleneck.
  """

  cfg: TokenizerConfig = TokenizerConfig()
  dtype: Any = jnp.float32
  compute_stats: bool = False

  def setup(self):
    c = self.cfg
    self.encoder = Encoder(c, self.dtype)
    self.decoder = Decoder(c, self.dtype)
    self.quant_conv = Conv(2 * c.embed_dim if c.bottleneck == "kl" else c.embed_dim, 1, impl=c.conv_impl,
                           dtype=self.dtype)
    self.post_quant_conv = Conv(c.z_channels, 1, impl=c.conv_impl, dtype=self.dtype)
    if c.bottleneck in ("ifsq", "fsq"):
      self.quantize = FSQBottleneck(c.fsq, compute_stats=self.compute_stats)
    elif c.bottleneck == "vq":
      self.quantize = VectorQuantizer(c.vq_codebook_size, c.embed_dim, beta=c.vq_beta, compute_stats=self.compute_stats)
    elif c.bottleneck == "kl":
      self.quantize = GaussianBottleneck()
    else:
      self.quantize = IdentityBottleneck()

  def latent(self, x: jax.Array, train: bool = False) -> jax.Array:
    """(B, H, W, 3) -> the pre-bottleneck latent (B, h, w, embed_dim) (2 embed_dim for kl), float32."""
    return self.quant_conv(self.encoder(x, train)).astype(jnp.float32)

  def encode(self, x: jax.Array, train: bool = False) -> BottleneckOutput:
    """(B, H, W, 3) in [-1, 1] -> codes (B, h, w, embed_dim), indices (B, h, w) (+ (G,) with groups)."""
    return self.quantize(self.latent(x, train), train=train)

  def decode(self, codes: jax.Array, train: bool = False) -> jax.Array:
    """Codes (B, h, w, embed_dim) -> images (B, H, W, 3), float32, not clamped."""
    return self.decoder(self.post_quant_conv(codes.astype(self.dtype)), train).astype(jnp.float32)

  def decode_features(self, codes: jax.Array, train: bool = False) -> jax.Array:
    """Codes -> the decoder's features before ``conv_out`` (B, H, W, hidden_size)."""
    return self.decoder(self.post_quant_conv(codes.astype(self.dtype)), train, features_only=True)

  def decode_indices(self, indices: jax.Array) -> jax.Array:
    """Indices -> images (FSQ and VQ bottlenecks)."""
    if self.cfg.bottleneck not in ("ifsq", "fsq", "vq"):
      raise ValueError(f"the {self.cfg.bottleneck!r} bottleneck has no indices.")
    return self.decode(self.quantize.decode_indices(indices))

  def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, BottleneckOutput]:
    """(B, H, W, 3) -> (reconstruction (B, H, W, 3), bottleneck output)."""
    out = self.encode(x, train)
    return self.decode(out.codes, train), out

"""The official iFSQ DiT (``dit/models/dit.py``) rebuilt from torch.nn layers, for side-by-side speed.

A DiT with the LightningDiT options the paper trains with: RMSNorm (eps 1e-6,
statistics in float32, learnable scale), QK-norm (an RMSNorm over the head width
before RoPE), SwiGLU (hidden ``int(2/3 * mlp_ratio * D)``, biases, ``[x1 | x2]``
split), 2D RoPE in the EVA-02 style (interleaved pairs; the first half of the head
width rotates with the row, the second with the column), the fixed MAE 2D sin-cos
position table added on top (as the reference does, RoPE or not), adaLN-Zero
(``shift, scale, gate`` for attention then MLP) and the REPA projector after block
``encoder_depth``. Module names are the official ones (``x_embedder.proj`` is a
Conv2d, as timm's ``PatchEmbed``), so the official state dict loads with
``strict=True``. Channels first (NCHW), as the official code runs. Written from
the reference's specification; ``tests/test_torch_dit.py`` checks it against the
official model's golden outputs and the DiT-L/1 state-dict shapes.

Options other than the paper's follow the original DiT: ``use_rmsnorm=False`` is a
LayerNorm without affine parameters (and QK-norm a LayerNorm with them),
``use_swiglu=False`` a GELU(tanh) MLP named ``fc1``/``fc2``. ``learn_sigma=True`` is
refused: the flow-matching objective predicts a velocity only.

B batch, C latent channels, H W latent height and width, p patch, N tokens
((H / p) * (W / p), raster order), D width, h heads, d head width (D / h), Z REPA width.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# name: (depth, width, heads), the DiT paper's sizes.
DIT_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}


def dit_kwargs(size: str = "L", patch: int = 1, **overrides: Any) -> dict[str, Any]:
  """``TorchDiT`` arguments of DiT-{size}/{patch}, otherwise as ``dit/train.py`` builds DiT-L/1.

  Defaults: input 16 (f16 latents of 256x256 images), 4 channels, 1000 classes, every
  LightningDiT option on, no learned sigma, a REPA projector to 768 after block 8.
  """
  if size not in DIT_SIZES:
    raise ValueError(f"size={size!r}: valid sizes are {sorted(DIT_SIZES)}.")
  depth, width, heads = DIT_SIZES[size]
  kwargs = dict(input_size=16, patch_size=patch, in_channels=4, hidden_size=width, depth=depth, num_heads=heads,
                mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000, use_qknorm=True, use_swiglu=True,
                use_rope=True, use_rmsnorm=True, learn_sigma=False, z_dims=[768], encoder_depth=8,
                projector_dim=2048)
  unknown = set(overrides) - set(kwargs)
  if unknown:
    raise ValueError(f"unknown TorchDiT arguments {sorted(unknown)}; valid ones are {sorted(kwargs)}.")
  return {**kwargs, **overrides}


def sincos_pos_embed(width: int, grid: int) -> np.ndarray:
  """The MAE 2D sin-cos table (N, D), float64; N = grid * grid in raster order.

  The first D/2 columns encode the column (w) coordinate, the last D/2 the row (h):
  MAE's ``meshgrid(w, h)`` puts the column first. Each half is [sin(pos * w_k), cos(pos * w_k)]
  with w_k = 10000^(-k / (D/4)).
  """
  if width % 4:
    raise ValueError(f"hidden_size={width}: the 2D sin-cos table needs a multiple of 4.")
  omega = 1.0 / 10000 ** (np.arange(width // 4, dtype=np.float64) / (width // 4))
  rows, cols = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing="ij")

  def one_axis(pos: np.ndarray) -> np.ndarray:
    angles = pos.reshape(-1, 1) * omega  # (N, D/4)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

  return np.concatenate([one_axis(cols), one_axis(rows)], axis=1)


def rope_tables(head_dim: int, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
  """EVA-02 2D RoPE tables (cos, sin), each (N, d) float32 as the reference computes them.

  Angle j of a token at (row r, column c): with f_i = 10000^(-2i / (d/2)), i < d/4, each
  repeated twice (interleaved pairs), the first d/2 angles are r * f, the last d/2 c * f.
  """
  if head_dim % 4:
    raise ValueError(f"head width {head_dim}: 2D RoPE needs a multiple of 4.")
  half = head_dim // 2
  freqs = 1.0 / (10000 ** (torch.arange(0, half, 2)[: half // 2].float() / half))  # (d/4,)
  pos = torch.arange(grid).float()
  per_axis = (pos[:, None] * freqs[None, :]).repeat_interleave(2, dim=-1)  # (grid, d/2)
  angles = torch.cat([per_axis[:, None, :].expand(grid, grid, half),  # row index
                      per_axis[None, :, :].expand(grid, grid, half)], dim=-1).reshape(grid * grid, head_dim)
  return angles.cos(), angles.sin()


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
  """(B,) times (unscaled, t in [0, 1]) -> (B, dim) float32 features [cos(t f) | sin(t f)]."""
  half = dim // 2
  freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
  angles = t[:, None].float() * freqs[None]
  return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
  """x (B, N, D) * (1 + scale) + shift, with (B, D) scale and shift."""
  return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class RMSNorm(nn.Module):
  """x * rsqrt(mean(x^2) + eps) in float32, cast back, times a learnable scale."""

  def __init__(self, dim: int, eps: float = 1e-6):
    super().__init__()
    self.eps = eps
    self.weight = nn.Parameter(torch.ones(dim))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def _norm(dim: int, rms: bool) -> nn.Module:
  return RMSNorm(dim) if rms else nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)


class PatchEmbed(nn.Module):
  """(B, C, H, W) -> (B, N, D) by a p x p stride-p convolution (timm's parameter names)."""

  def __init__(self, patch: int, cin: int, width: int):
    super().__init__()
    self.proj = nn.Conv2d(cin, width, patch, patch)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):

  def __init__(self, width: int, freq_dim: int = 256):
    super().__init__()
    self.freq_dim = freq_dim
    self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

  def forward(self, t: torch.Tensor) -> torch.Tensor:
    return self.mlp(timestep_embedding(t, self.freq_dim))


class LabelEmbedder(nn.Module):
  """A label table with a null-class row ``num_classes`` when labels are dropped in training."""

  def __init__(self, num_classes: int, width: int, dropout_prob: float):
    super().__init__()
    self.num_classes, self.dropout_prob = num_classes, dropout_prob
    self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), width)

  def forward(self, y: torch.Tensor, train: bool) -> torch.Tensor:
    if train and self.dropout_prob > 0:
      drop = torch.rand(y.shape[0], device=y.device) < self.dropout_prob
      y = torch.where(drop, torch.full_like(y, self.num_classes), y)
    return self.embedding_table(y)


class VisionRotaryEmbedding(nn.Module):
  """2D RoPE with (N, d) tables kept as state-dict buffers ``freqs_cos``, ``freqs_sin``."""

  def __init__(self, head_dim: int, grid: int):
    super().__init__()
    cos, sin = rope_tables(head_dim, grid)
    self.register_buffer("freqs_cos", cos)
    self.register_buffer("freqs_sin", sin)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    """x (..., N, d) rotated by pairs (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin)."""
    pairs = x.unflatten(-1, (-1, 2))
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    return x * self.freqs_cos + rotated * self.freqs_sin


class Attention(nn.Module):

  def __init__(self, width: int, heads: int, qk_norm: bool, rms: bool):
    super().__init__()
    self.heads = heads
    head_dim = width // heads
    self.qkv = nn.Linear(width, 3 * width)
    norm = (lambda: RMSNorm(head_dim)) if rms else (lambda: nn.LayerNorm(head_dim))  # eps 1e-5, the default
    self.q_norm = norm() if qk_norm else nn.Identity()
    self.k_norm = norm() if qk_norm else nn.Identity()
    self.proj = nn.Linear(width, width)

  def forward(self, x: torch.Tensor, rope: VisionRotaryEmbedding | None) -> torch.Tensor:
    b, n, width = x.shape
    q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)  # (B, h, N, d)
    q, k = self.q_norm(q), self.k_norm(k)
    if rope is not None:
      q, k = rope(q), rope(k)
    out = F.scaled_dot_product_attention(q, k, v)
    return self.proj(out.transpose(1, 2).reshape(b, n, width))


class SwiGLUFFN(nn.Module):

  def __init__(self, width: int, hidden: int):
    super().__init__()
    self.w12 = nn.Linear(width, 2 * hidden)
    self.w3 = nn.Linear(hidden, width)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x1, x2 = self.w12(x).chunk(2, dim=-1)
    return self.w3(F.silu(x1) * x2)


class Mlp(nn.Module):

  def __init__(self, width: int, hidden: int):
    super().__init__()
    self.fc1 = nn.Linear(width, hidden)
    self.fc2 = nn.Linear(hidden, width)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
  """adaLN-Zero block: x + gate * Attn(modulate(norm(x))), then x + gate * MLP(modulate(norm(x)))."""

  def __init__(self, width: int, heads: int, mlp_ratio: float, qk_norm: bool, swiglu: bool, rms: bool):
    super().__init__()
    self.norm1 = _norm(width, rms)
    self.attn = Attention(width, heads, qk_norm, rms)
    self.norm2 = _norm(width, rms)
    hidden = int(width * mlp_ratio)
    self.mlp = SwiGLUFFN(width, int(2 / 3 * hidden)) if swiglu else Mlp(width, hidden)
    self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))  # pylint: disable=invalid-name

  def forward(self, x: torch.Tensor, c: torch.Tensor, rope: VisionRotaryEmbedding | None) -> torch.Tensor:
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
    x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope)
    return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):

  def __init__(self, width: int, patch: int, cout: int, rms: bool):
    super().__init__()
    self.norm_final = _norm(width, rms)
    self.linear = nn.Linear(width, patch * patch * cout)
    self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))  # pylint: disable=invalid-name

  def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
    return self.linear(modulate(self.norm_final(x), shift, scale))


def _projector(width: int, projector_dim: int, z_dim: int) -> nn.Sequential:
  return nn.Sequential(nn.Linear(width, projector_dim), nn.SiLU(), nn.Linear(projector_dim, projector_dim), nn.SiLU(),
                       nn.Linear(projector_dim, z_dim))


class TorchDiT(nn.Module):
  """The reference DiT; the constructor takes the official arguments.

  ``forward(x (B, C, H, W), t (B,), y (B,)) -> (v (B, C, H, W), [z (B, N, Z) per REPA target])``.
  ``t`` in [0, 1] (t = 1 is data); ``y`` in [0, num_classes], ``num_classes`` the null class.
  In ``train()`` mode labels are dropped to the null class with ``class_dropout_prob``.
  """

  def __init__(self, input_size: int = 16, patch_size: int = 1, in_channels: int = 4, hidden_size: int = 1024,
               depth: int = 24, num_heads: int = 16, mlp_ratio: float = 4.0, class_dropout_prob: float = 0.1,
               num_classes: int = 1000, use_qknorm: bool = True, use_swiglu: bool = True, use_rope: bool = True,
               use_rmsnorm: bool = True, learn_sigma: bool = False, z_dims: Sequence[int] = (768,),
               encoder_depth: int = 8, projector_dim: int = 2048):
    super().__init__()
    if learn_sigma:
      raise ValueError("learn_sigma=True: this DiT predicts a velocity only; use learn_sigma=False.")
    if input_size % patch_size:
      raise ValueError(f"input_size={input_size} is not a multiple of patch_size={patch_size}.")
    if hidden_size % num_heads:
      raise ValueError(f"hidden_size={hidden_size} is not a multiple of num_heads={num_heads}.")
    if z_dims and not 1 <= encoder_depth <= depth:
      raise ValueError(f"encoder_depth={encoder_depth}: the REPA projector needs 1 <= encoder_depth <= depth={depth}.")
    self.patch_size, self.out_channels, self.num_classes = patch_size, in_channels, num_classes
    self.encoder_depth = encoder_depth
    self.grid = input_size // patch_size
    self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
    self.t_embedder = TimestepEmbedder(hidden_size)
    self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
    # Fixed, as the reference's frozen nn.Parameter (it stays in parameters() and the state dict).
    self.pos_embed = nn.Parameter(torch.zeros(1, self.grid**2, hidden_size), requires_grad=False)
    self.feat_rope = VisionRotaryEmbedding(hidden_size // num_heads, self.grid) if use_rope else None
    self.blocks = nn.ModuleList([
        DiTBlock(hidden_size, num_heads, mlp_ratio, use_qknorm, use_swiglu, use_rmsnorm) for _ in range(depth)])
    self.projectors = nn.ModuleList([_projector(hidden_size, projector_dim, z) for z in z_dims])
    self.final_layer = FinalLayer(hidden_size, patch_size, in_channels, use_rmsnorm)
    self.initialize_weights()

  @torch.no_grad()
  def initialize_weights(self) -> None:
    """The reference's init: xavier-uniform linears with zero biases, N(0, 0.02) embeddings, zero adaLN and output."""
    for m in self.modules():
      if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        nn.init.zeros_(m.bias)
    self.pos_embed.copy_(torch.tensor(sincos_pos_embed(self.pos_embed.shape[-1], self.grid),
                                      dtype=torch.float32, device=self.pos_embed.device)[None])
    w = self.x_embedder.proj.weight
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # as a (D, C * p * p) linear
    nn.init.zeros_(self.x_embedder.proj.bias)
    nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
    nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
    nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
    for layer in [b.adaLN_modulation[-1] for b in self.blocks] + [self.final_layer.adaLN_modulation[-1],
                                                                   self.final_layer.linear]:
      nn.init.zeros_(layer.weight)
      nn.init.zeros_(layer.bias)

  def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
    """(B, N, p * p * C) -> (B, C, H, W)."""
    b, p, c, g = x.shape[0], self.patch_size, self.out_channels, self.grid
    return x.reshape(b, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, g * p, g * p)

  def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    h = self.x_embedder(x) + self.pos_embed  # (B, N, D)
    c = self.t_embedder(t) + self.y_embedder(y, self.training)  # (B, D)
    zs = []
    for i, block in enumerate(self.blocks):
      h = block(h, c, self.feat_rope)
      if i + 1 == self.encoder_depth:
        zs = [proj(h) for proj in self.projectors]
    return self.unpatchify(self.final_layer(h, c)), zs

  def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float,
                       cfg_interval: bool = False, cfg_interval_start: float = 0.0) -> torch.Tensor:
    """The reference's classifier-free guidance, quirk included: only channels 0..2 are guided.

    The first half of ``x`` is run twice, with the labels ``y`` = [cond | null]; channels
    0..2 get ``u + cfg_scale * (c - u)`` in both halves, the other channels keep each
    half's raw prediction. With ``cfg_interval`` and ``t[0] < cfg_interval_start`` the
    conditional prediction replaces the guided one.
    """
    half = x[: len(x) // 2]
    out = self.forward(torch.cat([half, half]), t, y)[0]
    guided, rest = out[:, :3], out[:, 3:]
    cond, uncond = guided.chunk(2)
    mixed = uncond + cfg_scale * (cond - uncond)
    if cfg_interval and t[0] < cfg_interval_start:
      mixed = cond
    return torch.cat([torch.cat([mixed, mixed]), rest], dim=1)

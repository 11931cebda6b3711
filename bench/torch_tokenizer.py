"""The official iFSQ tokenizer (``ImageFSQVAEModel``) rebuilt from torch.nn layers, for side-by-side speed.

It follows the reference architecture: GroupNorm(32, eps 1e-6), swish, ResNet
blocks with a 1x1 ``nin_shortcut`` when widths differ (``num_res_blocks`` of them
in each mid stack too), (0, 1, 0, 1)-padded stride-2 downsampling, nearest
upsampling, ``double_z``, 1x1 ``quant_conv`` / ``post_quant_conv`` and the iFSQ or
tanh FSQ bound, with the official module names, so the official state dict loads
into it as it is. Channels first (NCHW), as the official code runs. No attention:
the paper's configuration has none. ``tests/test_torch_tokenizer_peer.py`` checks
it against the official model's golden outputs and its parameter count.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def _norm(c: int) -> nn.GroupNorm:
  return nn.GroupNorm(32, c, eps=1e-6)


def _conv(cin: int, cout: int, k: int = 3, stride: int = 1, padding: int = 1) -> nn.Conv2d:
  return nn.Conv2d(cin, cout, k, stride, padding)


class ResnetBlock2D(nn.Module):

  def __init__(self, cin: int, cout: int):
    super().__init__()
    self.norm1, self.conv1 = _norm(cin), _conv(cin, cout)
    self.norm2, self.conv2 = _norm(cout), _conv(cout, cout)
    if cin != cout:
      self.nin_shortcut = _conv(cin, cout, 1, padding=0)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    h = self.conv1(F.silu(self.norm1(x)))
    h = self.conv2(F.silu(self.norm2(h)))
    return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class Downsample(nn.Module):

  def __init__(self, c: int):
    super().__init__()
    self.conv = _conv(c, c, stride=2, padding=0)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):

  def __init__(self, c: int):
    super().__init__()
    self.conv = _conv(c, c)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Encoder(nn.Module):

  def __init__(self, ch: int, mult: list[int], num_res_blocks: int, down: list[bool], z_out: int):
    super().__init__()
    widths = [ch * m for m in mult]
    self.conv_in = _conv(3, ch)
    self.down = nn.ModuleList()
    cin = ch
    for level, cout in enumerate(widths):
      stage = nn.Module()
      stage.block = nn.ModuleList()
      for _ in range(num_res_blocks):
        stage.block.append(ResnetBlock2D(cin, cout))
        cin = cout
      if down[level]:
        stage.downsample = Downsample(cout)
      self.down.append(stage)
    self.mid_block = nn.ModuleList([ResnetBlock2D(cin, cin) for _ in range(num_res_blocks)])
    self.norm_out, self.conv_out = _norm(cin), _conv(cin, z_out)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    h = self.conv_in(x)
    for stage in self.down:
      for block in stage.block:
        h = block(h)
      if hasattr(stage, "downsample"):
        h = stage.downsample(h)
    for block in self.mid_block:
      h = block(h)
    return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):

  def __init__(self, ch: int, mult: list[int], num_res_blocks: int, up: list[bool], z_in: int):
    super().__init__()
    widths = [ch * m for m in mult]
    cin = widths[-1]
    self.conv_in = _conv(z_in, cin)
    self.mid_block = nn.ModuleList([ResnetBlock2D(cin, cin) for _ in range(num_res_blocks)])
    stages = []
    for level in reversed(range(len(widths))):  # built from the deepest level; stored by level index
      stage = nn.Module()
      stage.block = nn.ModuleList()
      for _ in range(num_res_blocks + 1):
        stage.block.append(ResnetBlock2D(cin, widths[level]))
        cin = widths[level]
      if up[level]:
        stage.upsample = Upsample(cin)
      stages.insert(0, stage)
    self.up = nn.ModuleList(stages)
    self.norm_out, self.conv_out = _norm(cin), _conv(cin, 3)

  def forward(self, z: torch.Tensor) -> torch.Tensor:
    h = self.conv_in(z)
    for block in self.mid_block:
      h = block(h)
    for stage in reversed(self.up):
      for block in stage.block:
        h = block(h)
      if hasattr(stage, "upsample"):
        h = stage.upsample(h)
    return self.conv_out(F.silu(self.norm_out(h)))


def _round_ste(y: torch.Tensor) -> torch.Tensor:
  return y + (torch.round(y) - y).detach()


class ImageFSQVAE(nn.Module):
  """Built from the official model config (``run.json``); NCHW images in [-1, 1].

  ``forward(x) -> (reconstruction, codes, indices)``: x (B, 3, H, W), codes (B, D, H/f, W/f),
  indices (B, H/f, W/f) (mixed radix, channel 0 least significant).
  """

  def __init__(self, config: dict[str, Any]):
    super().__init__()
    ch, mult, blocks = config.get("hidden_size", 128), list(config.get("hidden_size_mult", (1, 2, 4, 4))), \
        config.get("num_res_blocks", 2)
    if config.get("attn_resolutions"):
      raise ValueError(f"attn_resolutions={config['attn_resolutions']}: this peer has no attention blocks.")
    z, embed = config.get("z_channels", 4), config.get("embed_dim", 4)
    down = [bool(d) for d in config.get("encoder_spatial_downsample", ["Downsample"] * (len(mult) - 1) + [""])]
    up = [bool(u) for u in config.get("decoder_spatial_upsample", [""] + ["Upsample"] * (len(mult) - 1))]
    z_out = 2 * z if config.get("double_z", True) else z
    self.encoder = Encoder(ch, mult, blocks, down, z_out)
    self.decoder = Decoder(ch, mult, blocks, up, z)
    self.quant_conv = _conv(z_out, embed, 1, padding=0)
    self.post_quant_conv = _conv(embed, z, 1, padding=0)
    self.levels = list(config.get("levels", (8, 8, 8, 8)))
    self.simple_bound = config.get("do_simple_bound", False)
    if self.simple_bound and config.get("act_fun") != "scale_sigmoid_16":
      raise ValueError(f"act_fun={config.get('act_fun')!r}: the simple bound here is iFSQ's scale_sigmoid_16.")

  def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, D, h, w) -> codes (B, D, h, w) on the level grid, indices (B, h, w)."""
    levels = torch.tensor(self.levels, dtype=z.dtype, device=z.device).view(1, -1, 1, 1)
    if self.simple_bound:
      bounded = (2 * torch.sigmoid(1.6 * z) - 1) * (levels - 1) / 2
    else:
      half_l = (levels - 1) * (1 + 1e-3) / 2
      offset = torch.where(torch.remainder(levels, 2) == 0, 0.5, 0.0)
      bounded = torch.tanh(z + torch.atanh(offset / half_l)) * half_l - offset
    half_width = torch.div(levels, 2, rounding_mode="floor")
    codes = _round_ste(bounded) / half_width
    basis = torch.cumprod(torch.tensor([1] + self.levels[:-1], device=z.device), 0).view(1, -1, 1, 1)
    digits = torch.round(codes * half_width + half_width).long()
    return codes, (digits * basis).sum(1)

  def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return self.quantize(self.quant_conv(self.encoder(x)))

  def decode(self, codes: torch.Tensor) -> torch.Tensor:
    return self.decoder(self.post_quant_conv(codes))

  def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    codes, indices = self.encode(x)
    return self.decode(codes), codes, indices

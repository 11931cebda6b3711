"""The official iFSQ LlamaGen (``llamagen/models/llamagen.py``) rebuilt from torch.nn layers, for side-by-side speed.

A class-conditional LlamaGen as the official code trains it on tokenizer indices
and samples it (``generate.py``, ``generate_group.py``), written from the
reference's specification; ``tests/test_torch_llamagen.py`` checks it against the
official model's golden outputs and the LlamaGen-L state-dict shapes. Module
names are the official ones, so an official state dict loads with ``strict=True``
(``tok_embeddings``, ``cls_embedding.embedding_table``, ``layers.{i}.attention.wqkv``,
``{g}_emb``, ``factorized_blocks.{i}``, ``output.{g}``, ``projectors.0.{0,2,4}``, ...).
The KV caches are plain attributes, not buffers: they never enter the state dict.

* Teacher forcing (:meth:`TorchLlamaGen.forward`): the sequence ``[cls(y), tok(x_0), ...,
  tok(x_{N-2})]``, dropout on it (class included), pre-norm Llama blocks (RMSNorm eps
  1e-5 in float32, causal attention with 2D RoPE, SwiGLU of hidden
  ``find_multiple(int(8 D / 3), 256)``, no biases, dropout after ``wo`` and ``w2``), the
  final RMSNorm and the head; position n predicts token n. The REPA projector reads
  the residual stream after layer ``encoder_depth``.
* 2D RoPE (:func:`rope_cache`): (1 + N, d/2, 2) (cos, sin), the class position's row
  all zero (its q and k become zero), then for grid cell (r, c) the angles
  ``[r theta_0 .. | c theta_0 ..]``; adjacent pairs rotate as complex numbers, in float32.
* Factorized tokens (``vocab_size`` a list of G sizes): the input embedding of a position
  is the sum of its sub-token embeddings ``{g}_emb``; the trunk's output h_n (no final
  norm) starts the mini-sequence ``[h_n, 0_emb(x_n^0), ..., (G-2)_emb(x_n^{G-2})]`` run
  through the causal ``factorized_blocks`` (RoPE rows 0..G-1), the final norm and head g
  on mini-position g.
* Decoding with KV caches: :meth:`TorchLlamaGen.setup_caches` allocates (B, K, S, d)
  keys and values per layer and a causal mask over S = ``max_seq_length`` positions;
  every step attends over the whole cache through the mask rows of its positions, as
  the reference does. :meth:`~TorchLlamaGen.prefill` writes the class token at
  position 0, :meth:`~TorchLlamaGen.decode_step` token n - 1 at position n; a
  factorized model's :meth:`~TorchLlamaGen.decode_subtoken` feeds its own G-position
  cache, which sub-token 0 resets.
* Sampling: :func:`generate` and :func:`generate_group`, the reference's procedures
  (classifier-free guidance on the ``[labels | null]`` doubled batch, temperature,
  top-k then top-p filtering, ``torch.multinomial``); see their docstrings.

Differences from the reference: drop path (0 in every shipped config) and more than
one class token are refused; ``generate_group`` floors the temperature at 1e-5 as
``generate`` does (the reference divides by T itself there) and draws greedily with
``top_k=1`` (the reference's greedy path fails).

B batch, N tokens (grid * grid, raster order), G sub-token groups, V vocabulary
(V_g of group g), D width, K heads, d head width (D / K), S cached positions,
Z REPA width.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from torch_dit import LabelEmbedder, RMSNorm, _projector  # pylint: disable=protected-access

# The reference's LlamaGen_models suffixes: (n_layer, dim, n_head).
LLAMAGEN_SIZES = {"S": (12, 384, 12), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (36, 1280, 20),
                  "XXL": (48, 1536, 24), "XXXL": (24, 3200, 32)}
NORM_EPS = 1e-5
ROPE_BASE = 10000.0
INIT_STD = 0.02
MIN_TEMPERATURE = 1e-5


def find_multiple(n: int, k: int) -> int:
  return n if n % k == 0 else n + k - n % k


def llamagen_kwargs(size: str = "L", **overrides: Any) -> dict[str, Any]:
  """``TorchLlamaGen`` arguments of LlamaGen-{size}, otherwise as ``llamagen/train.py`` builds it for the paper.

  Defaults: a 16 x 16 grid (256 tokens), V = 83,521 (one iFSQ index), 1000 classes,
  dropout 0.1 everywhere, 2 factorized blocks, a REPA projector to 768 after layer 8.
  """
  if size not in LLAMAGEN_SIZES:
    raise ValueError(f"size={size!r}: valid sizes are {sorted(LLAMAGEN_SIZES)}.")
  n_layer, dim, n_head = LLAMAGEN_SIZES[size]
  kwargs = dict(dim=dim, n_layer=n_layer, n_head=n_head, vocab_size=[83521], block_size=256, num_classes=1000,
                cls_token_num=1, class_dropout_prob=0.1, token_dropout_p=0.1, resid_dropout_p=0.1,
                ffn_dropout_p=0.1, drop_path_rate=0.0, factorized_n_layer=2, z_dims=[768], encoder_depth=8,
                projector_dim=2048)
  unknown = set(overrides) - set(kwargs)
  if unknown:
    raise ValueError(f"unknown TorchLlamaGen arguments {sorted(unknown)}; valid ones are {sorted(kwargs)}.")
  return {**kwargs, **overrides}


def rope_cache(grid: int, head_dim: int) -> torch.Tensor:
  """``precompute_freqs_cis_2d(grid, head_dim, 10000, 1)``: (1 + N, d/2, 2) float32 (cos, sin), row 0 all zero."""
  if head_dim % 4:
    raise ValueError(f"head width {head_dim}: 2D RoPE needs a multiple of 4.")
  half = head_dim // 2
  freqs = 1.0 / (ROPE_BASE ** (torch.arange(0, half, 2)[: half // 2].float() / half))  # (d/4,)
  angles = torch.outer(torch.arange(grid).float(), freqs)  # (grid, d/4)
  cells = torch.cat([angles[:, None, :].expand(grid, grid, half // 2),  # the row's angles first
                     angles[None, :, :].expand(grid, grid, half // 2)], dim=-1).reshape(grid * grid, half)
  table = torch.stack([cells.cos(), cells.sin()], dim=-1)
  return torch.cat([torch.zeros(1, half, 2), table])


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
  """x (B, S, K, d) rotated in adjacent pairs by rope (S, d/2, 2), in float32."""
  pairs = x.float().unflatten(-1, (-1, 2))  # (B, S, K, d/2, 2)
  cos, sin = rope[None, :, None, :, 0], rope[None, :, None, :, 1]
  x0, x1 = pairs[..., 0], pairs[..., 1]
  return torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1).flatten(-2).type_as(x)


class KVCache:
  """Keys and values (B, K, S, d) of one attention layer; positions are written in place."""

  def __init__(self, batch: int, heads: int, length: int, head_dim: int, dtype: torch.dtype, device: Any):
    self.k = torch.zeros(batch, heads, length, head_dim, dtype=dtype, device=device)
    self.v = torch.zeros_like(self.k)

  def update(self, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Writes k, v (B, K, S', d) at ``positions`` (S',); returns the whole cache."""
    self.k[:, :, positions] = k
    self.v[:, :, positions] = v
    return self.k, self.v


class Attention(nn.Module):

  def __init__(self, dim: int, n_head: int, resid_dropout_p: float):
    super().__init__()
    self.n_head = n_head
    self.wqkv = nn.Linear(dim, 3 * dim, bias=False)
    self.wo = nn.Linear(dim, dim, bias=False)
    self.resid_dropout = nn.Dropout(resid_dropout_p)
    self.kv_cache: KVCache | None = None

  def forward(self, x: torch.Tensor, rope: torch.Tensor, positions: torch.Tensor | None = None,
              mask: torch.Tensor | None = None) -> torch.Tensor:
    """x (B, S', D); rope (S', d/2, 2); with ``positions`` (S',) the keys enter the cache and ``mask`` (S', S) applies."""
    b, s, dim = x.shape
    q, k, v = (t.view(b, s, self.n_head, dim // self.n_head) for t in self.wqkv(x).chunk(3, dim=-1))
    q, k, v = apply_rope(q, rope).transpose(1, 2), apply_rope(k, rope).transpose(1, 2), v.transpose(1, 2)
    if positions is not None:
      k, v = self.kv_cache.update(positions, k, v)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)  # (B, K, S', d)
    return self.resid_dropout(self.wo(out.transpose(1, 2).reshape(b, s, dim)))


class FeedForward(nn.Module):
  """SwiGLU ``w2(silu(w1 x) * w3 x)``, no biases, then dropout."""

  def __init__(self, dim: int, ffn_dropout_p: float):
    super().__init__()
    hidden = find_multiple(int(2 * (4 * dim) / 3), 256)
    self.w1 = nn.Linear(dim, hidden, bias=False)
    self.w3 = nn.Linear(dim, hidden, bias=False)
    self.w2 = nn.Linear(hidden, dim, bias=False)
    self.ffn_dropout = nn.Dropout(ffn_dropout_p)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class TransformerBlock(nn.Module):
  """Pre-norm: ``h = x + Attn(norm(x))``, ``out = h + FFN(norm(h))``."""

  def __init__(self, dim: int, n_head: int, resid_dropout_p: float, ffn_dropout_p: float):
    super().__init__()
    self.attention = Attention(dim, n_head, resid_dropout_p)
    self.feed_forward = FeedForward(dim, ffn_dropout_p)
    self.attention_norm = RMSNorm(dim, NORM_EPS)
    self.ffn_norm = RMSNorm(dim, NORM_EPS)

  def forward(self, x: torch.Tensor, rope: torch.Tensor, positions: torch.Tensor | None = None,
              mask: torch.Tensor | None = None) -> torch.Tensor:
    h = x + self.attention(self.attention_norm(x), rope, positions, mask)
    return h + self.feed_forward(self.ffn_norm(h))


class TorchLlamaGen(nn.Module):
  """The reference LlamaGen; the constructor takes the official ``ModelArgs`` names.

  ``forward(idx, cond_idx) -> (logits, zs)``: ``idx`` (B, N) int64 tokens, or a list of
  G (B, N) sub-token tensors; ``cond_idx`` (B,) labels in [0, num_classes]
  (``num_classes`` the null class). ``logits`` (B, N, V) float32, or a list of G
  (B, N, V_g); ``zs`` a list with the REPA projector's (B, N, Z) output (empty without
  ``z_dims``). In ``train()`` mode labels are dropped with ``class_dropout_prob`` and
  dropout applies.
  """

  def __init__(self, dim: int = 1024, n_layer: int = 24, n_head: int = 16, vocab_size: int | Sequence[int] = (83521,),
               block_size: int = 256, num_classes: int = 1000, cls_token_num: int = 1, class_dropout_prob: float = 0.1,
               token_dropout_p: float = 0.1, resid_dropout_p: float = 0.1, ffn_dropout_p: float = 0.1,
               drop_path_rate: float = 0.0, factorized_n_layer: int = 2, z_dims: Sequence[int] = (768,),
               encoder_depth: int = 8, projector_dim: int = 2048):
    super().__init__()
    vocab = [vocab_size] if isinstance(vocab_size, int) else list(vocab_size)
    grid = int(round(block_size ** 0.5))
    if grid * grid != block_size:
      raise ValueError(f"block_size={block_size} must be a square (grid * grid tokens).")
    if cls_token_num != 1 or drop_path_rate != 0:
      raise ValueError(f"cls_token_num={cls_token_num}, drop_path_rate={drop_path_rate}: only 1 class token and no "
                       "drop path (every shipped config) are built.")
    if dim % n_head:
      raise ValueError(f"dim={dim} is not a multiple of n_head={n_head}.")
    if z_dims and not 1 <= encoder_depth <= n_layer:
      raise ValueError(f"encoder_depth={encoder_depth}: the REPA projector needs 1 <= encoder_depth <= n_layer="
                       f"{n_layer}.")
    self.vocab_size, self.block_size, self.num_classes = vocab, block_size, num_classes
    self.n_head, self.encoder_depth = n_head, encoder_depth
    self.factorized = len(vocab) > 1
    self.cls_embedding = LabelEmbedder(num_classes, dim, class_dropout_prob)
    if self.factorized:
      for g, v in enumerate(vocab):
        self.add_module(f"{g}_emb", nn.Embedding(v, dim))
    else:
      self.tok_embeddings = nn.Embedding(vocab[0], dim)
    self.tok_dropout = nn.Dropout(token_dropout_p)
    block = lambda: TransformerBlock(dim, n_head, resid_dropout_p, ffn_dropout_p)
    self.layers = nn.ModuleList([block() for _ in range(n_layer)])
    if self.factorized:
      self.factorized_blocks = nn.ModuleList([block() for _ in range(factorized_n_layer)])
    self.norm = RMSNorm(dim, NORM_EPS)
    if self.factorized:
      self.output = nn.ModuleList([nn.Linear(dim, v, bias=False) for v in vocab])
    else:
      self.output = nn.Linear(dim, vocab[0], bias=False)
    self.projectors = nn.ModuleList([_projector(dim, projector_dim, z) for z in z_dims])
    self.freqs_cis = rope_cache(grid, dim // n_head)  # a plain attribute: not in the state dict
    self.causal_mask: torch.Tensor | None = None
    self.initialize_weights()

  @torch.no_grad()
  def initialize_weights(self) -> None:
    """The reference's init: N(0, 0.02) linears and embeddings, zero biases, zero output heads."""
    for m in self.modules():
      if isinstance(m, (nn.Linear, nn.Embedding)):
        nn.init.normal_(m.weight, std=INIT_STD)
      if isinstance(m, nn.Linear) and m.bias is not None:
        nn.init.zeros_(m.bias)
    for head in self.heads():
      nn.init.zeros_(head.weight)

  def heads(self) -> list[nn.Linear]:
    return list(self.output) if self.factorized else [self.output]

  def embedding(self, g: int) -> nn.Embedding:
    """The token embedding of sub-token group g (``tok_embeddings`` for single tokens)."""
    return getattr(self, f"{g}_emb") if self.factorized else self.tok_embeddings

  def embed_tokens(self, idx: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """(B, S) tokens, or G (B, S) sub-tokens (their embeddings summed) -> (B, S, D)."""
    if not self.factorized:
      return self.tok_embeddings(idx)
    return sum(self.embedding(g)(x) for g, x in enumerate(idx))

  # -------------------------------------------------------------- teacher forcing

  def forward(self, idx: torch.Tensor | Sequence[torch.Tensor],
              cond_idx: torch.Tensor) -> tuple[torch.Tensor | list[torch.Tensor], list[torch.Tensor]]:
    subtokens = list(idx) if self.factorized else [idx]
    n = subtokens[0].shape[1]
    cls = self.cls_embedding(cond_idx, self.training)[:, None]  # (B, 1, D)
    tokens = self.embed_tokens([x[:, :-1] for x in subtokens] if self.factorized else idx[:, :-1])
    h = self.tok_dropout(torch.cat([cls, tokens], dim=1))  # (B, N, D)
    rope = self.freqs_cis[:n].to(h.device)
    zs = []
    for i, layer in enumerate(self.layers):
      h = layer(h, rope)
      if i + 1 == self.encoder_depth:
        zs = [proj(h) for proj in self.projectors]
    if not self.factorized:
      return self.output(self.norm(h)).float(), zs
    b, _, dim = h.shape
    groups = len(self.vocab_size)
    ctx = torch.stack([h] + [self.embedding(g)(subtokens[g]) for g in range(groups - 1)], dim=2)  # (B, N, G, D)
    ctx = ctx.reshape(b * n, groups, dim)
    for block in self.factorized_blocks:
      ctx = block(ctx, self.freqs_cis[:groups].to(h.device))
    ctx = self.norm(ctx).reshape(b, n, groups, dim)
    return [head(ctx[:, :, g]).float() for g, head in enumerate(self.output)], zs

  # -------------------------------------------------------------- decoding

  def setup_caches(self, max_batch_size: int, max_seq_length: int) -> None:
    """KV caches of every layer for ``max_batch_size`` rows and ``max_seq_length`` (at least N) positions."""
    weight = self.norm.weight
    head_dim = weight.shape[0] // self.n_head
    for layer in self.layers:
      layer.attention.kv_cache = KVCache(max_batch_size, self.n_head, max_seq_length, head_dim, weight.dtype,
                                         weight.device)
    self.causal_mask = torch.tril(torch.ones(max_seq_length, max_seq_length, dtype=torch.bool, device=weight.device))

  def _trunk_step(self, h: torch.Tensor, position: int) -> torch.Tensor:
    """Embedded inputs h (B, 1, D) at ``position`` through the cached layers -> (B, 1, D)."""
    positions = torch.tensor([position], device=h.device)
    rope, mask = self.freqs_cis[positions].to(h.device), self.causal_mask[positions]
    for layer in self.layers:
      h = layer(h, rope, positions, mask)
    return h

  def _step_out(self, h: torch.Tensor) -> torch.Tensor:
    """Single tokens: the logits (B, V) float32; factorized: the trunk's output (B, D)."""
    return h[:, -1] if self.factorized else self.output(self.norm(h[:, -1])).float()

  def prefill(self, cond_idx: torch.Tensor) -> torch.Tensor:
    """The class tokens at position 0: logits (B, V) of token 0, or a factorized model's context h (B, D)."""
    return self._step_out(self._trunk_step(self.cls_embedding(cond_idx, False)[:, None], 0))

  def decode_step(self, idx: torch.Tensor | Sequence[torch.Tensor], position: int) -> torch.Tensor:
    """Token ``position - 1`` (B, 1), or G (B, 1) sub-tokens, at ``position``: the logits or context of that position."""
    return self._step_out(self._trunk_step(self.embed_tokens(idx), position))

  def decode_subtoken(self, h: torch.Tensor, previous: torch.Tensor | None, index: int) -> torch.Tensor:
    """Logits (B, V_index) float32 of sub-token ``index`` of the current position (factorized models).

    Index 0 resets the sub-token caches and feeds the context h (B, D) at mini-position
    0; index g > 0 feeds ``(g-1)_emb(previous)``, previous (B, 1) the sub-token g - 1 just
    drawn, at mini-position g. Call with index 0, 1, ..., G - 1 in order.
    """
    if index == 0:
      groups, head_dim = len(self.vocab_size), h.shape[-1] // self.n_head
      for block in self.factorized_blocks:
        block.attention.kv_cache = KVCache(h.shape[0], self.n_head, groups, head_dim, h.dtype, h.device)
      x = h[:, None]
    else:
      x = self.embedding(index - 1)(previous)
    positions = torch.tensor([index], device=x.device)
    rope, mask = self.freqs_cis[positions].to(x.device), self.causal_mask[positions][:, :len(self.vocab_size)]
    for block in self.factorized_blocks:
      x = block(x, rope, positions, mask)
    return self.output[index](self.norm(x[:, -1])).float()


# ------------------------------------------------------------------ sampling

def top_k_top_p_filtering(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
  """(B, V): logits below the k-th largest, then outside the nucleus, become -inf (HF style; the first token past p stays)."""
  if top_k > 0:
    kth = torch.topk(logits, min(top_k, logits.shape[-1]))[0][..., -1, None]
    logits = logits.masked_fill(logits < kth, float("-inf"))
  if top_p < 1.0:
    ordered, order = torch.sort(logits, descending=True)
    remove = torch.cumsum(F.softmax(ordered, dim=-1), dim=-1) > top_p
    remove[..., 1:] = remove[..., :-1].clone()  # shift: keep the token that crosses p
    remove[..., 0] = False
    logits = logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
  return logits


def sample(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
  """The reference's ``sample``: (B, V) logits -> (B, 1) int64 tokens drawn by ``torch.multinomial``."""
  logits = logits / max(temperature, MIN_TEMPERATURE)
  if top_k > 0 or top_p < 1.0:
    logits = top_k_top_p_filtering(logits, top_k, top_p)
  return torch.multinomial(F.softmax(logits, dim=-1), num_samples=1, generator=generator)


def _guide(logits: torch.Tensor, cfg_scale: float, guided: bool) -> torch.Tensor:
  """[cond | uncond] (2B, V) -> u + s (c - u), or the conditional logits unguided; (B, V) as given without CFG."""
  if cfg_scale <= 1.0:
    return logits
  cond, uncond = logits.chunk(2)
  return uncond + cfg_scale * (cond - uncond) if guided else cond


def _start(model: TorchLlamaGen, cond: torch.Tensor, cfg_scale: float) -> torch.Tensor:
  """Sets up the caches; returns the labels of the batch to run ([labels | null] with guidance)."""
  if cfg_scale > 1.0:
    cond = torch.cat([cond, torch.full_like(cond, model.num_classes)])
  model.setup_caches(len(cond), find_multiple(1 + model.block_size, 8))
  return cond


@torch.inference_mode()
def generate(model: TorchLlamaGen, cond: torch.Tensor, cfg_scale: float = 1.0, cfg_interval: int = -1,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             generator: torch.Generator | None = None) -> torch.Tensor:
  """The reference's ``generate``: (B,) labels -> (B, N) int64 tokens of a single-token model.

  With ``cfg_scale > 1`` the batch is ``[labels | null]``; each step's logits become
  ``u + s (c - u)`` and the drawn token is fed to both halves. ``cfg_interval = -1``
  guides every token; k >= 0 guides the prefill's token and the decode steps i <= k
  (which draw token i + 1), the rest use the conditional logits. The caches hold
  ``find_multiple(1 + N, 8)`` positions and every step attends over all of them
  through the causal mask, as the reference does.
  """
  model.eval()
  cond = _start(model, cond, cfg_scale)
  logits = _guide(model.prefill(cond), cfg_scale, True)
  tokens = [sample(logits, temperature, top_k, top_p, generator)]
  for i in range(model.block_size - 1):
    x = tokens[-1].repeat(2, 1) if cfg_scale > 1.0 else tokens[-1]
    logits = _guide(model.decode_step(x, i + 1), cfg_scale, cfg_interval < 0 or i <= cfg_interval)
    tokens.append(sample(logits, temperature, top_k, top_p, generator))
  return torch.cat(tokens, dim=1)


@torch.inference_mode()
def generate_group(model: TorchLlamaGen, cond: torch.Tensor, cfg_scale: float = 1.0, temperature: float = 1.0,
                   top_k: int = 0, top_p: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
  """The reference's ``generate_group``: (B,) labels -> (B, N, G) int64 sub-tokens of a factorized model.

  Per position: one trunk step (the class at position 0, else the summed embeddings of
  the previous position's sub-tokens) gives h; then sub-token g = 0..G-1 is drawn from
  :meth:`TorchLlamaGen.decode_subtoken` (guided with the same scale; every position is
  guided, as the reference ignores ``cfg_interval`` here).
  """
  model.eval()
  cond = _start(model, cond, cfg_scale)
  double = (lambda t: t.repeat(2, 1)) if cfg_scale > 1.0 else (lambda t: t)
  positions = []
  for n in range(model.block_size):
    h = model.prefill(cond) if n == 0 else model.decode_step([double(t) for t in positions[-1]], n)
    drawn = []
    for g in range(len(model.vocab_size)):
      logits = _guide(model.decode_subtoken(h, double(drawn[-1]) if g else None, g), cfg_scale, True)
      drawn.append(sample(logits, temperature, top_k, top_p, generator))
    positions.append(drawn)
  return torch.stack([torch.cat(drawn, dim=1) for drawn in positions], dim=1)

"""The LlamaGen class-conditional autoregressive generator of the iFSQ paper, in Linen.

LlamaGen (Sun et al. 2024) as the official ``llamagen/models/llamagen.py`` trains it
on tokenizer indices: a decoder-only Llama transformer over the N = grid * grid
tokens of an image in raster order, prefixed by one class token.

* Input sequence (teacher forcing): ``[cls(y), tok(x_0), ..., tok(x_{N-2})]``, so
  position n (0 is the class) predicts token n; all N positions are returned.
  Dropout ``token_dropout_prob`` on the embeddings, the class embedding included.
  The label table has ``num_classes + 1`` rows, the last the null class of
  classifier-free guidance; with ``train=True`` a label becomes null with
  ``class_dropout_prob``.
* Blocks (pre-norm): ``h = x + Attn(RMSNorm(x))``, ``out = h + FFN(RMSNorm(h))``,
  RMSNorm eps 1e-5 with float32 statistics and a learnable scale, no biases
  anywhere, SwiGLU ``w2(silu(w1 x) * w3 x)`` of hidden width
  ``find_multiple(int(8 D / 3), 256)``, dropout ``dropout_prob`` after ``wo`` and
  after ``w2``. A final RMSNorm, then the output head; logits are float32.
* 2D RoPE (:func:`rope_table`): the first half of each head's pairs rotate by the
  token's grid row, the second half by its column; adjacent pairs
  ``(x[2i], x[2i+1])`` rotate as complex numbers, in float32. The class position
  gets the table's all-zero row, as the reference's: cos = sin = 0 there, so **the
  class token's q and k are zero**. Its key scores 0 against every query and its
  value is mixed in with weight ``exp(0)``; the class token itself attends only
  to itself and outputs its value.
* REPA projector (D -> projector_dim -> projector_dim -> Z, SiLU between, biases)
  on the residual stream after layer ``encoder_depth`` (from 1; 0 = the
  embeddings): the hidden state at position n is aligned with the DINO feature of
  patch n, the patch it predicts. ``z_dim = 0`` builds no projector.
* Factorized tokens (``vocab_sizes`` with G > 1 entries, iFSQ index groups, e.g.
  (289, 289)): a position's input embedding is the sum of its G sub-token
  embeddings ``emb_g``; the trunk's output h_n (before the final norm) starts a
  G-long mini-sequence ``[h_n, emb_0(x_n^0), ..., emb_{G-2}(x_n^{G-2})]`` that runs
  through ``factorized_depth`` causal blocks (the trunk's dropout in training; RoPE rows 0..G-1 of the table:
  zeros, then the identity of grid cell (0, 0), ...), the shared final norm and
  head g on mini-position g. The logits are a tuple of G arrays.

Initialisation as the reference's: every linear kernel and embedding N(0, 0.02),
zero biases, zero output heads, norm scales 1.

Decoding with a KV cache (a Linen ``cache`` collection). The cache holds, per
layer, ``attention/key`` and ``attention/value`` (B, K, N, d) in the compute dtype,
preallocated for the whole sequence (stacked (L, B, K, N, d) under ``scan_layers``),
and one int32 scalar ``cache_index/index``: the next position to write. Shapes
never change, so a sampler runs every step inside one ``lax.fori_loop``::

  logits, state = model.apply({"params": p}, labels, method=LlamaGen.prefill, mutable=["cache"])
  # labels (B,); logits (B, V) float32: token 0 given the class. The index is now 1.
  logits, state = model.apply({"params": p, **state}, tokens, method=LlamaGen.decode_step,
                              mutable=["cache"])
  # tokens (B,): token i - 1 enters at position i = the index; logits (B, V) predict token i.

``prefill`` allocates the cache when none is given (or reuses one made by
:func:`init_cache`) and always starts new sequences: it writes position 0 and
sets the index to 1, and the causal mask hides whatever a previous sequence left
beyond. Position n uses RoPE row n, as in training, so step-by-step logits equal
the teacher-forced ones. Decoding never applies dropout. For a factorized model
``prefill`` and ``decode_step`` (tokens (B, G)) return the trunk's context
h (B, D) float32 instead, and ``decode_subtoken(h, subtokens, g)`` gives head g's
logits (B, V_g) from h and sub-tokens 0..g-1 of the current position (later
entries of ``subtokens`` are ignored; g is a Python int). The sub-token
transformer is causal over G <= 4 positions, so it is rerun on the whole
mini-sequence rather than cached: the same computation as teacher forcing, at a
cost negligible beside the trunk. Classifier-free guidance is the sampler's
business: it doubles the batch with null labels.

Params mirror the reference's names (``layers.3.attention.wqkv`` becomes
``layers_3/attention/wqkv``, ``0_emb`` becomes ``emb_0``, ``output.1`` becomes
``output_1``), with kernels laid out for sharding: ``wqkv`` (D, 3, K, d), ``wo``
(K, d, D). With ``scan_layers`` (the default) the layers run under ``nn.scan``
with params (and caches) stacked on a leading layer axis (``layers/...``), and so
do the factorized blocks (``factorized_blocks/...``); ``remat_policy`` wraps each
block in ``nn.remat``. The REPA tap rides in the scan's carry (see
:func:`ifsq_jax.models.transformer.run_stack`).

The dense layer, attention with its KV cache, SwiGLU, RMSNorm, block stack,
projector and label table are the shared parts of
:mod:`ifsq_jax.models.transformer`; this file holds what is LlamaGen's own: the
token embeddings, the class token, the Llama block, the factorized head and the
decoding methods.

Precision: params float32; ``dtype`` is the compute dtype of the matmuls; the
residual stream is float32 (under the reference's bf16 autocast it is too: the
float32 embeddings promote it); norm statistics, RoPE, the attention softmax and
the logits (accumulated and returned) are float32.

Differences from the reference: drop path (stochastic depth, 0 in every shipped
config) is not implemented; one class token (``cls_token_num`` 1, the only
value class-conditional LlamaGen uses); one REPA projector. Attention dropout is
0 as in the reference.

B batch, N tokens (grid * grid, raster order), G sub-token groups, V vocabulary
(V_g of group g), D width, K heads, d head width (D / K), F FFN hidden width,
Z REPA width, S positions written in one decoding call.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ifsq_jax.models import transformer
# Re-exported: the trainers and tests read these from here.
from ifsq_jax.models.transformer import (ATTENTION_IMPLS, REMAT_POLICIES, CacheIndex,  # pylint: disable=unused-import
                                         LabelEmbedder, num_params)
from ifsq_jax.parallel import BATCH, EMBED, VOCAB, constrain

# name: (depth, width, heads). "3B" is the reference's "LlamaGen-XXXL".
LLAMAGEN_SIZES = {"S": (12, 384, 12), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (36, 1280, 20),
                  "XXL": (48, 1536, 24), "3B": (24, 3200, 32)}

NORM_EPS = 1e-5
ROPE_BASE = 10000.0
INIT_STD = 0.02
MULTIPLE_OF = 256  # the SwiGLU hidden width is rounded up to a multiple of this
MAX_GROUPS = 4  # the sub-token transformer is rerun, not cached: meant for a few groups


def find_multiple(n: int, k: int) -> int:
  """The smallest multiple of k that is >= n."""
  return n if n % k == 0 else n + k - n % k


def ffn_hidden(width: int) -> int:
  """SwiGLU hidden width F = find_multiple(int(2 * 4D / 3), 256) (2816 for D = 1024)."""
  return find_multiple(int(2 * (4 * width) / 3), MULTIPLE_OF)


# ------------------------------------------------------------------ RoPE

def rope_table(grid: int, head_dim: int) -> np.ndarray:
  """The reference's ``precompute_freqs_cis_2d(grid, head_dim, 10000, 1)``: (1 + N, d/2, 2) float32 (cos, sin).

  Row 0 (the class position) is all zeros. Row 1 + r * grid + c holds the d/2
  angles ``[r theta_0 .. r theta_{d/4-1} | c theta_0 .. c theta_{d/4-1}]`` with
  ``theta_j = 10000^(-2j / (d/2))``; pair i of q and k rotates by angle i. Computed
  in float32, as the reference computes it.
  """
  angles = transformer.rope_angles_2d(grid, head_dim, ROPE_BASE)  # (N, d/2)
  table = np.stack([np.cos(angles), np.sin(angles)], axis=-1)
  return np.concatenate([np.zeros((1,) + table.shape[1:], np.float32), table]).astype(np.float32)


# ------------------------------------------------------------------ layers

def _rms_norm(dtype: Any, name: str) -> nn.RMSNorm:
  return transformer.norm("rmsnorm", dtype, name, eps=NORM_EPS)


def _embed(num: int, width: int, name: str) -> nn.Embed:
  """A float32 table (num, D), N(0, 0.02): the residual stream it starts stays float32."""
  init = nn.with_logical_partitioning(nn.initializers.normal(INIT_STD), (VOCAB, EMBED))
  return nn.Embed(num, width, dtype=jnp.float32, embedding_init=init, name=name)


class TransformerBlock(nn.Module):
  """Pre-norm Llama block: (x (B, S, D) float32, rope (S, d/2, 2)) -> (B, S, D) float32."""

  num_heads: int
  cache_len: int
  dropout_prob: float = 0.1
  attention_impl: str = "xla"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, rope: jax.Array, train: bool, position: jax.Array | None) -> jax.Array:
    """rope (S, d/2, 2) = (cos, sin) of each position; position: see :class:`transformer.Attention`."""
    drop = lambda y: nn.Dropout(self.dropout_prob)(y, deterministic=not train)
    init = nn.initializers.normal(INIT_STD)
    h = transformer.Attention(self.num_heads, causal=True, cache_len=self.cache_len, kernel_init=init,
                              names=("wqkv", "wo"), attention_impl=self.attention_impl, dtype=self.dtype,
                              name="attention")(_rms_norm(self.dtype, "attention_norm")(x),
                                                (rope[..., 0], rope[..., 1]), position)
    x = x + drop(h)
    h = transformer.SwiGLU(ffn_hidden(x.shape[-1]), ("w1", "w3", "w2"), use_bias=False, kernel_init=init,
                           dtype=self.dtype, name="feed_forward")(_rms_norm(self.dtype, "ffn_norm")(x))
    x = constrain(x + drop(h), (BATCH, None, EMBED))
    self.sow("intermediates", "hidden", x)
    return x


# ------------------------------------------------------------------ the model

class LlamaGen(transformer.Generator):
  """The LlamaGen generator (see the module docstring).

  Attributes:
    vocab_sizes: One vocabulary size (single tokens), or one per sub-token group (factorized).
    grid_size: Token grid side; N = grid_size ** 2 tokens (16 for 256 px and a 16x downsampling tokenizer).
    factorized_depth: Blocks of the sub-token transformer (factorized models only).
    token_dropout_prob: Dropout on the input embeddings (class included) with ``train=True``.
    dropout_prob: Dropout on the attention and FFN outputs with ``train=True``.
    ...: The fields of :class:`ifsq_jax.models.transformer.Generator` (width, depth (layers), heads,
      labels, REPA projector (0 = the embeddings), dtype, attention (cuDNN for teacher forcing only), remat,
      scan).
  """

  vocab_sizes: Sequence[int] = (83521,)
  grid_size: int = 16
  factorized_depth: int = 2
  token_dropout_prob: float = 0.1
  dropout_prob: float = 0.1

  def _check(self) -> None:
    self._check_shared(("token_dropout_prob", "dropout_prob"))
    if not self.vocab_sizes or len(self.vocab_sizes) > MAX_GROUPS or min(self.vocab_sizes) < 1:
      raise ValueError(f"vocab_sizes={tuple(self.vocab_sizes)} must hold 1 to {MAX_GROUPS} positive sizes (one per "
                       "sub-token group).")
    if self.factorized and self.factorized_depth < 1:
      raise ValueError(f"factorized_depth={self.factorized_depth} must be >= 1 for the sub-token groups "
                       f"{tuple(self.vocab_sizes)}.")

  @property
  def factorized(self) -> bool:
    return len(self.vocab_sizes) > 1

  @property
  def seq_len(self) -> int:
    return self.grid_size ** 2

  def setup(self):
    self._check()
    width, groups = self.hidden_size, len(self.vocab_sizes)
    self.cls_embedding = LabelEmbedder(self.num_classes, width, self.class_dropout_prob, jnp.float32)
    if self.factorized:
      self.embeddings = [_embed(v, width, f"emb_{g}") for g, v in enumerate(self.vocab_sizes)]
    else:
      self.embeddings = [_embed(self.vocab_sizes[0], width, "tok_embeddings")]
    self.layers = self._stack(self.depth, self.seq_len, self.attention_impl)
    if self.factorized:
      # Sequences of G <= 4 positions gain nothing from a fused kernel.
      self.factorized_blocks = self._stack(self.factorized_depth, groups, "xla")
    self.norm = _rms_norm(self.dtype, "norm")
    self.output = [transformer.Dense((v,), (EMBED, VOCAB), use_bias=False, zero_init=True, dtype=self.dtype,
                                     out_dtype=jnp.float32, name=f"output_{g}" if self.factorized else "output")
                   for g, v in enumerate(self.vocab_sizes)]
    if self.z_dim:
      self.projector = transformer.Projector(self.projector_dim, self.z_dim, nn.initializers.normal(INIT_STD),
                                             self.dtype)
    self.token_dropout = nn.Dropout(self.token_dropout_prob)
    self.cache_index = CacheIndex()

  def _stack(self, depth: int, cache_len: int, attention_impl: str) -> nn.Module | list[nn.Module]:
    """One block to scan, or ``depth`` blocks."""
    # train (argument 3, self being 0) is a Python bool.
    return transformer.block_stack(TransformerBlock, depth, scan_layers=self.scan_layers, remat=self.remat_policy,
                                   static_argnums=(3,), num_heads=self.num_heads, cache_len=cache_len,
                                   dropout_prob=self.dropout_prob, attention_impl=attention_impl, dtype=self.dtype)

  def _embed_tokens(self, tokens: jax.Array) -> jax.Array:
    """(B, S) or (B, S, G) int -> (B, S, D) float32; sub-token embeddings are summed."""
    if not self.factorized:
      return self.embeddings[0](tokens)
    return sum(emb(tokens[..., g]) for g, emb in enumerate(self.embeddings))

  def _rope(self) -> jax.Array:
    return jnp.asarray(rope_table(self.grid_size, self.hidden_size // self.num_heads))

  def _check_tokens(self, tokens: jax.Array, length: tuple[int, int], what: str) -> None:
    groups = len(self.vocab_sizes)
    want = 2 if not self.factorized else 3
    ok = tokens.ndim == want and length[0] <= tokens.shape[1] <= length[1]
    if ok and self.factorized:
      ok = tokens.shape[2] == groups
    if not ok or not jnp.issubdtype(tokens.dtype, jnp.integer):
      layout = "(B, S)" if not self.factorized else f"(B, S, {groups})"
      raise ValueError(f"{what} has shape {tokens.shape} and dtype {tokens.dtype}; this LlamaGen takes integer "
                       f"tokens {layout} with S in [{length[0]}, {length[1]}].")

  def _heads(self, h: jax.Array, only: int | None = None) -> tuple[jax.Array, ...]:
    """h (B, S, D) or (B, S, G, D) -> float32 logits of every head (or of head ``only``)."""
    h = self.norm(h)
    if not self.factorized:
      return (constrain(self.output[0](h), (BATCH, None, VOCAB)),)
    groups = range(len(self.vocab_sizes)) if only is None else (only,)
    return tuple(constrain(self.output[g](h[:, :, g]), (BATCH, None, VOCAB)) for g in groups)

  def _subtoken_logits(self, h: jax.Array, tokens: jax.Array, only: int | None = None,
                      train: bool = False) -> tuple[jax.Array, ...]:
    """Trunk output h (B, S, D) and sub-tokens (B, S, G) -> logits of each head (B, S, V_g) (or of head ``only``)."""
    b, s, width = h.shape
    groups = len(self.vocab_sizes)
    ctx = jnp.stack([h] + [self.embeddings[g](tokens[..., g]) for g in range(groups - 1)], axis=2)  # (B, S, G, D)
    ctx, _ = transformer.run_stack(self.factorized_blocks, self.factorized_depth, ctx.reshape(b * s, groups, width),
                                   self._rope()[:groups], train, None)
    return self._heads(ctx.reshape(b, s, groups, width), only)

  def __call__(self, tokens: jax.Array, labels: jax.Array, *, train: bool = False,
               return_repa: bool = False) -> Any:
    """Teacher-forced logits: position n (0 is the class token) predicts token n.

    Args:
      tokens: (B, N) int in [0, V), or (B, N, G) for factorized models; a shorter
        prefix (B, S) of the sequence is accepted too. The last token is predicted,
        never read.
      labels: (B,) int in [0, num_classes] (num_classes = the null class).
      train: Dropout and label dropout (rng "dropout").
      return_repa: Also return the REPA projector's output.

    Returns:
      logits (B, N, V) float32, or for factorized models a tuple of G arrays
      (B, N, V_g); with ``return_repa`` a pair (logits, repa_features (B, N, Z) float32).
    """
    self._check_tokens(tokens, (1, self.seq_len), "tokens")
    n = tokens.shape[1]
    cls = self.cls_embedding(labels, train)[:, None]  # (B, 1, D)
    h = jnp.concatenate([cls, self._embed_tokens(tokens[:, :-1])], axis=1)  # (B, N, D) float32
    h = constrain(self.token_dropout(h, deterministic=not train), (BATCH, None, EMBED))
    self.sow("intermediates", "embeddings", h)
    repa = self._wants_repa(return_repa)
    h, tap = transformer.run_stack(self.layers, self.depth, h, self._rope()[:n], train, None,
                                   tap_layer=self.encoder_depth if repa else None)
    logits = self._subtoken_logits(h, tokens, train=train) if self.factorized else self._heads(h)[0]
    if not repa:
      return logits
    z = self.projector(tap).astype(jnp.float32)
    return (logits, z) if return_repa else logits

  # -------------------------------------------------------------- decoding

  def _decode(self, h: jax.Array, start: bool) -> jax.Array:
    """Embedded inputs h (B, S, D) at the cache's index (0 with ``start``) -> outputs (B, S, D) float32."""
    position = self.cache_index(start, h.shape[1])
    rope = jax.lax.dynamic_slice_in_dim(self._rope(), position, h.shape[1])
    h, _ = transformer.run_stack(self.layers, self.depth, constrain(h, (BATCH, None, EMBED)), rope, False, position)
    return h

  def _decode_out(self, h: jax.Array) -> jax.Array:
    """Single tokens: logits (B, V) of the last position; factorized: the context h (B, D)."""
    return h[:, -1] if self.factorized else self._heads(h[:, -1:])[0][:, 0]

  def prefill(self, labels: jax.Array) -> jax.Array:
    """Starts sequences with their class token at position 0; call with ``mutable=["cache"]``.

    Args:
      labels: (B,) int in [0, num_classes] (num_classes = the null class).

    Returns:
      The logits (B, V) float32 of token 0, or for a factorized model the context
      h (B, D) float32 that :meth:`decode_subtoken` reads.
    """
    return self._decode_out(self._decode(self.cls_embedding(labels, False)[:, None], start=True))

  def decode_step(self, tokens: jax.Array) -> jax.Array:
    """Feeds token ``index - 1`` at position ``index`` (the cache's) and advances the index.

    Args:
      tokens: (B,) int, or (B, G) sub-tokens for a factorized model.

    Returns:
      The logits (B, V) float32 of token ``index``, or the context h (B, D) float32
      of a factorized model. Call it at most N - 1 times after :meth:`prefill`: the
      cache holds N positions (a later write would land on the last one).
    """
    tokens = tokens[:, None]
    self._check_tokens(tokens, (1, 1), "decode_step tokens[:, None]")
    return self._decode_out(self._decode(self._embed_tokens(tokens), start=False))

  def decode_subtoken(self, context: jax.Array, subtokens: jax.Array, index: int) -> jax.Array:
    """Logits (B, V_index) float32 of sub-token ``index`` of a factorized model's current position.

    Args:
      context: (B, D) from :meth:`prefill` or :meth:`decode_step`.
      subtokens: (B, G) int; entries 0..index-1 are the position's sub-tokens drawn so far, the rest is ignored.
      index: Which sub-token (a Python int in [0, G)).
    """
    if not self.factorized:
      raise ValueError("decode_subtoken is for factorized models; this LlamaGen has one vocabulary "
                       f"{tuple(self.vocab_sizes)}.")
    if not 0 <= index < len(self.vocab_sizes):
      raise ValueError(f"index={index} must be in [0, {len(self.vocab_sizes)}).")
    self._check_tokens(subtokens[:, None], (1, 1), "subtokens[:, None]")
    return self._subtoken_logits(context[:, None], subtokens[:, None], only=index)[0][:, 0]


# ------------------------------------------------------------------ helpers

def llamagen_config(size: str = "L", **overrides: Any) -> dict[str, Any]:
  """Keyword arguments for ``LlamaGen(...)``: LlamaGen-{size} with every other field at its default.

  The dict holds every field but ``dtype`` (pass it as an override, or to
  ``LlamaGen``), so that a config built from it can override any field.

  Args:
    size: A key of LLAMAGEN_SIZES ("S", "B", "L", "XL", "XXL", "3B").
    **overrides: LlamaGen field values (``vocab_sizes`` as a tuple).
  """
  out = transformer.sized_config(LlamaGen, LLAMAGEN_SIZES, size, **overrides)
  out["vocab_sizes"] = tuple(int(v) for v in out["vocab_sizes"])  # hashable: modules are static jit arguments
  return out


def example_inputs(module: LlamaGen, batch: int = 1) -> tuple[np.ndarray, np.ndarray]:
  """Zero (tokens (B, N) or (B, N, G), labels (B,)) of the shapes ``module`` takes: ``module.init(key, *...)``."""
  groups = (len(module.vocab_sizes),) if module.factorized else ()
  return np.zeros((batch, module.seq_len) + groups, np.int32), np.zeros((batch,), np.int32)


def init_cache(module: LlamaGen, batch_size: int) -> dict[str, Any]:
  """A zero "cache" collection for ``batch_size`` sequences (what :meth:`LlamaGen.prefill` allocates), no compute.

  For samplers that keep one cache buffer (e.g. donated) across batches: pass it
  as ``{"params": params, "cache": cache}`` to ``prefill``.
  """
  init = functools.partial(module.init, method=LlamaGen.prefill)
  shapes = jax.eval_shape(init, jax.random.key(0), np.zeros((batch_size,), np.int32))["cache"]
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def trainable_mask(params: Any) -> Any:
  """A tree of True like ``params``: every LlamaGen parameter trains (the reference decays them all, too)."""
  return jax.tree.map(lambda _: True, params)

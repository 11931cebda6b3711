"""Transformer parts shared by the iFSQ paper's generators (DiT and LlamaGen), in Linen.

One dense layer, one attention (QK-norm, rotary embedding, causal mask, KV cache),
one SwiGLU, the norms, the scanned block stack (remat policy, REPA tap), the REPA
projector, the label table with its null class, and :class:`Generator`: the fields
both generators have (width, depth, heads, labels, REPA, dtype, attention, remat,
scan) with their checks. A model file (:mod:`ifsq_jax.models.dit`,
:mod:`ifsq_jax.models.llamagen`) keeps only what makes that model different; the
parts here take the names and kernel initialisers of the model that builds them,
so that its parameter tree stays the reference's.

Precision: params are float32; ``dtype`` is the compute dtype. Every matmul
accumulates in float32 (``preferred_element_type``) and adds its bias in float32
before the result is cast; norm statistics, RoPE and the softmax are float32.

Rotary embedding: a head of width d rotates in adjacent pairs ``(x[2i], x[2i+1])``
as complex numbers, pair i by angle ``a_i``. In 1D, ``a_i = pos * theta^(-2i / d)``;
in 2D (a grid cell at row r, column c) the first d/4 pairs rotate by the row and
the last d/4 by the column, each with the 1D frequencies of width d/2.

B batch, S positions of one call, N positions of a sequence (the KV cache's
length), D width, K heads, d head width (D / K), F MLP hidden width, Z REPA width,
P projector width.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ifsq_jax.parallel import BATCH, EMBED, HEADS, KV, LAYERS, MLP, NORM, VOCAB, constrain

ATTENTION_IMPLS = {"xla": "xla", "cudnn": "cudnn"}  # field value -> jax.nn.dot_product_attention(implementation=)
# "full" saves nothing inside a block; "dots" saves matmul outputs; the others are jax.checkpoint_policies names.
REMAT_POLICIES = ("none", "full", "dots", "dots_with_no_batch_dims_saveable", "nothing_saveable",
                  "everything_saveable", "dots_saveable")
NORMS = ("rmsnorm", "layernorm")
ROPE_THETA = 10000.0

Initializer = Callable[..., jax.Array]


# ------------------------------------------------------------------ initialisers

def xavier_uniform(n_in: int = 1) -> Initializer:
  """PyTorch's ``xavier_uniform_`` on the (prod(in), prod(out)) view of a kernel with ``n_in`` input axes."""

  def init(key, shape, dtype=jnp.float32):
    fan_in, fan_out = math.prod(shape[:n_in]), math.prod(shape[n_in:])
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def remat_policy(name: str) -> Any:
  """The ``nn.remat`` policy of a REMAT_POLICIES entry other than "none" (None for "full": save nothing)."""
  if name == "full":
    return None
  if name == "dots":
    return jax.checkpoint_policies.dots_saveable
  return getattr(jax.checkpoint_policies, name)


# ------------------------------------------------------------------ the generators' shared fields

class Generator(nn.Module):
  """The fields and checks of a class-conditional transformer generator; DiT and LlamaGen add their own.

  Attributes:
    hidden_size: Width D.
    depth: Blocks of the trunk.
    num_heads: Attention heads K.
    num_classes: Labels 0..num_classes-1; ``num_classes`` itself is the null class.
    class_dropout_prob: Probability of replacing a label by the null class with ``train=True``.
    encoder_depth: The REPA projector reads the stream after this block (from 1; 0 = the embedded input).
    projector_dim: REPA projector hidden width P.
    z_dim: REPA target width Z; 0 = no projector.
    dtype: Compute dtype (bfloat16 on accelerators); params are float32.
    attention_impl: "xla" or "cudnn" (cuDNN flash attention: GPU, bfloat16 or float16 compute).
    remat_policy: One of REMAT_POLICIES: "none", "full" (recompute each block), "dots" (save matmul outputs), ...
    scan_layers: Blocks under ``nn.scan`` with params stacked on a leading layer axis.
  """

  hidden_size: int = 1024
  depth: int = 24
  num_heads: int = 16
  num_classes: int = 1000
  class_dropout_prob: float = 0.1
  encoder_depth: int = 8
  projector_dim: int = 2048
  z_dim: int = 768
  dtype: Any = jnp.float32
  attention_impl: str = "xla"
  remat_policy: str = "none"
  scan_layers: bool = True

  def _check_shared(self, probs: Sequence[str] = ()) -> None:
    """Raises ValueError naming the first invalid shared field, or field of ``probs`` (rates in [0, 1))."""
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f"attention_impl={self.attention_impl!r} is not valid; use one of {tuple(ATTENTION_IMPLS)}.")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"remat_policy={self.remat_policy!r} is not valid; use one of {REMAT_POLICIES}.")
    if self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}.")
    if self.z_dim < 0 or (self.z_dim and not 0 <= self.encoder_depth <= self.depth):
      raise ValueError(f"encoder_depth={self.encoder_depth} must be in [0, depth={self.depth}] and z_dim={self.z_dim}"
                       " >= 0 (0: no REPA projector).")
    for name in ("class_dropout_prob", *probs):
      if not 0 <= getattr(self, name) < 1:
        raise ValueError(f"{name}={getattr(self, name)} must be in [0, 1).")

  def _wants_repa(self, return_repa: bool) -> bool:
    """Whether this forward pass taps the stream for the REPA projector: when asked, and at init (its params).

    Raises:
      ValueError: ``return_repa`` without a projector (``z_dim = 0``).
    """
    if return_repa and not self.z_dim:
      raise ValueError(f"return_repa=True needs a REPA projector; this {type(self).__name__} has z_dim=0.")
    return bool(self.z_dim) and (return_repa or self.is_initializing())


def sized_config(module_class: type[Generator], sizes: Mapping[str, tuple[int, int, int]], size: str,
                 **overrides: Any) -> dict[str, Any]:
  """Keyword arguments for ``module_class(...)``: every field at its default, then ``sizes[size]``, then overrides.

  The dict holds every field but ``dtype``, so that a config built from it can
  override any field.

  Args:
    module_class: A :class:`Generator` subclass.
    sizes: Name -> (depth, width, heads).
    size: A key of ``sizes``.
    **overrides: Field values.
  """
  if size not in sizes:
    raise ValueError(f"size={size!r} is not valid; use one of {list(sizes)}.")
  fields = [f for f in dataclasses.fields(module_class) if f.name not in ("parent", "name")]
  names = sorted(f.name for f in fields)
  unknown = sorted(set(overrides) - set(names))
  if unknown:
    raise ValueError(f"{module_class.__name__} has no fields {unknown}; its fields are {names}.")
  depth, width, heads = sizes[size]
  defaults = {f.name: f.default for f in fields if f.name != "dtype"}
  return {**defaults, "depth": depth, "hidden_size": width, "num_heads": heads, **overrides}


def num_params(params: Any) -> int:
  """Number of parameters of a param tree (boxed or plain leaves)."""
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(nn.meta.unbox(params)))


# ------------------------------------------------------------------ RoPE

def rope_angles(positions: np.ndarray, dim: int, theta: float = ROPE_THETA) -> np.ndarray:
  """1D RoPE angles (P, dim/2) float32: pair i of a width-``dim`` vector at ``p`` turns by ``p theta^(-2i / dim)``.

  Computed in float32, as the reference models compute their tables.

  Args:
    positions: (P,) positions (float32; fractional ones are allowed).
    dim: The rotated width (even).
    theta: The frequency base.
  """
  if dim % 2:
    raise ValueError(f"RoPE rotates pairs: width {dim} must be even.")
  freqs = (1.0 / (np.float32(theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))))
  return np.outer(np.asarray(positions, np.float32), freqs.astype(np.float32)).astype(np.float32)


def rope_angles_2d(grid: int, head_dim: int, theta: float = ROPE_THETA,
                   coords: np.ndarray | None = None) -> np.ndarray:
  """2D RoPE angles (grid * grid, d/2) float32 of the cells in raster order: ``[row angles | column angles]``.

  Args:
    grid: Side of the token grid.
    head_dim: d, a multiple of 4.
    theta: The frequency base.
    coords: (grid,) coordinate of each row (and column); default 0 .. grid - 1.
  """
  if head_dim % 4:
    raise ValueError(f"head width {head_dim}: 2D RoPE needs a multiple of 4 (hidden_size / num_heads).")
  axis = rope_angles(np.arange(grid, dtype=np.float32) if coords is None else coords, head_dim // 2, theta)
  quarter = head_dim // 4
  cells = np.concatenate([np.broadcast_to(axis[:, None], (grid, grid, quarter)),
                          np.broadcast_to(axis[None, :], (grid, grid, quarter))], axis=-1)
  return cells.reshape(grid * grid, 2 * quarter)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x (B, S, K, d) rotated in adjacent pairs by angles with cos and sin (S, d/2); float32 out."""
  pairs = x.astype(jnp.float32).reshape(x.shape[:-1] + (-1, 2))  # (B, S, K, d/2, 2)
  cos, sin = cos[None, :, None], sin[None, :, None]
  x0, x1 = pairs[..., 0], pairs[..., 1]
  return jnp.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], axis=-1).reshape(x.shape)


# ------------------------------------------------------------------ layers

class Dense(nn.Module):
  """``x @ kernel (+ bias)`` over the last ``n_in`` axes of x; kernel (*in, *features).

  The products accumulate in float32 and the bias is added in float32 whatever
  the compute dtype; the sum is then cast to ``out_dtype``.

  Attributes:
    features: Output shape.
    axes: Logical names of the kernel's axes (inputs then outputs); the bias takes the output names.
    n_in: Input axes contracted.
    use_bias: Add a (zero-initialised) bias.
    kernel_init: Defaults to xavier-uniform on the (prod(in), prod(out)) view.
    zero_init: Zero kernel (and bias): adaLN-Zero, output heads.
    dtype: Compute dtype of the operands.
    out_dtype: Result dtype (default ``dtype``).
  """

  features: Sequence[int]
  axes: Sequence[str | None]
  n_in: int = 1
  use_bias: bool = True
  kernel_init: Initializer | None = None
  zero_init: bool = False
  dtype: Any = jnp.float32
  out_dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x (..., *in) -> (..., *features)."""
    features = tuple(self.features)
    init = nn.initializers.zeros_init() if self.zero_init else self.kernel_init or xavier_uniform(self.n_in)
    kernel = self.param("kernel", nn.with_logical_partitioning(init, tuple(self.axes)),
                        tuple(x.shape[-self.n_in:]) + features)
    contract = (tuple(range(x.ndim - self.n_in, x.ndim)), tuple(range(self.n_in)))
    y = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype), (contract, ((), ())),
                            preferred_element_type=jnp.float32)
    if self.use_bias:
      y = y + self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                              tuple(self.axes[self.n_in:])), features)
    return y.astype(self.out_dtype or self.dtype)


def norm(kind: str, dtype: Any, name: str, *, eps: float, affine: bool = True) -> nn.Module:
  """A norm with float32 statistics and logically named params.

  Args:
    kind: "rmsnorm" (always a learnable scale) or "layernorm" (scale and bias when ``affine``).
    dtype: Output dtype.
    name: Module name.
    eps: Added to the variance.
    affine: LayerNorm only: learnable scale and bias.
  """
  if kind not in NORMS:
    raise ValueError(f"norm kind {kind!r} is not valid; use one of {NORMS}.")
  ones = nn.with_logical_partitioning(nn.initializers.ones_init(), (NORM,))
  if kind == "rmsnorm":
    return nn.RMSNorm(epsilon=eps, dtype=dtype, scale_init=ones, name=name)
  zeros = nn.with_logical_partitioning(nn.initializers.zeros_init(), (NORM,))
  return nn.LayerNorm(epsilon=eps, dtype=dtype, use_scale=affine, use_bias=affine, scale_init=ones, bias_init=zeros,
                      name=name)


class LabelEmbedder(nn.Module):
  """Label table with ``num_classes + 1`` rows (the last one the null class of guidance) and label dropout."""

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
  """Multi-head self-attention: QK-norm, rotary embedding, causal mask and a KV cache, each optional.

  The cache (``cache_len > 0``) lives in the "cache" collection as ``key`` and
  ``value`` (B, K, N, d) in the compute dtype, preallocated for the whole sequence
  so that decoding keeps static shapes.

  Attributes:
    num_heads: K.
    qk_norm: None, or a NORMS entry applied over the head width of q and k (before
      RoPE, float32 out), its scale shared by the heads.
    qk_norm_eps: Its epsilon.
    causal: Position s attends to positions <= s (teacher forcing).
    cache_len: Positions the KV cache holds (N); 0: no cache.
    use_bias: Biases on the input and output projections.
    kernel_init: Of both projections (default xavier-uniform).
    names: Names of the (D, 3, K, d) input and (K, d, D) output projections.
    attention_impl: An ATTENTION_IMPLS key, for ``jax.nn.dot_product_attention``.
    dtype: Compute dtype (also the cache's).
  """

  num_heads: int
  qk_norm: str | None = None
  qk_norm_eps: float = 1e-6
  causal: bool = False
  cache_len: int = 0
  use_bias: bool = False
  kernel_init: Initializer | None = None
  names: tuple[str, str] = ("qkv", "proj")
  attention_impl: str = "xla"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, rope: tuple[jax.Array, jax.Array] | None = None,
               position: jax.Array | None = None) -> jax.Array:
    """Attention over x, or over x and the cache.

    Args:
      x: (B, S, D).
      rope: (cos, sin) each (S, d/2) of the positions of x, or None (no rotation).
      position: None: attention within x; else the int32 scalar position where x
        enters the cache, each query attending to the cache up to its own position.

    Returns:
      (B, S, D) in the compute dtype.
    """
    heads, head_dim = self.num_heads, x.shape[-1] // self.num_heads
    dense = lambda features, axes, n_in, name: Dense(features, axes, n_in, self.use_bias, self.kernel_init,
                                                     dtype=self.dtype, name=name)
    qkv = dense((3, heads, head_dim), (EMBED, None, HEADS, KV), 1, self.names[0])(x)  # (B, S, 3, K, d)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    if self.qk_norm is not None:
      # float32 out: RoPE then rotates in float32, as under the reference's autocast.
      q = norm(self.qk_norm, jnp.float32, "q_norm", eps=self.qk_norm_eps)(q)
      k = norm(self.qk_norm, jnp.float32, "k_norm", eps=self.qk_norm_eps)(k)
    if rope is not None:
      q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    q, k, v = (constrain(a.astype(self.dtype), (BATCH, None, HEADS, KV)) for a in (q, k, v))
    if position is None:
      out = jax.nn.dot_product_attention(q, k, v, is_causal=self.causal,
                                         implementation=ATTENTION_IMPLS[self.attention_impl])
    else:
      out = self._cached(q, k, v, position)
    return dense((x.shape[-1],), (HEADS, KV, EMBED), 2, self.names[1])(out)

  def _cached(self, q: jax.Array, k: jax.Array, v: jax.Array, position: jax.Array) -> jax.Array:
    """Writes k, v (B, S, K, d) at [position, position + S) and attends over the cache up to each query."""
    if not self.cache_len:
      raise ValueError("attention with a position needs a KV cache; this Attention has cache_len=0.")
    # Heads before positions, (B, K, N, d): the two attention products read the cache as stored. In the
    # (B, N, K, d) layout of teacher forcing, every step would transpose (copy) the whole cache of every layer.
    shape = (k.shape[0], k.shape[2], self.cache_len, k.shape[3])
    keys = self.variable("cache", "key", jnp.zeros, shape, self.dtype)
    values = self.variable("cache", "value", jnp.zeros, shape, self.dtype)
    if keys.value.shape != shape:
      raise ValueError(f"the KV cache holds {keys.value.shape[0]} sequences, not {shape[0]}; start with prefill "
                       "without a cache to allocate one of this batch size.")
    start = (0, 0, position, 0)
    write = lambda cache, x: constrain(jax.lax.dynamic_update_slice(cache, x.transpose(0, 2, 1, 3), start),
                                       (BATCH, HEADS, None, KV))
    keys.value, values.value = write(keys.value, k), write(values.value, v)
    # (S, N): query s (at position + s) sees every written position up to its own; the rest is stale or empty.
    mask = jnp.arange(self.cache_len)[None, :] <= position + jnp.arange(q.shape[1])[:, None]
    scores = jnp.einsum("bskd,bknd->bksn", q, keys.value, preferred_element_type=jnp.float32)
    scores = scores * (q.shape[-1] ** -0.5)
    weights = jax.nn.softmax(jnp.where(mask[None, None], scores, -jnp.inf), axis=-1)
    out = jnp.einsum("bksn,bknd->bskd", weights.astype(self.dtype), values.value, preferred_element_type=jnp.float32)
    return out.astype(self.dtype)


class CacheIndex(nn.Module):
  """The next position of the KV cache to write: a scalar ``index`` in the "cache" collection."""

  @nn.compact
  def __call__(self, start: bool, length: int) -> jax.Array:
    """The position (int32 scalar) ``length`` new entries start at (0 with ``start``); advances the index past them."""
    index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
    position = jnp.zeros((), jnp.int32) if start else index.value
    index.value = position + length
    return position


class SwiGLU(nn.Module):
  """SwiGLU MLP ``out(silu(gate x) * up x)``.

  Attributes:
    hidden: F.
    names: Two names: one fused (D, 2, F) input projection whose output is
      ``[gate | up]``, and the output; or three: gate, up and output projections.
    use_bias: Biases on every projection.
    kernel_init: Of every projection (default xavier-uniform).
    dtype: Compute dtype.
  """

  hidden: int
  names: tuple[str, ...] = ("w12", "w3")
  use_bias: bool = True
  kernel_init: Initializer | None = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x (B, S, D) -> (B, S, D) in the compute dtype."""
    if len(self.names) not in (2, 3):
      raise ValueError(f"SwiGLU names={self.names}: give (fused input, output) or (gate, up, output).")
    dense = lambda features, axes, name: Dense(features, axes, use_bias=self.use_bias, kernel_init=self.kernel_init,
                                               dtype=self.dtype, name=name)
    if len(self.names) == 2:
      h = dense((2, self.hidden), (EMBED, None, MLP), self.names[0])(x)  # (B, S, 2, F)
      gate, up = h[..., 0, :], h[..., 1, :]
    else:
      gate = dense((self.hidden,), (EMBED, MLP), self.names[0])(x)
      up = dense((self.hidden,), (EMBED, MLP), self.names[1])(x)
    h = constrain(nn.silu(gate) * up, (BATCH, None, MLP))
    return dense((x.shape[-1],), (MLP, EMBED), self.names[-1])(h)


class Projector(nn.Module):
  """REPA projector: (B, N, D) -> (B, N, Z), D -> P -> P -> Z with SiLU between and biases."""

  projector_dim: int
  z_dim: int
  kernel_init: Initializer | None = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dense = lambda n, axes, name: Dense((n,), axes, kernel_init=self.kernel_init, dtype=self.dtype, name=name)
    h = nn.silu(dense(self.projector_dim, (EMBED, MLP), "linear_0")(x))
    h = nn.silu(dense(self.projector_dim, (MLP, EMBED), "linear_1")(h))
    return dense(self.z_dim, (EMBED, MLP), "linear_2")(h)


# ------------------------------------------------------------------ the block stack

def block_stack(block: type[nn.Module], depth: int, *, scan_layers: bool, remat: str = "none",
                static_argnums: tuple[int, ...] = (), **fields: Any) -> nn.Module | list[nn.Module]:
  """The blocks of a stack, to build in ``setup`` and run with :func:`run_stack`.

  Args:
    block: The block class; called as ``block(x, *args)`` and returning the new x.
    depth: Number of blocks.
    scan_layers: One block to run under ``nn.scan`` (its params stacked on a leading
      layer axis, named LAYERS), else a list of ``depth`` blocks (``name_0``, ...).
    remat: A REMAT_POLICIES entry; other than "none", each block is wrapped in ``nn.remat``.
    static_argnums: Arguments of ``block.__call__`` (self is 0) that are Python values, for ``nn.remat``.
    **fields: The block's fields.
  """
  if remat not in REMAT_POLICIES:
    raise ValueError(f"remat_policy={remat!r} is not valid; use one of {REMAT_POLICIES}.")
  if remat != "none":
    # Outside scan, prevent_cse keeps XLA from merging the recomputation with the forward pass.
    block = nn.remat(block, policy=remat_policy(remat), prevent_cse=not scan_layers, static_argnums=static_argnums)
  return block(**fields) if scan_layers else [block(**fields) for _ in range(depth)]


def _is_static(arg: Any) -> bool:
  return arg is None or isinstance(arg, (bool, int, float, str))


def run_stack(blocks: nn.Module | Sequence[nn.Module], depth: int, x: jax.Array, *args: Any,
              tap_layer: int | None = None) -> tuple[jax.Array, jax.Array | None]:
  """Runs the blocks of :func:`block_stack` on x, returning the output and the REPA tap.

  Under scan the tap rides in the carry (a select per layer): a single stacked
  tree of params whatever ``tap_layer`` is, and the select needs only the layer
  index in the backward pass, so the tap adds no saved activations.

  Args:
    blocks: One block (scanned) or a list of blocks.
    depth: Number of blocks (the scan's length).
    x: The stream, e.g. (B, S, D) float32.
    *args: Passed to every block after x: arrays (and pytrees of them) are
      broadcast over the scan; Python values and None reach the blocks as they are.
    tap_layer: None: no tap; else the tap is x after block ``tap_layer`` (counted from 1; 0 is the input).

  Returns:
    (x after the last block, the tap or None).
  """
  tap = None if tap_layer is None else x
  if not isinstance(blocks, nn.Module):
    for i, block in enumerate(blocks):
      x = block(x, *args)
      if tap is not None and i + 1 == tap_layer:
        tap = x
    return x, tap

  dynamic = [i for i, a in enumerate(args) if not _is_static(a)]

  def body(block, carry, layer, *dynamic_args):
    full = list(args)
    for i, a in zip(dynamic, dynamic_args):
      full[i] = a
    x, tap = carry
    x = block(x, *full)
    if tap is not None:
      tap = jnp.where(layer + 1 == tap_layer, x, tap)
    return (x, tap), None

  scan = nn.scan(body, variable_axes={"params": 0, "cache": 0, "intermediates": 0},
                 split_rngs={"params": True, "dropout": True}, in_axes=(0,) + (nn.broadcast,) * len(dynamic),
                 length=depth, metadata_params={nn.PARTITION_NAME: LAYERS})
  (x, tap), _ = scan(blocks, (x, tap), jnp.arange(depth), *(args[i] for i in dynamic))
  return x, tap

"""Finite scalar quantization: FSQ (Mentzer et al., 2023) and iFSQ (arXiv 2601.17124).

Each channel c of a latent is bounded to a range of L_c levels, rounded to the
nearest integer level with a straight-through gradient, and divided by L_c // 2,
so codes lie in [-1, 1]. The implicit codebook is the product of the per-channel
grids and is never built: indices are mixed-radix numbers of the channel digits.

Two bounds:

* ``bound="tanh"``, the original FSQ bound:
  ``tanh(z + shift) * half_l - offset`` with ``half_l = (L - 1)(1 + eps) / 2``,
  ``offset = 0.5`` for even L (0 for odd L) and ``shift = atanh(offset / half_l)``.
* ``bound="ifsq"``, the iFSQ bound: ``act(z) * (L - 1) / 2`` with
  ``act(z) = 2 * sigmoid(alpha * z) - 1`` and ``alpha = 1.6``; ``alpha = 2`` is tanh
  exactly. For odd L this is the reference's ``simple_bound`` bit for bit.

Even L with the iFSQ bound (the reference asserts odd L): we subtract the same
half-step offset as the FSQ bound, ``act(z) * (L - 1) / 2 - 0.5``, so the levels are
``-L/2 .. L/2 - 1``, but without the ``atanh`` shift. The shift would centre z = 0 in
a bin and move probability mass to one side; without it the bin edges are
symmetric about z = 0 and a zero-mean latent fills the L bins symmetrically, which
is the point of iFSQ. (z = 0 itself sits on a rounding tie and rounds to level 0.)

Dimension letters: ``...`` any leading shape, d = len(levels) channels of one
codebook, C = num_codebooks, G = number of index groups, L levels of a channel.
Channels are always last.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Union

import jax
import jax.numpy as jnp
import numpy as np

from ifsq_jax.quantizers import stats

Activation = Union[str, Callable[[jax.Array], jax.Array]]

BOUNDS = ("ifsq", "tanh")
TANH_EPS = 1e-3
IFSQ_ALPHA = 1.6
# Above this many codes per group (times d), float32 index arithmetic is not exact.
_FLOAT_INDEX_LIMIT = 2**22


@jax.custom_vjp
def round_ste(x: jax.Array) -> jax.Array:
  """Rounds half to even; the gradient passes straight through (identity)."""
  return jnp.round(x)


def _round_ste_fwd(x):
  return jnp.round(x), None


def _round_ste_bwd(_, g):
  return (g,)


round_ste.defvjp(_round_ste_fwd, _round_ste_bwd)


def scaled_sigmoid(z: jax.Array, alpha: float = IFSQ_ALPHA) -> jax.Array:
  """The iFSQ activation ``2 * sigmoid(alpha * z) - 1``, in (-1, 1)."""
  return 2.0 * jax.nn.sigmoid(alpha * z) - 1.0


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    # Names of the reference code (`act_fun_mapping`).
    "scale_sigmoid_16": functools.partial(scaled_sigmoid, alpha=1.6),
    "scale_sigmoid_20": functools.partial(scaled_sigmoid, alpha=2.0),
    "tanh": jnp.tanh,
}


def _is_power_of_two(n: int) -> bool:
  return n > 0 and n & (n - 1) == 0


@dataclasses.dataclass(frozen=True)
class FSQ:
  """A finite scalar quantizer: a hashable value object of pure functions.

  It has no parameters and works without Flax, under ``jax.jit`` (as a closure or
  a static argument; it is also a leaf-less pytree), ``vmap`` and ``grad``.

  Attributes:
    levels: Level count per channel, each >= 2, e.g. ``(17, 17, 17, 17)``.
    bound: ``"ifsq"`` (the iFSQ bound, ``act(z) * (L - 1) / 2``) or ``"tanh"``
      (the original FSQ bound with ``eps`` and the ``atanh`` shift).
    alpha: Slope of the iFSQ activation ``2 * sigmoid(alpha * z) - 1``.
    activation: Optional override of the iFSQ activation: a name from
      ``ACTIVATIONS`` (``"scale_sigmoid_16"``, ``"scale_sigmoid_20"``, ``"tanh"``)
      or a callable mapping reals monotonically into (-1, 1). Ignored by the
      ``"tanh"`` bound.
    group_sizes: Optional split of the d channels into consecutive groups, each
      with its own index (factorized indices, the reference's
      ``factorized_bits``), e.g. ``(2, 2)``.
    num_codebooks: C codebooks side by side; the feature width is ``C * d``.
    eps: The FSQ bound's ``eps`` (the ``"tanh"`` bound only).
  """

  levels: tuple[int, ...]
  bound: str = "ifsq"
  alpha: float = IFSQ_ALPHA
  activation: Activation | None = None
  group_sizes: tuple[int, ...] | None = None
  num_codebooks: int = 1
  eps: float = TANH_EPS

  def __post_init__(self):
    levels = tuple(self.levels)
    object.__setattr__(self, "levels", levels)
    if not levels:
      raise ValueError("levels is empty; give at least one level count, e.g. (17, 17, 17, 17).")
    for level in levels:
      if isinstance(level, bool) or int(level) != level or level < 2:
        raise ValueError(f"levels={levels}: every level count must be an integer >= 2, got {level!r}.")
    object.__setattr__(self, "levels", tuple(int(level) for level in levels))
    if self.bound not in BOUNDS:
      raise ValueError(f"bound={self.bound!r} is not valid; use one of {BOUNDS}.")
    if isinstance(self.activation, str) and self.activation not in ACTIVATIONS:
      raise ValueError(
          f"activation={self.activation!r} is not valid; use one of {tuple(ACTIVATIONS)} or a callable.")
    if self.activation is not None and not isinstance(self.activation, str) and not callable(self.activation):
      raise ValueError(f"activation={self.activation!r} is neither a name nor a callable.")
    if not (isinstance(self.alpha, (int, float)) and self.alpha > 0):
      raise ValueError(f"alpha={self.alpha!r} must be a positive number.")
    if isinstance(self.num_codebooks, bool) or int(self.num_codebooks) != self.num_codebooks or self.num_codebooks < 1:
      raise ValueError(f"num_codebooks={self.num_codebooks!r} must be an integer >= 1.")
    if self.group_sizes is not None:
      sizes = tuple(self.group_sizes)
      object.__setattr__(self, "group_sizes", sizes)
      if any(int(s) != s or s < 1 for s in sizes) or sum(sizes) != len(levels):
        raise ValueError(
            f"group_sizes={sizes} must be positive integers that sum to len(levels)={len(levels)}.")

  # ----------------------------------------------------------------- shapes

  @property
  def codebook_dim(self) -> int:
    """d: channels of one codebook."""
    return len(self.levels)

  @property
  def dim(self) -> int:
    """Feature width of the latent: ``num_codebooks * d``."""
    return self.num_codebooks * self.codebook_dim

  @property
  def codebook_size(self) -> int:
    """Number of codes of one codebook, ``prod(levels)`` (a Python int, never an array)."""
    return math.prod(self.levels)

  @property
  def groups(self) -> tuple[int, ...]:
    """Channels per index group; one group of d channels by default."""
    return self.group_sizes if self.group_sizes is not None else (self.codebook_dim,)

  @property
  def num_groups(self) -> int:
    return len(self.groups)

  @property
  def group_levels(self) -> tuple[tuple[int, ...], ...]:
    starts = np.cumsum((0,) + self.groups)
    return tuple(self.levels[s:s + n] for s, n in zip(starts, self.groups))

  @property
  def group_codebook_sizes(self) -> tuple[int, ...]:
    return tuple(math.prod(g) for g in self.group_levels)

  @property
  def index_shape(self) -> tuple[int, ...]:
    """Trailing shape of indices: () or (G,), with (C,) in front when C > 1."""
    return ((self.num_codebooks,) if self.num_codebooks > 1 else ()) + (
        (self.num_groups,) if self.num_groups > 1 else ())

  def index_dtype(self, codebook_size: int | None = None) -> jnp.dtype:
    """int32 when every index fits, else int64 if 64-bit mode is on, else a ValueError."""
    size = max(self.group_codebook_sizes) if codebook_size is None else codebook_size
    if size - 1 <= np.iinfo(np.int32).max:
      return jnp.dtype(jnp.int32)
    if jax.dtypes.canonicalize_dtype(jnp.int64) == jnp.int64:  # 64-bit mode is on
      return jnp.dtype(jnp.int64)
    raise ValueError(
        f"A codebook of {size} codes (levels={self.levels}, group_sizes={self.group_sizes}) "
        "has indices beyond int32. Split it into groups (group_sizes=...) or enable 64-bit "
        "mode (jax.config.update('jax_enable_x64', True)).")

  # --------------------------------------------------------- per-channel constants

  @functools.cached_property
  def _channel_consts(self) -> dict[str, np.ndarray]:
    """float32 constants per channel, computed the way the reference computes them."""
    lv = np.asarray(self.levels, np.float32)
    offset = np.where(np.asarray(self.levels) % 2 == 0, np.float32(0.5), np.float32(0.0)).astype(np.float32)
    if self.bound == "tanh":
      half_l = (lv - np.float32(1)) * np.float32(1 + self.eps) / np.float32(2)
      shift = np.arctanh(offset / half_l).astype(np.float32)
    else:
      half_l = (lv - np.float32(1)) / np.float32(2)
      shift = np.zeros_like(lv)
    half_width = np.asarray([l // 2 for l in self.levels], np.float32)
    return dict(half_l=half_l.astype(np.float32), offset=offset, shift=shift, half_width=half_width)

  @property
  def _activation(self) -> Callable[[jax.Array], jax.Array]:
    if self.activation is None:
      return functools.partial(scaled_sigmoid, alpha=self.alpha)
    if isinstance(self.activation, str):
      return ACTIVATIONS[self.activation]
    return self.activation

  @functools.cached_property
  def _exact_by_multiply(self) -> bool:
    # XLA rewrites x / const as x * (1 / const); that is exact only for powers of two.
    return all(_is_power_of_two(l // 2) for l in self.levels)

  # --------------------------------------------------------------- quantize

  def _check_width(self, z: jax.Array, what: str = "z") -> None:
    if z.ndim == 0 or z.shape[-1] != self.dim:
      raise ValueError(
          f"{what} has shape {tuple(z.shape)}; its last axis must be the feature width "
          f"num_codebooks * len(levels) = {self.dim}.")

  def _per_channel(self, name: str) -> np.ndarray:
    """A constant tiled over the codebooks: (C * d,)."""
    return np.tile(self._channel_consts[name], self.num_codebooks)

  def bounded(self, z: jax.Array) -> jax.Array:
    """The pre-rounding value in level units (the reference's ``bound`` / ``simple_bound``).

    Args:
      z: (..., C*d) latent, any float dtype.

    Returns:
      (..., C*d) float32.
    """
    self._check_width(z)
    z = jnp.asarray(z).astype(jnp.float32)
    half_l, offset = self._per_channel("half_l"), self._per_channel("offset")
    if self.bound == "tanh":
      return jnp.tanh(z + self._per_channel("shift")) * half_l - offset
    return self._activation(z) * half_l - offset

  def _normalize(self, q: jax.Array) -> jax.Array:
    """Integer levels (float32) -> codes in [-1, 1], exactly ``q / (L // 2)``."""
    half_width = self._per_channel("half_width")
    if self._exact_by_multiply:
      return q * (1.0 / half_width)
    # Correctly rounded q / half_width from a table; the gradient is 1 / half_width.
    max_l = max(self.levels)
    table = np.zeros((self.dim, max_l), np.float32)
    for c, level in enumerate(self.levels * self.num_codebooks):
      h = np.float32(level // 2)
      table[c, :level] = (np.arange(level, dtype=np.float32) - h) / h
    digit = jax.lax.stop_gradient(q + half_width).astype(jnp.int32)
    flat = digit + np.arange(self.dim, dtype=np.int32) * max_l
    exact = jnp.take(table.reshape(-1), flat, mode="clip")
    return exact + (q - jax.lax.stop_gradient(q)) * (1.0 / half_width)

  def quantize(self, z: jax.Array) -> jax.Array:
    """Bounds, rounds (straight-through) and normalizes a latent.

    The arithmetic runs in float32 whatever the input dtype (bf16 rounding would
    move codes); the codes come back in the input dtype.

    Args:
      z: (..., C*d) float latent.

    Returns:
      (..., C*d) codes in [-1, 1]; channel c takes values k / (L_c // 2).
    """
    z = jnp.asarray(z)
    dtype = z.dtype if jnp.issubdtype(z.dtype, jnp.floating) else jnp.float32
    q = round_ste(self.bounded(z))
    return self._normalize(q).astype(dtype)

  # ------------------------------------------------------------ codes <-> indices

  def codes_to_digits(self, codes: jax.Array) -> jax.Array:
    """(..., C*d) codes -> (..., C*d) int32 digits in [0, L_c) (rounded, not truncated)."""
    self._check_width(codes, "codes")
    half_width = self._per_channel("half_width")
    codes = jax.lax.stop_gradient(jnp.asarray(codes)).astype(jnp.float32)
    return jnp.round(codes * half_width + half_width).astype(jnp.int32)

  def _group_matrix(self, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mixed-radix weights as a (d, G) block matrix, channel 0 least significant."""
    w = np.zeros((self.codebook_dim, self.num_groups), np.float64)
    start = 0
    for g, levels in enumerate(self.group_levels):
      basis = np.cumprod((1,) + levels[:-1], dtype=np.float64)
      w[start:start + len(levels), g] = basis
      start += len(levels)
    return w * scale[:, None], w

  def codes_to_indices(self, codes: jax.Array) -> jax.Array:
    """Codes -> indices, without building the codebook.

    Args:
      codes: (..., C*d) codes as returned by :meth:`quantize`.

    Returns:
      int indices of shape ``(...) + index_shape``: (...,), (..., G) with groups,
      (..., C) or (..., C, G) with several codebooks. int32 when the (group)
      codebook fits, int64 in 64-bit mode, a ValueError otherwise.
    """
    self._check_width(codes, "codes")
    dtype = self.index_dtype()
    lead = codes.shape[:-1]
    codes = jax.lax.stop_gradient(jnp.asarray(codes)).astype(jnp.float32)
    codes = codes.reshape(lead + (self.num_codebooks, self.codebook_dim))
    half_width = self._channel_consts["half_width"]
    if max(self.group_codebook_sizes) * self.codebook_dim <= _FLOAT_INDEX_LIMIT:
      # One small matmul: exact in float32 at these sizes, and on CPU much faster than a
      # reduction over a minor axis of 4 fused with the quantizer.
      w, basis = self._group_matrix(half_width.astype(np.float64))
      offset = (half_width.astype(np.float64)[:, None] * basis).sum(0)
      idx = jnp.round(jnp.matmul(codes, w.astype(np.float32), precision=jax.lax.Precision.HIGHEST)
                      + offset.astype(np.float32))
      idx = idx.astype(dtype)
    else:
      digits = jnp.round(codes * half_width + half_width).astype(dtype)
      _, basis = self._group_matrix(np.ones(self.codebook_dim))
      idx = jnp.stack(
          [jnp.sum(digits * basis[:, g].astype(dtype), axis=-1) for g in range(self.num_groups)],
          axis=-1)
    return idx.reshape(lead + self.index_shape)

  def _check_indices(self, indices: jax.Array) -> jax.Array:
    indices = jnp.asarray(indices)
    if not jnp.issubdtype(indices.dtype, jnp.integer):
      raise ValueError(f"indices must be integers, got dtype {indices.dtype}.")
    n = len(self.index_shape)
    if indices.shape[indices.ndim - n:] != self.index_shape or indices.ndim < n:
      raise ValueError(
          f"indices have shape {tuple(indices.shape)}; the trailing shape must be {self.index_shape} "
          f"(num_codebooks={self.num_codebooks}, groups={self.groups}).")
    if not isinstance(indices, jax.core.Tracer) and indices.size:
      sizes = np.asarray(self.group_codebook_sizes)
      ix = np.asarray(indices).reshape(-1, self.num_groups)
      bad = (ix < 0) | (ix >= sizes)
      if bad.any():
        row, g = np.argwhere(bad)[0]
        raise ValueError(
            f"index {int(ix[row, g])} is out of range for group {g}: valid indices are "
            f"0 .. {int(sizes[g]) - 1} (levels={self.group_levels[g]}).")
    return indices

  def indices_to_digits(self, indices: jax.Array) -> jax.Array:
    """Indices ``(...) + index_shape`` -> (..., C*d) int32 digits."""
    indices = self._check_indices(indices)
    lead = indices.shape[:indices.ndim - len(self.index_shape)]
    ix = indices.reshape(lead + (self.num_codebooks, self.num_groups))
    parts = []
    for g, levels in enumerate(self.group_levels):
      basis = np.cumprod((1,) + levels[:-1])
      parts.append((ix[..., g:g + 1] // basis.astype(ix.dtype)) % np.asarray(levels, ix.dtype))
    digits = jnp.concatenate(parts, axis=-1).astype(jnp.int32)
    return digits.reshape(lead + (self.dim,))

  def indices_to_codes(self, indices: jax.Array, dtype: jnp.dtype = jnp.float32) -> jax.Array:
    """Inverse of :meth:`codes_to_indices`: ``(...) + index_shape`` -> (..., C*d) codes.

    Concrete indices are range-checked (a ValueError names the bad one); traced
    indices are not, and out-of-range ones wrap around.
    """
    digits = self.indices_to_digits(indices)
    return self.digits_to_codes(digits).astype(dtype)

  def digits_to_codes(self, digits: jax.Array) -> jax.Array:
    """(..., C*d) integer digits in [0, L_c) -> float32 codes."""
    return self._normalize(digits.astype(jnp.float32) - self._per_channel("half_width"))

  def group_to_global(self, indices: jax.Array) -> jax.Array:
    """Factorized indices (..., G) -> one index per codebook (...,): sum_g idx_g * prod(size_<g)."""
    indices = jnp.asarray(indices)
    if indices.ndim == 0 or indices.shape[-1] != self.num_groups:
      raise ValueError(f"indices have shape {tuple(indices.shape)}; the last axis must be G={self.num_groups}.")
    dtype = self.index_dtype(self.codebook_size)
    strides = np.cumprod((1,) + self.group_codebook_sizes[:-1])
    return jnp.sum(indices.astype(dtype) * strides.astype(dtype), axis=-1)

  def global_to_group(self, indices: jax.Array) -> jax.Array:
    """One index per codebook (...,) -> factorized indices (..., G)."""
    indices = jnp.asarray(indices)
    strides = np.cumprod((1,) + self.group_codebook_sizes[:-1])
    sizes = np.asarray(self.group_codebook_sizes)
    out = (indices[..., None] // strides.astype(indices.dtype)) % sizes.astype(indices.dtype)
    return out.astype(self.index_dtype())

  # -------------------------------------------------------------- statistics

  def codebook_stats(self, codes: jax.Array) -> dict[str, jax.Array]:
    """Usage statistics of a batch of codes; see :func:`ifsq_jax.quantizers.stats.fsq_stats`."""
    return stats.fsq_stats(self, codes)


# A leaf-less pytree, so an FSQ can be passed to jitted functions as an ordinary argument.
jax.tree_util.register_static(FSQ)

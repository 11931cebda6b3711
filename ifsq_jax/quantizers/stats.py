"""Codebook usage statistics that never build the codebook.

Per-channel bin histograms are (channels, max L) counts. Joint usage (distinct
codes, entropy, perplexity) comes from a lexicographic sort of the per-channel
digits, so it works for any codebook size, 17^8 included, in O(N log N) memory N.

Dimension letters: N tokens, D channels, L levels, C codebooks, G groups.
"""

from __future__ import annotations

from typing import Sequence, TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

if TYPE_CHECKING:
  from ifsq_jax.quantizers.fsq import FSQ


def channel_histograms(digits: jax.Array, levels: Sequence[int]) -> jax.Array:
  """Counts of each level per channel.

  Args:
    digits: (..., D) integer digits, channel c in [0, levels[c]).
    levels: D level counts.

  Returns:
    (D, max(levels)) int32 counts; entries k >= levels[c] are zero.
  """
  d, max_l = len(levels), max(levels)
  flat = digits.reshape(-1, d) + np.arange(d, dtype=np.int32) * max_l  # (N, D)
  counts = jnp.zeros((d * max_l,), jnp.int32).at[flat.reshape(-1)].add(1)
  return counts.reshape(d, max_l)


def entropy_bits(counts: jax.Array, axis: int = -1) -> jax.Array:
  """Entropy in bits of the empirical distribution given by counts along ``axis``."""
  counts = counts.astype(jnp.float32)
  total = jnp.sum(counts, axis=axis, keepdims=True)
  p = counts / jnp.maximum(total, 1.0)
  return -jnp.sum(jnp.where(p > 0, p * jnp.log2(jnp.where(p > 0, p, 1.0)), 0.0), axis=axis)


def distinct_codes(keys: Sequence[jax.Array]) -> tuple[jax.Array, jax.Array]:
  """Number of distinct rows and their entropy, from a lexicographic sort.

  Args:
    keys: K integer arrays of shape (N,); row n is the tuple (keys[0][n], ...).

  Returns:
    (number of distinct rows as int32, entropy of the row distribution in bits).
  """
  n = keys[0].shape[0]
  if n == 0:
    return jnp.int32(0), jnp.float32(0.0)
  ordered = jax.lax.sort(tuple(keys), num_keys=len(keys))
  change = jnp.zeros((n - 1,), bool)
  for k in ordered:
    change = change | (k[1:] != k[:-1])
  run = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(change, dtype=jnp.int32)])
  counts = jax.ops.segment_sum(jnp.ones((n,), jnp.int32), run, num_segments=n)
  return run[-1] + 1, entropy_bits(counts)


def fsq_stats(fsq: "FSQ", codes: jax.Array) -> dict[str, jax.Array]:
  """Usage statistics of a batch of FSQ codes.

  Args:
    fsq: The quantizer.
    codes: (..., C*d) codes; all leading positions are pooled.

  Returns:
    A dict of arrays:
      ``channel_histogram`` (C*d, max L) int32 bin counts,
      ``channel_entropy_bits`` (C*d,) entropy of each channel's bins (at most log2 L),
      ``codes_used`` (C,) distinct codes in the batch,
      ``usage`` (C,) codes used over the codebook size,
      ``entropy_bits`` (C,) entropy of the code distribution,
      ``perplexity`` (C,) 2 ** entropy_bits,
      and with groups also ``group_codes_used``, ``group_usage``,
      ``group_entropy_bits``, ``group_perplexity`` of shape (C, G).
  """
  digits = fsq.codes_to_digits(codes).reshape(-1, fsq.dim)  # (N, C*d)
  levels = fsq.levels * fsq.num_codebooks
  hist = channel_histograms(digits, levels)
  out = {"channel_histogram": hist, "channel_entropy_bits": entropy_bits(hist)}
  d = fsq.codebook_dim
  starts = np.cumsum((0,) + fsq.groups)
  used, ent, g_used, g_ent = [], [], [], []
  for c in range(fsq.num_codebooks):
    cols = [digits[:, c * d + j] for j in range(d)]
    u, h = distinct_codes(cols)
    used.append(u)
    ent.append(h)
    if fsq.num_groups > 1:
      per_group = [distinct_codes(cols[s:s + n]) for s, n in zip(starts, fsq.groups)]
      g_used.append(jnp.stack([u for u, _ in per_group]))
      g_ent.append(jnp.stack([h for _, h in per_group]))
  out["codes_used"] = jnp.stack(used)
  out["usage"] = out["codes_used"].astype(jnp.float32) / float(fsq.codebook_size)
  out["entropy_bits"] = jnp.stack(ent)
  out["perplexity"] = 2.0 ** out["entropy_bits"]
  if fsq.num_groups > 1:
    out["group_codes_used"] = jnp.stack(g_used)
    out["group_usage"] = out["group_codes_used"].astype(jnp.float32) / np.asarray(
        fsq.group_codebook_sizes, np.float32)
    out["group_entropy_bits"] = jnp.stack(g_ent)
    out["group_perplexity"] = 2.0 ** out["group_entropy_bits"]
  return out

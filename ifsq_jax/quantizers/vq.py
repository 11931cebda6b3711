"""Vector quantization (VQ-VAE), the baseline the paper compares iFSQ with.

Nearest-neighbour lookup in a learned codebook with a straight-through gradient,
a codebook loss and a commitment loss. Two placements of ``beta``:

* ``beta_on="codebook"`` (default, the reference's ``VectorQuantizer2`` with
  ``legacy=True``, inherited from taming-transformers):
  ``mean((sg[zq] - z)^2) + beta * mean((zq - sg[z])^2)``;
* ``beta_on="commitment"`` (VQ-VAE paper, LlamaGen's VQ-16):
  ``mean((zq - sg[z])^2) + beta * mean((sg[zq] - z)^2)``.

``l2_normalize=True`` normalizes latents and codebook rows before the lookup, as
LlamaGen's VQ. The codebook is initialised U(-1/K, 1/K) as in the reference.

Dimension letters: ``...`` leading shape, N tokens, D code width, K codebook size.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ifsq_jax import parallel
from ifsq_jax.quantizers.bottleneck import BottleneckOutput
from ifsq_jax.quantizers.stats import entropy_bits

BETA_PLACEMENTS = ("codebook", "commitment")


def _l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def nearest_code(z: jax.Array, codebook: jax.Array, chunk: int = 4096) -> jax.Array:
  """Index of the nearest codebook row (squared Euclidean) for every token.

  Distances are formed ``chunk`` tokens at a time, so memory is (chunk, K) and
  not (N, K).

  Args:
    z: (N, D) float32 tokens.
    codebook: (K, D) float32 codebook.
    chunk: Tokens per block.

  Returns:
    (N,) int32 indices.
  """
  z = jax.lax.stop_gradient(z)
  codebook = jax.lax.stop_gradient(codebook)
  e_sq = jnp.sum(jnp.square(codebook), axis=-1)  # (K,)

  def block(zb):  # (n, D) -> (n,)
    dots = jnp.matmul(zb, codebook.T, precision=jax.lax.Precision.HIGHEST)
    d = jnp.sum(jnp.square(zb), axis=-1, keepdims=True) + e_sq - 2.0 * dots
    return jnp.argmin(d, axis=-1).astype(jnp.int32)

  n = z.shape[0]
  if n <= chunk:
    return block(z)
  pad = -n % chunk
  zp = jnp.pad(z, ((0, pad), (0, 0))).reshape(-1, chunk, z.shape[-1])
  return jax.lax.map(block, zp).reshape(-1)[:n]


class VectorQuantizer(nn.Module):
  """VQ bottleneck with the same call shape as :class:`FSQBottleneck`.

  Attributes:
    codebook_size: K codes.
    features: D, the width of the latent and of each code.
    beta: Weight of one of the two loss terms (see ``beta_on``).
    beta_on: ``"codebook"`` (reference) or ``"commitment"`` (VQ-VAE, LlamaGen).
    l2_normalize: Cosine-similarity lookup on the unit sphere (LlamaGen).
    compute_stats: Whether to return usage statistics (a K-bin histogram).
  """

  codebook_size: int
  features: int
  beta: float = 0.5
  beta_on: str = "codebook"
  l2_normalize: bool = False
  compute_stats: bool = True

  def setup(self):
    if self.beta_on not in BETA_PLACEMENTS:
      raise ValueError(f"beta_on={self.beta_on!r} is not valid; use one of {BETA_PLACEMENTS}.")
    if self.codebook_size < 1 or self.features < 1:
      raise ValueError(
          f"codebook_size={self.codebook_size} and features={self.features} must both be >= 1.")
    k = self.codebook_size

    def init(key, shape, dtype=jnp.float32):
      w = jax.random.uniform(key, shape, dtype, -1.0 / k, 1.0 / k)
      return _l2_normalize(w) if self.l2_normalize else w

    # Named axes: the loop's rules shard the codebook like an embedding table.
    self.codebook = self.param("codebook", nn.with_logical_partitioning(init, (parallel.VOCAB, parallel.EMBED)),
                               (k, self.features))

  def _table(self) -> jax.Array:
    e = self.codebook.astype(jnp.float32)
    return _l2_normalize(e) if self.l2_normalize else e

  def __call__(self, z: jax.Array, train: bool = False) -> BottleneckOutput:
    """z (..., D) -> codes (..., D) (straight-through), indices (...) int32."""
    del train
    if z.shape[-1] != self.features:
      raise ValueError(f"z has shape {tuple(z.shape)}; the last axis must be features={self.features}.")
    lead = z.shape[:-1]
    x = z.astype(jnp.float32)
    if self.l2_normalize:
      x = _l2_normalize(x)
    e = self._table()
    idx = nearest_code(x.reshape(-1, self.features), e)  # (N,)
    zq = jnp.take(e, idx, axis=0).reshape(x.shape)
    codebook_loss = jnp.mean(jnp.square(zq - jax.lax.stop_gradient(x)))
    commit_loss = jnp.mean(jnp.square(jax.lax.stop_gradient(zq) - x))
    if self.beta_on == "codebook":
      loss = commit_loss + self.beta * codebook_loss
    else:
      loss = codebook_loss + self.beta * commit_loss
    codes = x + jax.lax.stop_gradient(zq - x)
    stats = {"codebook_loss": codebook_loss, "commit_loss": commit_loss}
    if self.compute_stats:
      counts = jnp.zeros((self.codebook_size,), jnp.int32).at[idx].add(1)
      used = jnp.sum(counts > 0)
      stats.update(codes_used=used, usage=used / np.float32(self.codebook_size),
                   entropy_bits=entropy_bits(counts), perplexity=2.0 ** entropy_bits(counts))
    return BottleneckOutput(codes=codes.astype(z.dtype), loss=loss, indices=idx.reshape(lead), stats=stats)

  def decode_indices(self, indices: jax.Array) -> jax.Array:
    """Indices (...) -> codebook rows (..., D) (normalized when ``l2_normalize``)."""
    return jnp.take(self._table(), indices, axis=0)

"""Linen bottlenecks with one call shape: FSQ / iFSQ, and the plain autoencoder.

Every bottleneck is called as ``out = layer.apply(params, z, train=...)`` on a
channels-last latent z of shape (..., D) and returns a :class:`BottleneckOutput`,
so a tokenizer can swap FSQ, VQ (``vq.py``), KL (``kl.py``) and AE freely.

Dimension letters: ``...`` leading shape (e.g. B, H, W), D feature width.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from ifsq_jax.quantizers.fsq import FSQ


@flax.struct.dataclass
class BottleneckOutput:
  """What a bottleneck returns.

  Attributes:
    codes: (..., D) what the decoder consumes; straight-through for quantizers.
    loss: () auxiliary loss to add to the training loss (0 for FSQ and AE).
    indices: Integer indices of the codes, or None for continuous bottlenecks.
    stats: Scalars and small arrays to log (usage, entropy, loss terms, ...).
  """

  codes: jax.Array
  loss: jax.Array
  indices: jax.Array | None = None
  stats: dict[str, Any] = flax.struct.field(default_factory=dict)


class FSQBottleneck(nn.Module):
  """FSQ / iFSQ as a Linen layer; it has parameters only when it projects.

  Attributes:
    fsq: The quantizer (levels, bound, groups, codebooks).
    features: Width D of the incoming latent; when it differs from ``fsq.dim`` a
      Dense ``project_in`` (D -> fsq.dim) and ``project_out`` (fsq.dim -> D)
      surround the quantizer. None means ``fsq.dim``.
    compute_stats: Whether to return codebook statistics (a sort over tokens).
  """

  fsq: FSQ
  features: int | None = None
  compute_stats: bool = True

  @property
  def projects(self) -> bool:
    return self.features is not None and self.features != self.fsq.dim

  def setup(self):
    if self.projects:
      self.project_in = nn.Dense(self.fsq.dim, name="project_in")
      self.project_out = nn.Dense(self.features, name="project_out")

  def __call__(self, z: jax.Array, train: bool = False) -> BottleneckOutput:
    """Quantizes z: (..., D) -> codes (..., D), indices ``(...) + fsq.index_shape``."""
    del train  # FSQ behaves the same in training and evaluation.
    width = self.features if self.features is not None else self.fsq.dim
    if z.shape[-1] != width:
      raise ValueError(f"z has shape {tuple(z.shape)}; the last axis must be features={width}.")
    h = self.project_in(z) if self.projects else z
    codes = self.fsq.quantize(h)
    indices = self.fsq.codes_to_indices(codes)
    stats = self.fsq.codebook_stats(codes) if self.compute_stats else {}
    out = self.project_out(codes) if self.projects else codes
    return BottleneckOutput(codes=out, loss=jnp.zeros((), jnp.float32), indices=indices, stats=stats)

  def decode_indices(self, indices: jax.Array) -> jax.Array:
    """Indices ``(...) + fsq.index_shape`` -> (..., D) codes as the decoder sees them."""
    codes = self.fsq.indices_to_codes(indices)
    return self.project_out(codes) if self.projects else codes


class IdentityBottleneck(nn.Module):
  """The plain autoencoder: no bottleneck, no loss."""

  def __call__(self, z: jax.Array, train: bool = False) -> BottleneckOutput:
    del train
    return BottleneckOutput(codes=z, loss=jnp.zeros((), jnp.float32))

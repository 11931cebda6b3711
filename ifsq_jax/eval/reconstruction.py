"""Tokenizer reconstruction metrics over a whole split, streamed batch by batch.

:class:`ReconstructionMetrics` accumulates, as the reference's tokenizer
evaluation (spec 2.9):

* per image: L1 and PSNR on [0, 1] (``(v + 1) / 2``, reconstructions not
  clamped, as the reference), SSIM (skimage defaults), LPIPS-AlexNet
  (``spatial=True`` map, then its mean, as ``lpips.LPIPS(net="alex", spatial=True)``;
  images of at least 32 pixels, AlexNet's strided layers leave nothing of smaller ones);
* Frechet distances: ``fd_vgg16`` always (weights ship with the package) and
  rFID when a converted FID Inception is given; both on clamped reconstructions
  (the reference feeds unclamped values to Inception), Inception in float32
  (the reference runs it in bf16);
* code usage: distinct codes over the codebook size for every index column
  (one per codebook and group), their entropy and perplexity over the whole
  split, and for FSQ each channel's level usage and entropy.

Means are over images (the reference averages per-batch means, so its last
partial batch weighs like a full one); undecodable images are skipped and
counted (``skipped_images``). Batches are global arrays sharded over
devices and processes; every process gathers each batch's per-image results, so
the float64 totals, feature statistics and code counts are exact and the same on
every process. Codebooks of more than ``MAX_COUNTED_CODES`` codes per index
column (factorize them with groups) get no code usage.

B batch, H W image size, D code width, N tokens.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ifsq_jax import parallel
from ifsq_jax.data import sources, transforms
from ifsq_jax.eval import fid
from ifsq_jax.eval.image_metrics import psnr, ssim
from ifsq_jax.nets import lpips

# Code counts are kept as a dense histogram per index column up to this many codes.
MAX_COUNTED_CODES = 1 << 22
PER_IMAGE = ("l1", "psnr", "ssim", "lpips_alex")
MIN_LPIPS_ALEX_SIZE = 32  # AlexNet's strided layers leave no pixels below this
MAX_NAMED_SKIPS = 5  # undecodable images named in warnings


def lpips_params() -> dict[str, Any]:
  """``{"alexnet": ..., "vgg16": ...}``: the packaged LPIPS weights (host arrays) for :func:`per_image_program`."""
  return {net: lpips.load_params(net) for net in ("alexnet", "vgg16")}


@functools.lru_cache(maxsize=1)
def per_image_program() -> Callable[..., dict[str, jax.Array]]:
  """``fn(nets, x, recon)``: per-image metrics and VGG16 features of a batch, ``nets`` as :func:`lpips_params`.

  The weights are an argument: a closure would bake them into the program as
  constants, once per batch shape.
  """
  alex = lpips.LPIPS("alexnet", spatial=True)

  @jax.jit
  def fn(nets, x, recon):
    x, recon = x.astype(jnp.float32), recon.astype(jnp.float32)
    a, b = (x + 1) / 2, (recon + 1) / 2
    clamped = jnp.clip(recon, -1, 1)
    out = {"l1": jnp.mean(jnp.abs(x - recon), axis=(1, 2, 3)), "psnr": psnr(a, b), "ssim": ssim(a, b),
           "vgg_real": lpips.vgg16_pool_features(nets["vgg16"], x),
           "vgg_fake": lpips.vgg16_pool_features(nets["vgg16"], clamped)}
    if min(x.shape[1:3]) >= MIN_LPIPS_ALEX_SIZE:
      out["lpips_alex"] = jnp.mean(alex.apply(nets["alexnet"], x, recon), axis=(1, 2))
    return out
  return fn


@functools.lru_cache(maxsize=None)
def inception_pair_program(module: Any) -> Callable[..., tuple[jax.Array, jax.Array]]:
  """``fn(variables, x, recon)``: Inception pool features (B, 2048) of originals and clamped reconstructions.

  Both in [-1, 1]; the variables are an argument (not constants of the program).
  """
  return jax.jit(lambda variables, x, r: (module.apply(variables, (x + 1) / 2),
                                          module.apply(variables, jnp.clip((r + 1) / 2, 0, 1))))


def to_host(tree: Any) -> Any:
  """Global arrays -> numpy on every process (gathered across processes when needed)."""
  def get(a):
    if isinstance(a, jax.Array) and not a.is_fully_addressable:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      return np.asarray(multihost_utils.process_allgather(a, tiled=True))
    return np.asarray(a)
  return jax.tree.map(get, tree)


class ReconstructionMetrics:
  """Streaming reconstruction metrics of one split (see the module docstring).

  Batches are global arrays (sharded over devices and processes, or plain
  arrays); every process gathers the per-image results, so every process holds
  the same totals and :meth:`result` agrees everywhere.

  Args:
    index_sizes: Codebook size of each index column (e.g. ``(17**4,)``; with
      factorized groups one per group); empty for continuous bottlenecks.
    fsq: The FSQ quantizer, for per-channel level statistics (optional).
    inception: ``(module, variables)`` of a converted FID Inception; rFID is
      reported only with it.
  """

  def __init__(self, index_sizes: Sequence[int] = (), fsq: Any = None, inception: tuple[Any, Any] | None = None):
    self.index_sizes = tuple(int(s) for s in index_sizes)
    self.fsq = fsq
    self.count = 0
    self.sums = {k: 0.0 for k in PER_IMAGE}
    self.vgg_real, self.vgg_fake = fid.FeatureStats(512), fid.FeatureStats(512)
    self.code_counts = [np.zeros((s,), np.int64) if s <= MAX_COUNTED_CODES else None for s in self.index_sizes]
    self.level_counts = np.zeros((fsq.dim, max(fsq.levels)), np.int64) if fsq is not None else None
    self._inception = None
    self._host_nets = {"lpips": lpips_params()}
    self._placed_nets: dict[Any, Any] = {}  # mesh (None: the default device) -> the weights placed there
    if inception is not None:
      module, variables = inception
      self._inception = inception_pair_program(module)
      self._host_nets["inception"] = variables
      self.inception_real, self.inception_fake = fid.FeatureStats(2048), fid.FeatureStats(2048)

  def update(self, x: jax.Array, recon: jax.Array, valid: Any = None, indices: jax.Array | None = None,
             codes: jax.Array | None = None) -> None:
    """Adds a batch.

    Args:
      x: (B, H, W, 3) originals in [-1, 1].
      recon: (B, H, W, 3) reconstructions, not clamped.
      valid: (B,) bool, which images count (the others pad the batch); default all.
      indices: (B, h, w, *columns) code indices, or None.
      codes: (B, h, w, D) FSQ codes for per-channel level counts, or None.
    """
    nets = self._nets_beside(x)
    out = per_image_program()(nets["lpips"], x, recon)
    if self._inception is not None:
      out["inception_real"], out["inception_fake"] = self._inception(nets["inception"], x, recon)
    if indices is not None and self.index_sizes:
      out["indices"] = indices
    if codes is not None and self.fsq is not None:
      out["codes"] = codes
    out = to_host(out)
    keep = np.ones((x.shape[0],), bool) if valid is None else to_host(valid).astype(bool)
    out = {k: v[keep] for k, v in out.items()}
    for k in PER_IMAGE:
      if k in out:
        self.sums[k] += float(np.sum(out[k].astype(np.float64)))
      else:
        self.sums.pop(k, None)
    self.vgg_real.update(out["vgg_real"])
    self.vgg_fake.update(out["vgg_fake"])
    if self._inception is not None:
      self.inception_real.update(out["inception_real"])
      self.inception_fake.update(out["inception_fake"])
    if "indices" in out:
      idx = out["indices"]
      idx = idx.reshape(idx.shape[0] * int(np.prod(idx.shape[1:3])), -1)  # (N, columns)
      if idx.shape[1] != len(self.index_sizes):
        raise ValueError(f"indices have {idx.shape[1]} columns per token, expected {len(self.index_sizes)}.")
      for col, counts in enumerate(self.code_counts):
        if counts is not None:
          counts += np.bincount(idx[:, col].astype(np.int64), minlength=counts.shape[0])
    if "codes" in out:
      digits = np.asarray(self.fsq.codes_to_digits(out["codes"])).reshape(-1, self.fsq.dim)
      for ch in range(self.fsq.dim):
        self.level_counts[ch] += np.bincount(digits[:, ch].astype(np.int64), minlength=self.level_counts.shape[1])
    self.count += int(keep.sum())

  def _nets_beside(self, x: Any) -> dict[str, Any]:
    """The frozen weights replicated over the mesh of ``x`` (placed once per mesh, not at every batch)."""
    sharding = getattr(x, "sharding", None)
    mesh = sharding.mesh if isinstance(sharding, jax.sharding.NamedSharding) else None
    if mesh not in self._placed_nets:
      self._placed_nets[mesh] = (parallel.replicate(self._host_nets, mesh) if mesh is not None
                                 else jax.device_put(self._host_nets))
    return self._placed_nets[mesh]

  def result(self) -> dict[str, Any]:
    """Metrics as plain floats, ints and lists (JSON-ready)."""
    if self.count == 0:
      raise ValueError("no images were evaluated.")
    out: dict[str, Any] = {"images": self.count}
    out.update({k: v / self.count for k, v in self.sums.items()})
    if self.count >= 2:
      out["fd_vgg16"] = fid.fd_vgg16(self.vgg_real, self.vgg_fake)
      if self._inception is not None:
        r, f = self.inception_real, self.inception_fake
        out["rfid"] = fid.frechet_distance(r.mu, r.sigma, f.mu, f.sigma)
    counted = [(s, c) for s, c in zip(self.index_sizes, self.code_counts) if c is not None]
    if counted:
      entropy = [_entropy_bits(c) for _, c in counted]
      usage = [int(np.count_nonzero(c)) / s for s, c in counted]
      out["code_usage"] = float(np.mean(usage))
      out["codes_used"] = [int(np.count_nonzero(c)) for _, c in counted]
      out["codebook_size"] = [s for s, _ in counted]
      out["code_entropy_bits"] = float(np.mean(entropy))
      out["code_perplexity"] = float(np.mean([2.0**e for e in entropy]))
      out["tokens"] = int(counted[0][1].sum())
    if self.level_counts is not None and self.level_counts.sum() > 0:
      levels = self.fsq.levels * self.fsq.num_codebooks
      out["level_usage"] = [float(np.count_nonzero(c[:l]) / l) for c, l in zip(self.level_counts, levels)]
      out["channel_entropy_bits"] = [_entropy_bits(c) for c in self.level_counts]
      out["channel_entropy_ratio"] = float(np.mean([_entropy_bits(c) / np.log2(l)
                                                    for c, l in zip(self.level_counts, levels)]))
    return out


def process_slice(n: int, process_index: int, process_count: int) -> range:
  """The contiguous positions of an ``n``-example split that one process reads."""
  per = math.ceil(n / process_count)
  return range(min(process_index * per, n), min((process_index + 1) * per, n))


def evaluate_split(reconstruct: Callable[[jax.Array], tuple[jax.Array, jax.Array, jax.Array | None]],
                   mesh: jax.sharding.Mesh, source: Any, image_size: int, metrics: ReconstructionMetrics,
                   batch: int = 64, max_examples: int = 0) -> dict[str, Any]:
  """Runs ``reconstruct`` over a split and returns ``metrics.result()`` (the same on every process).

  Undecodable images (``source[i]`` raises :class:`~ifsq_jax.data.sources.DecodeError`)
  are skipped and counted: ``skipped_images`` in the result (over all
  processes), and a warning names the first few.

  Args:
    reconstruct: Global (B, H, W, 3) images -> (reconstructions, codes, indices or None).
    mesh: The device mesh; batches are sharded over its (data, fsdp) axes.
    source: Random-access images (uint8 HWC, label); processes read contiguous slices.
    image_size: ADM center-crop size.
    metrics: The accumulator.
    batch: Images per process per step (rounded up to divide over the batch devices).
    max_examples: The first ``max_examples`` images only (0: all; skipped images count among them).
  """
  n = min(len(source), max_examples) if max_examples else len(source)
  processes = jax.process_count()
  positions = process_slice(n, jax.process_index(), processes)
  per_process = max(1, math.prod(mesh.shape[a] for a in parallel.BATCH_AXES) // processes)
  batch = math.ceil(batch / per_process) * per_process
  skipped: list[str] = []
  for s in range(math.ceil(math.ceil(n / processes) / batch)):  # the same count on every process
    images = []
    for i in positions[s * batch:(s + 1) * batch]:
      try:
        images.append(transforms.to_float(transforms.center_crop(source[i][0], image_size)))
      except sources.DecodeError as e:
        skipped.append(str(e))
    valid = np.arange(batch) < len(images)
    if not images:  # this process has run out (or nothing decoded); it still joins the collective steps
      images = [np.zeros((image_size, image_size, 3), np.float32)]
    images += [images[-1]] * (batch - len(images))  # one compiled shape
    data = parallel.global_batch({"image": np.stack(images), "valid": valid}, mesh)
    recon, codes, indices = reconstruct(data["image"])
    metrics.update(data["image"], recon, data["valid"], indices=indices, codes=codes)
  total_skipped = _sum_over_processes(len(skipped))
  if total_skipped:
    logging.warning("Skipped %d undecodable image(s) of %d in %s (this process: %d; first: %s).", total_skipped, n,
                    getattr(source, "name", "the split"), len(skipped), "; ".join(skipped[:MAX_NAMED_SKIPS]) or "-")
  if metrics.count == 0:
    raise ValueError(f"no images were evaluated: {total_skipped} of {n} could not be decoded"
                     f"{' (first: ' + skipped[0] + ')' if skipped else ''}.")
  return {**metrics.result(), "skipped_images": total_skipped}


def _sum_over_processes(value: int) -> int:
  if jax.process_count() == 1:
    return value
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return int(np.sum(multihost_utils.process_allgather(np.int64(value))))


def _entropy_bits(counts: np.ndarray) -> float:
  p = counts[counts > 0].astype(np.float64)
  p /= p.sum()
  return float(-(p * np.log2(p)).sum())

"""What the DiT and LlamaGen trainers share: the frozen tokenizer and REPA target, and sample evaluation.

A generator trainer (:class:`GeneratorTrainer`) opens the frozen tokenizer
(``config.tokenizer``) and REPA target (``config.repa``), and evaluates its EMA
weights on class-balanced samples: sample i has label ``i % num_classes``, the
samples are scored by :class:`~ifsq_jax.train.sample_eval.SampleEvaluator`
(``fd_vgg16``, FID with Inception weights), and the first ``eval.grid_classes``
classes' samples become the per-class image grid. A subclass implements
:meth:`GeneratorTrainer.sample_batch` (one sharded batch of samples) and may add
metrics of the samples in :meth:`GeneratorTrainer.sample_metrics`.

B batch, H W image size.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ifsq_jax import config_lib, parallel, shapes_only
from ifsq_jax.models.pretrained import LoadedTokenizer, load_tokenizer
from ifsq_jax.nets import repa
from ifsq_jax.train import loop, sample_eval

QUICKSTART_TOKENIZER = "out/quickstart"
MAKE_QUICKSTART_TOKENIZER = "python -m ifsq_jax.main --config=configs/quickstart.py --workdir=out/quickstart"


def add_generator_fields(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The fields every generator config has: ``tokenizer``, ``repa.*``, ``sample.batch_size`` and ``eval.*``."""
  c.tokenizer = ""  # a tokenizer work dir or converted directory (required)
  c.repa = ml_collections.ConfigDict()
  c.repa.target = "dinov2"  # see ifsq_jax.nets.repa.TARGETS
  c.repa.path = ""  # converted DINOv2 weights for target dinov2
  c.repa.coef = 0.5
  c.sample = ml_collections.ConfigDict()
  c.sample.batch_size = 64  # global samples per sampler call
  c.eval = ml_collections.ConfigDict()
  c.eval.num_samples = 10_000  # samples scored at each in-training evaluation
  c.eval.inception_path = ""  # converted FID Inception (python -m ifsq_jax.convert inception): adds FID
  c.eval.fid_reference = ""  # reference statistics .npz for FID (default: the validation crops)
  c.eval.grid_classes = 8  # rows of the per-class sample grid
  c.eval.grid_per_class = 8
  return c


def set_repa(c: ml_collections.ConfigDict, target: str, path: str = "") -> None:
  """Sets the REPA target and the projector width it needs (``model.z_dim``)."""
  c.repa.target, c.repa.path = target, path
  c.model.z_dim = repa.target_dim(target, path)


def _error(message: str) -> config_lib.ConfigError:
  return config_lib.ConfigError(message)


def validate_generator(config: ml_collections.ConfigDict, depth: int) -> None:
  """Checks the shared fields; ``depth`` bounds ``model.encoder_depth`` (the REPA tap)."""
  config_lib.validate_image_data(config)
  config_lib.require_choice(config, "repa.target", repa.TARGETS)
  m, r = config.model, config.repa
  if not config.tokenizer:
    raise _error("config.tokenizer is empty: name a tokenizer work dir or converted directory (for the "
                 f"quickstart tokenizer: {MAKE_QUICKSTART_TOKENIZER}; with --compile_only, a tokenizer config "
                 "file such as configs/ifsq_f16_d4.py also does).")
  if r.target == "dinov2" and not r.path and not shapes_only.active():
    raise _error("config.repa.path is empty: the dinov2 REPA target needs converted DINOv2 weights "
                 "(python -m ifsq_jax.convert dinov2 --checkpoint dinov2_vitb14.pth --out DIR); "
                 "config.repa.target='vgg16' ships with the package, 'none' turns REPA off.")
  try:
    want = repa.target_dim(r.target, r.path)
  except ValueError as e:
    raise _error(f"config.repa.path={r.path!r}: {e}") from None
  if m.z_dim != want:
    raise _error(f"config.model.z_dim={m.z_dim} but the REPA target {r.target!r} gives {want}-d features "
                 "(0 without REPA); set both with set_repa(config, target, path).")
  if r.target != "none" and not 1 <= m.encoder_depth <= depth:
    raise _error(f"config.model.encoder_depth={m.encoder_depth} must be in [1, depth={depth}].")
  if r.target != "none" and config.data.codes_dir:
    raise _error("REPA needs the images (its targets are computed from them) but config.data.codes_dir reads "
                 "codes only; train from images or set config.repa.target='none'.")
  if config.eval.num_samples < 2 or config.sample.batch_size < 1:
    raise _error(f"config.eval.num_samples={config.eval.num_samples} must be >= 2 and config.sample.batch_size="
                 f"{config.sample.batch_size} >= 1.")


def open_tokenizer(config: ml_collections.ConfigDict, dtype: Any,
                   group_sizes: tuple[int, ...] | None = None) -> LoadedTokenizer:
  """The frozen tokenizer of ``config.tokenizer``; ``group_sizes`` re-splits its FSQ indices into groups.

  Index groups change only the index arithmetic (codes <-> indices), not the
  network, so one trained tokenizer serves single and factorized generators, as
  the reference's ``factorized_bits`` override does.
  """
  path = config.tokenizer
  try:
    tokenizer = load_tokenizer(path, dtype=dtype)
  except (FileNotFoundError, ValueError) as e:
    hint = f" Make it with: {MAKE_QUICKSTART_TOKENIZER}" if path.rstrip("/") == QUICKSTART_TOKENIZER else ""
    raise _error(f"config.tokenizer={path!r} cannot be opened: {e}{hint}") from None
  if group_sizes:
    try:
      tokenizer = regroup(tokenizer, group_sizes)
    except ValueError as e:
      raise _error(f"config.tokens.group_sizes={tuple(group_sizes)}: {e}") from None
  return tokenizer


def regroup(tokenizer: LoadedTokenizer, group_sizes: tuple[int, ...]) -> LoadedTokenizer:
  """The tokenizer with its FSQ indices split into ``group_sizes`` channel groups (same network, same codes)."""
  tc = tokenizer.config
  if tc.bottleneck not in ("ifsq", "fsq"):
    raise ValueError(f"index groups split FSQ indices, but this tokenizer has a {tc.bottleneck!r} bottleneck.")
  try:
    regrouped = dataclasses.replace(tc, group_sizes=tuple(group_sizes))
    regrouped.fsq  # pylint: disable=pointless-statement  (builds the quantizer: checks the groups)
  except ValueError as e:
    raise ValueError(f"group sizes {tuple(group_sizes)} do not fit the tokenizer's {len(tc.levels)} FSQ channels "
                     f"(levels {tuple(tc.levels)}): {e}") from None
  return LoadedTokenizer(regrouped, tokenizer.variables, tokenizer.model.dtype)


class GeneratorTrainer(loop.Trainer):
  """A generator on a frozen tokenizer, evaluated on class-balanced EMA samples (see the module docstring).

  Subclasses set ``self.tokenizer`` and ``self.num_classes`` and implement
  :meth:`sample_batch`.
  """

  tokenizer: LoadedTokenizer
  num_classes: int

  def __init__(self, config, mesh):
    super().__init__(config, mesh)
    self.evaluator = sample_eval.SampleEvaluator(config)
    self._grid = None  # (step, per-class rows) of the last evaluation's samples

  def sample_batch(self, state, indices: np.ndarray, labels: jax.Array, seed: int) -> dict[str, jax.Array]:
    """Samples for global sample ``indices`` (B,) with ``labels`` (B,) batch-sharded.

    Returns batch-sharded arrays: ``images`` (B, H, W, 3) in [-1, 1] (not
    clipped) and anything :meth:`sample_metrics` reads. Sample i must depend
    on (seed, i) and the weights only, so that evaluations at different steps
    start from the same randomness.
    """
    raise NotImplementedError

  def sample_metrics(self, state, samples: dict[str, np.ndarray], labels: np.ndarray) -> dict[str, float]:
    """Extra metrics of an evaluation's samples (host arrays, every process holds all of them)."""
    del state, samples, labels
    return {}

  @functools.cached_property
  def tokenizer_on_devices(self) -> Any:
    """The tokenizer's variables, replicated over the mesh (made once)."""
    return parallel.replicate(self.tokenizer.variables, self.mesh)

  def sample_all(self, state, labels: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """Everything :meth:`sample_batch` returns, for ``labels`` (N,), on every process (host arrays, N rows)."""
    c = self.config
    n = len(labels)
    per_call = round_up(min(c.sample.batch_size, n), batch_devices(self.mesh))
    out: dict[str, list[np.ndarray]] = {}
    for start in range(0, n, per_call):
      idx = np.arange(start, start + per_call)
      y = np.asarray(labels)[np.minimum(idx, n - 1)].astype(np.int32)
      with parallel.sharding_context(self.mesh, c.mesh.rules):
        batch = self.sample_batch(state, idx, global_array(y, self.mesh), seed)
      for k, v in batch.items():
        out.setdefault(k, []).append(to_host(v)[:max(0, min(per_call, n - start))])
    return {k: np.concatenate(v) for k, v in out.items()}

  def samples(self, state, labels: np.ndarray, seed: int) -> np.ndarray:
    """Images (N, H, W, 3) in [-1, 1] (not clipped) from the EMA weights for ``labels`` (N,), on every process."""
    return self.sample_all(state, labels, seed)["images"]

  def evaluate(self, state, step):
    """``fd_vgg16`` (FID with Inception weights, and :meth:`sample_metrics`) of ``eval.num_samples`` samples."""
    c = self.config
    labels = np.arange(c.eval.num_samples) % self.num_classes
    samples = self.sample_all(state, labels, seed=c.seed + 1)
    images = samples["images"]
    classes, per = self._grid_shape()
    if len(images) >= (per - 1) * self.num_classes + classes:  # sample i has class i % num_classes
      rows = [images[k::self.num_classes][:per] for k in range(classes)]
      self._grid = (step, np.clip(np.stack(rows), -1, 1))
    return {**self.evaluator.score(images), **self.sample_metrics(state, samples, labels)}

  def image_rows(self, state):
    """One row of samples per class (the first ``eval.grid_classes`` classes); an evaluation's when it has them."""
    c = self.config
    step = int(jax.device_get(state.step))
    if self._grid is not None and self._grid[0] == step:
      return list(self._grid[1])
    classes, per = self._grid_shape()
    labels = np.repeat(np.arange(classes), per)
    images = np.clip(self.samples(state, labels, seed=c.seed + 2), -1, 1)
    return list(images.reshape((classes, per) + images.shape[1:]))

  def _grid_shape(self) -> tuple[int, int]:
    c = self.config
    return min(c.eval.grid_classes, self.num_classes), c.eval.grid_per_class


def round_up(n: int, k: int) -> int:
  return -(-n // k) * k


def batch_devices(mesh) -> int:
  """Devices the batch axis is split over."""
  return math.prod(mesh.shape[a] for a in parallel.BATCH_AXES)


def global_array(x: np.ndarray, mesh) -> jax.Array:
  """A batch-sharded global array from the full host array (the same on every process)."""
  sharding = parallel.batch_sharding(mesh, x.ndim)
  return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def to_host(x: jax.Array) -> np.ndarray:
  """The full array on every process."""
  if not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def init_from_converted(trainer: loop.Trainer, state, path: str, kind: str, from_checkpoint) -> Any:
  """``init_from`` of a generator: converted official weights (params and EMA), else ``from_checkpoint``.

  A directory written by ``python -m ifsq_jax.convert {kind}`` must hold the
  same architecture as ``config.model`` (dropout, remat and attention fields may
  differ): its params replace both the params and the EMA.
  """
  from ifsq_jax.models import loading  # pylint: disable=g-import-not-at-top
  if not loading.is_converted(path):
    return from_checkpoint(state, path)
  module, params = loading.load_model(path)
  if type(module) is not type(trainer.module):  # pylint: disable=unidiomatic-typecheck
    raise _error(f"config.checkpoint.init_from={path!r} holds a converted {type(module).__name__}, not a "
                 f"{type(trainer.module).__name__}.")
  want = jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), state.params)
  got = jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), params)
  if want != got:
    fields = ", ".join(f"{k}={getattr(module, k)!r}" for k in ("depth", "hidden_size", "num_heads", "scan_layers")
                       if hasattr(module, k))
    raise _error(f"config.checkpoint.init_from={path!r} holds a {type(module).__name__} ({fields}) whose params do "
                 f"not match config.model ({kind} params of other names or shapes); set config.model to its "
                 "architecture.")
  placed = jax.tree.map(lambda x, s: jax.device_put(np.asarray(x, np.float32), s.sharding), params, state.params)
  logging.info("Initialised params and EMA from the converted %s in %s", kind, path)
  return state.replace(params=placed, ema_params=jax.tree.map(jnp.copy, placed))


def log_repa(target: repa.RepaTarget | None, grid: int, depth: int, coef: float) -> None:
  logging.info("REPA target: %s", "none (REPA off)" if target is None else
               f"{target.name}, {target.dim}-d features on a {grid}x{grid} grid after block {depth}, "
               f"coefficient {coef}")


def tokenizer_codes(tokenizer: LoadedTokenizer, variables: Any, images: jax.Array) -> jax.Array:
  """FSQ codes (B, h, w, C) float32 of images (B, H, W, 3), without gradient."""
  codes = tokenizer.model.apply(variables, images, method=lambda m, x: m.encode(x).codes)
  return jax.lax.stop_gradient(codes.astype(jnp.float32))

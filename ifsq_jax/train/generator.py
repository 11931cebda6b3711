"""What the DiT and LlamaGen trainers share: :class:`GeneratorTrainer` and the generator config fields.

A generator trains on a frozen tokenizer (``config.tokenizer``) with REPA
(``config.repa``). :class:`GeneratorTrainer` owns everything but the model:

* **data**: the training images, or codes / indices extracted by
  ``python -m ifsq_jax.tools.extract`` (``data.codes_dir``);
* **frozen networks**: the tokenizer and the REPA target, placed on the devices
  once by the loop (:attr:`~ifsq_jax.train.loop.Trainer.frozen_on_devices`) and
  passed to every step and to the sampling program as arguments;
* **the step**: gradients of the subclass's :meth:`GeneratorTrainer.loss`
  (accumulated over micro-batches), the optimizer update (of the params
  :meth:`GeneratorTrainer.trainable` marks), EMA and the non-finite guard;
* **config errors** (``config_lib.ConfigError``, naming key, value and what is valid);
* **evaluation**: class-balanced samples of the EMA weights (sample i has
  label ``i % num_classes``), drawn by :mod:`ifsq_jax.sampling.draw` (as
  ``tools.sample`` draws them) with the ``config.sample`` options, scored by
  :class:`~ifsq_jax.train.sample_eval.SampleEvaluator` (``fd_vgg16``; FID and
  more with Inception weights) and :meth:`GeneratorTrainer.sample_metric_stream`; the
  first ``eval.grid_classes`` classes' samples become the image grid. No host
  holds the samples' images: each sampler call is rounded to uint8 and scored
  on the devices that drew it, and only features are gathered
  (:meth:`GeneratorTrainer.score_samples`).

A subclass (``train/dit.py``, ``train/llamagen.py``) holds its objective, its
model fields and its sampler options: :attr:`model_class`, :meth:`validate_task`,
:meth:`make_module`, :meth:`example_inputs`, :meth:`code_input`, :meth:`loss` and, where needed,
:meth:`tokenizer_groups`, :meth:`trainable` and :meth:`sample_metric_stream`.

B batch, H W image size.
"""

from __future__ import annotations

import functools
import logging
import re
from typing import Any, Protocol

from etils import epath
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ifsq_jax import config_lib, parallel, shapes_only
from ifsq_jax.data import code_shards
from ifsq_jax.data import pipeline as pipeline_lib
from ifsq_jax.data import transforms
from ifsq_jax.eval import features as features_lib
from ifsq_jax.models.pretrained import LoadedTokenizer, load_tokenizer
from ifsq_jax.nets import repa
from ifsq_jax.sampling import draw
from ifsq_jax.train import loop, sample_eval
from ifsq_jax.train import state as state_lib

QUICKSTART_TOKENIZER = "out/quickstart"
MAKE_QUICKSTART_TOKENIZER = "python -m ifsq_jax.main --config=configs/quickstart.py --workdir=out/quickstart"


def add_generator_fields(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The fields every generator config has: ``tokenizer``, ``repa.*``, ``sample.batch_size`` and ``eval.*``.

  ``sample.*`` also holds the sampler options of :mod:`ifsq_jax.sampling.draw`
  (the task adds them); ``sample.cfg_interval`` = (lo, hi) guides the model
  evaluations at sampling progress p with ``lo <= p < hi`` (DiT: the flow time;
  LlamaGen: token n / N), :mod:`ifsq_jax.sampling.guidance`.
  """
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


def sample_options(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The sampler options of ``config.sample`` (every field but ``batch_size``)."""
  return {k: v for k, v in config.sample.to_dict().items() if k != "batch_size"}


def _model_fields(config: ml_collections.ConfigDict) -> dict[str, Any]:
  return {k: tuple(v) if isinstance(v, list) else v for k, v in config.model.to_dict().items()}


def validate_generator(config: ml_collections.ConfigDict, depth: int) -> None:
  """Checks the shared fields; ``depth`` bounds ``model.encoder_depth`` (the REPA tap)."""
  error = config_lib.ConfigError
  config_lib.validate_image_data(config)
  config_lib.require_choice(config, "repa.target", repa.TARGETS)
  for key in ("hidden_size", "depth", "num_heads", "num_classes", "projector_dim"):
    config_lib.require_range(config, f"model.{key}", 1)
  if config.model.hidden_size % config.model.num_heads:
    raise error(f"config.model.hidden_size={config.model.hidden_size} must be a multiple of config.model.num_heads="
                f"{config.model.num_heads}.")
  # The null label replaces a label with this probability; 1 would never train the conditional model.
  config_lib.require_range(config, "model.class_dropout_prob", 0, 1, high_open=True)
  config_lib.require_range(config, "repa.coef", 0, note="0: no REPA loss")
  config_lib.require_range(config, "sample.cfg_scale", 0, note="1: no guidance")
  for key in ("grid_classes", "grid_per_class"):
    config_lib.require_range(config, f"eval.{key}", 1)
  m, r = config.model, config.repa
  if not config.tokenizer:
    raise error("config.tokenizer is empty: name a tokenizer work dir or converted directory (for the quickstart "
                f"tokenizer: {MAKE_QUICKSTART_TOKENIZER}; with --compile_only, a tokenizer config file such as "
                "configs/ifsq_f16_d4.py also does).")
  if r.target == "dinov2" and not r.path and not shapes_only.active():
    raise error("config.repa.path is empty: the dinov2 REPA target needs converted DINOv2 weights "
                "(python -m ifsq_jax.convert dinov2 --checkpoint dinov2_vitb14.pth --out DIR); "
                "config.repa.target='vgg16' ships with the package, 'none' turns REPA off.")
  try:
    want = repa.target_dim(r.target, r.path)
  except ValueError as e:
    raise error(f"config.repa.path={r.path!r}: {e}") from None
  if m.z_dim != want:
    raise error(f"config.model.z_dim={m.z_dim} but the REPA target {r.target!r} gives {want}-d features (0 without "
                "REPA); set both with set_repa(config, target, path).")
  if r.target != "none" and not 1 <= m.encoder_depth <= depth:
    raise error(f"config.model.encoder_depth={m.encoder_depth} must be in [1, depth={depth}].")
  if r.target != "none" and config.data.codes_dir:
    raise error("REPA needs the images (its targets are computed from them) but config.data.codes_dir reads codes "
                "only; train from images or set config.repa.target='none'.")
  config_lib.require_range(config, "eval.num_samples", 2)
  config_lib.require_range(config, "sample.batch_size", 1)
  reference = config.eval.fid_reference
  # Read only at the first evaluation, possibly many steps in: a missing file is a config error now.
  if reference and not shapes_only.active() and not epath.Path(reference).exists():
    raise error(f"config.eval.fid_reference={reference!r} does not exist; name a reference .npz with mu and sigma "
                "(as ADM's reference batches hold them), or '' to compare with the validation crops.")


def _keyed(group: str, error: ValueError) -> config_lib.ConfigError:
  """A model's or sampler's ValueError as a ConfigError naming the config key.

  Their messages start with the field ("shift=-1.0 must be >= 0"), which becomes ``config.<group>.shift=...``.
  """
  text = str(error)
  return config_lib.ConfigError(f"config.{group}.{text}" if re.match(r"\w+=", text) else f"config.{group}: {text}")


def open_tokenizer(config: ml_collections.ConfigDict, dtype: Any,
                   group_sizes: tuple[int, ...] | None = None) -> LoadedTokenizer:
  """The frozen tokenizer of ``config.tokenizer``; ``group_sizes`` re-splits its FSQ indices (:func:`draw.regroup`)."""
  path = config.tokenizer
  try:
    tokenizer = load_tokenizer(path, dtype=dtype)
  except (FileNotFoundError, ValueError) as e:
    hint = f" Make it with: {MAKE_QUICKSTART_TOKENIZER}" if path.rstrip("/") == QUICKSTART_TOKENIZER else ""
    raise config_lib.ConfigError(f"config.tokenizer={path!r} cannot be opened: {e}{hint}") from None
  if group_sizes:
    try:
      tokenizer = draw.regroup(tokenizer, group_sizes)
    except ValueError as e:
      raise config_lib.ConfigError(f"config.tokens.group_sizes={tuple(group_sizes)}: {e}") from None
  return tokenizer


def tokenizer_codes(tokenizer: LoadedTokenizer, variables: Any, images: jax.Array) -> jax.Array:
  """FSQ codes (B, h, w, C) float32 of images (B, H, W, 3), without gradient."""
  codes = tokenizer.model.apply(variables, images, method=lambda m, x: m.encode(x).codes)
  return jax.lax.stop_gradient(codes.astype(jnp.float32))


class SampleMetricStream(Protocol):
  """A task's extra evaluation metrics, fed the evaluation's sampler calls in order (LlamaGen's CKNNA)."""

  def add(self, samples: dict[str, jax.Array], labels: np.ndarray, keep: int) -> None:
    """One call: :func:`draw.draw`'s batch-sharded arrays (images float32), labels (B,); rows past ``keep`` pad."""

  def result(self) -> dict[str, float]:
    """The metrics of everything added."""


class GeneratorTrainer(loop.Trainer):
  """A generator on a frozen tokenizer, with REPA, evaluated on class-balanced EMA samples (see the module doc).

  Attributes:
    model_class: The subclass's model (DiT or LlamaGen); it decides the sampler.
    module: The model, as :meth:`make_module` builds it.
    grid: Side of the token / patch grid the REPA target's features are pooled to.
    tokenizer: The frozen tokenizer (host variables; the steps take the copy on the devices).
    target: The REPA target, or None without REPA.
  """

  model_class: type[nn.Module]

  # ------------------------------------------------------- what a task provides

  @classmethod
  def validate_task(cls, config: ml_collections.ConfigDict) -> None:
    """Checks the task's own fields (the shared ones and the sampler options are checked by :meth:`validate`)."""
    del config

  def tokenizer_groups(self) -> tuple[int, ...]:
    """Index groups to re-split the tokenizer's FSQ indices into (() keeps its own)."""
    return ()

  def make_module(self) -> tuple[nn.Module, int]:
    """(the model of ``config.model``, its REPA grid side); raises ConfigError if the tokenizer does not fit it."""
    raise NotImplementedError

  def example_inputs(self) -> tuple[np.ndarray, ...]:
    """Zero inputs of the shapes :attr:`module` takes (for ``init``)."""
    raise NotImplementedError

  def code_input(self) -> tuple[str, tuple[int, ...], Any]:
    """What an example of extracted shards gives the step: (key, shape per example, dtype)."""
    raise NotImplementedError

  def loss(self, params: Any, batch: dict[str, jax.Array], rng: jax.Array, frozen: Any,
           extra: dict[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss, metrics) of one (micro-)batch; ``frozen`` the devices' copy of :meth:`frozen`, ``extra`` the state's."""
    raise NotImplementedError

  def trainable(self, params: Any) -> Any | None:
    """A tree of bools like ``params`` (False: never updated, weight decay included), or None for all."""
    del params
    return None

  def sample_metric_stream(self, state) -> SampleMetricStream | None:
    """Extra metrics of an evaluation's samples, fed one sampler call at a time (None: no extra metrics)."""
    del state
    return None

  # ------------------------------------------------------------ shared parts

  @classmethod
  def validate(cls, config):
    validate_generator(config, config.model.depth)
    cls.validate_task(config)
    try:
      module = cls.model_class(**_model_fields(config))
      module._check()  # pylint: disable=protected-access  (what the model checks when it is first traced)
    except ValueError as e:
      raise _keyed("model", e) from None
    try:
      draw.options(module, sample_options(config))
    except ValueError as e:
      raise _keyed("sample", e) from None

  def __init__(self, config, mesh):
    super().__init__(config, mesh)
    c = config
    self.evaluator = sample_eval.SampleEvaluator(c)
    self._grid_rows = None  # (step, per-class rows) of the last evaluation's samples
    self.dtype = jnp.bfloat16 if c.train.compute_dtype == "bfloat16" else jnp.float32
    self.tokenizer = open_tokenizer(c, self.dtype, self.tokenizer_groups() or None)
    self.num_classes = c.model.num_classes
    self.module, self.grid = self.make_module()
    self.target = repa.load_target(c.repa.target, c.repa.path)
    logging.info("REPA target: %s", "none (REPA off)" if self.target is None else
                 f"{self.target.name}, {self.target.dim}-d features on a {self.grid}x{self.grid} grid after block "
                 f"{c.model.encoder_depth}, coefficient {c.repa.coef}")
    self.tx = state_lib.make_optimizer(c.optimizer, c.train.num_steps)

  def train_data(self, process_index, process_count):
    c = self.config
    if c.data.codes_dir:
      source = code_shards.CodeShardSource(c.data.codes_dir)
      key, shape, dtype = self.code_input()
      if key not in source.keys:
        raise config_lib.ConfigError(f"the shards in {c.data.codes_dir} hold {source.keys}, but this run's tokens "
                                     f"come from {key!r}.")
      if key == "codes" and tuple(source.codes_shape) != shape:
        raise config_lib.ConfigError(f"the codes in {c.data.codes_dir} are {tuple(source.codes_shape)}; the "
                                     f"tokenizer and model of this run take {shape}.")
      # The shards keep codes in float16 (exact for k / (L // 2)).
      example = pipeline_lib.code_example(c.data.code_flip, keys=(key,), dtypes={key: dtype})
      data = pipeline_lib.train_pipeline(c, source, example, process_index, process_count)
    else:
      data = pipeline_lib.build_pipeline(c, c.data.train_split, train=True, process_index=process_index,
                                         process_count=process_count)
    if data.source.num_classes > c.model.num_classes:
      raise config_lib.ConfigError(f"{data.source.name} has {data.source.num_classes} classes but "
                                   f"config.model.num_classes={c.model.num_classes}.")
    return data

  def batch_shapes(self):
    c = self.config
    b = c.train.global_batch_size
    shapes = {"label": jax.ShapeDtypeStruct((b,), jnp.int32)}
    if c.data.codes_dir:
      key, shape, dtype = self.code_input()
      shapes[key] = jax.ShapeDtypeStruct((b,) + shape, dtype)
    else:
      s = c.data.image_size
      shapes["image"] = jax.ShapeDtypeStruct((b, s, s, 3), jnp.uint8)  # made float inside the step
    return shapes

  def frozen(self):
    out = {"tokenizer": self.tokenizer.variables}
    if self.target is not None:
      out["repa"] = self.target.params
    return out

  def init_state(self, rng):
    k_params, k_drop = jax.random.split(rng)
    params = self.module.init({"params": k_params, "dropout": k_drop}, *self.example_inputs())["params"]
    return state_lib.create_state(params, self.tx, extra={})

  def init_from(self, state, path):
    """Params and EMA from a converted model (``python -m ifsq_jax.convert {task}``), else a checkpoint of the task.

    A converted directory must hold the same architecture as ``config.model``
    (dropout, remat and attention fields may differ): its params replace both
    the params and the EMA.
    """
    from ifsq_jax.models import loading  # pylint: disable=g-import-not-at-top
    if not loading.is_converted(path):
      return super().init_from(state, path)
    module, params = loading.load_model(path)
    mine = type(self.module).__name__
    if type(module) is not type(self.module):  # pylint: disable=unidiomatic-typecheck
      raise config_lib.ConfigError(f"config.checkpoint.init_from={path!r} holds a converted "
                                   f"{type(module).__name__}, not a {mine}.")
    shapes = lambda tree: jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), tree)
    if shapes(state.params) != shapes(params):
      fields = ", ".join(f"{k}={getattr(module, k)!r}" for k in ("depth", "hidden_size", "num_heads", "scan_layers")
                         if hasattr(module, k))
      raise config_lib.ConfigError(f"config.checkpoint.init_from={path!r} holds a {mine} ({fields}) whose params do "
                                   f"not match config.model ({mine} params of other names or shapes); set "
                                   "config.model to its architecture.")
    placed = jax.tree.map(lambda x, s: jax.device_put(np.asarray(x, np.float32), s.sharding), params, state.params)
    logging.info("Initialised params and EMA from the converted %s in %s", mine, path)
    return state.replace(params=placed, ema_params=jax.tree.map(jnp.copy, placed))

  def train_steps(self):
    c = self.config

    def step(state, batch, key, frozen):
      loss, metrics, grads = state_lib.accumulate_gradients(
          lambda p, mb, r: self.loss(p, mb, r, frozen, state.extra), state.params, batch, key,
          c.train.grad_accum_steps)
      norm = optax.tree.norm(grads)

      def update(s):
        updates, opt = self.tx.update(grads, s.opt_state, s.params)
        keep = self.trainable(s.params)
        if keep is not None:
          updates = jax.tree.map(lambda u, k: u if k else jnp.zeros_like(u), updates, keep)
        params = optax.apply_updates(s.params, updates)
        return s.replace(params=params, opt_state=opt,
                         ema_params=state_lib.ema_update(s.ema_params, params, c.train.ema_decay))

      new, nonfinite = state_lib.apply_if_finite(state, loss, norm, update)
      # state.extra holds what the run measured once (the DiT's latent scale): logged beside the losses.
      return new, {**metrics, **state.extra, "loss": loss, "grad_norm": norm, "nonfinite": nonfinite}

    return {"train": step}

  # -------------------------------------------------------------- sampling

  def decoder(self, state) -> draw.Decoder:
    """The tokenizer as the sampler decodes with it: the copy already on the devices, never a second one."""
    return draw.Decoder(self.tokenizer.model, self.frozen_on_devices["tokenizer"], state.extra.get("latent_scale"))

  def sample_all(self, state, labels: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """Samples 0..N-1 of the EMA weights with ``labels`` (N,): images (N, H, W, 3) and tokens or latents (host)."""
    c = self.config
    n = len(labels)
    return draw.draw_range(self.module, state.ema_params, labels, 0, n, seed, sample_options(c),
                           batch=draw.per_call(c.sample.batch_size, n, self.mesh), mesh=self.mesh,
                           rules=c.mesh.rules, decoder=self.decoder(state))

  def evaluate(self, state, step):
    """``fd_vgg16`` (FID and more with Inception weights, and :meth:`sample_metric_stream`) of ``eval.num_samples``.

    Memory: no host array of all samples. Each sampler call's images are
    rounded to uint8 and scored on the devices that drew them; only their
    features are gathered (:meth:`score_samples`).
    """
    c = self.config
    labels = np.arange(c.eval.num_samples) % self.num_classes
    classes, per = self._grid_shape()
    grid = None
    if len(labels) >= (per - 1) * self.num_classes + classes:  # sample i has class i % num_classes
      grid = {k + j * self.num_classes: None for k in range(classes) for j in range(per)}
    scores = self.score_samples(state, labels, seed=c.seed + 1, keep_images=grid)
    if grid is not None:
      rows = [[grid[k + j * self.num_classes] for j in range(per)] for k in range(classes)]
      self._grid_rows = (step, transforms.to_float(np.stack([np.stack(r) for r in rows])))
    return scores

  def eval_batch(self, num: int) -> int:
    """Samples per sampler call of an evaluation of ``num`` samples (a multiple of the batch devices)."""
    return draw.per_call(self.config.sample.batch_size, num, self.mesh)

  @functools.cached_property
  def _round_program(self):
    """jit: images (B, H, W, 3) float32 in [-1, 1], batch-sharded -> uint8, the bytes of ``fid.to_uint8``."""
    return jax.jit(features_lib.to_uint8, out_shardings=parallel.batch_sharding(self.mesh, 4))

  def other_programs(self, state, frozen):
    """The evaluation's programs at its call size: sampler with decoder, uint8 rounding, feature networks.

    LlamaGen's CKNNA program (``eval.cknna``) is not among them.
    """
    c = self.config
    n, size = self.eval_batch(c.eval.num_samples), c.data.image_size
    decoder = draw.Decoder(self.tokenizer.model, frozen["tokenizer"])
    images = jax.ShapeDtypeStruct((n, size, size, 3), jnp.float32, sharding=parallel.batch_sharding(self.mesh, 4))
    return {f"eval: sample + decode ({n})": draw.lower(self.module, state.ema_params, n, sample_options(c),
                                                        mesh=self.mesh, rules=c.mesh.rules, decoder=decoder),
            f"eval: to uint8 ({n})": self._round_program.lower(images),
            f"eval: features ({n})": self.evaluator.mesh_features(self.mesh).lower(n, size)}

  def score_samples(self, state, labels: np.ndarray, seed: int,
                    keep_images: dict[int, np.ndarray | None] | None = None) -> dict[str, float]:
    """The evaluator's metrics and the task's extra ones of samples 0..N-1 with ``labels`` (N,), streamed.

    Per sampler call: draw and decode (:func:`draw.draw`), round to uint8 and
    compute the features on the devices holding the batch, gather the
    features (B x 5.6k float32 with the Inception) into a ``features.Summary``,
    and hand the call's device arrays to :meth:`sample_metric_stream`. The host
    holds the summary (statistics, pool features and logits), never the images.

    Args:
      labels: (N,) the class of each sample.
      seed: The sampling seed.
      keep_images: {sample index: None}, filled with those samples' uint8 images (H, W, 3) (the grid).
    """
    c = self.config
    n = len(labels)
    opts, decoder = sample_options(c), self.decoder(state)
    features = self.evaluator.mesh_features(self.mesh)
    stream = self.sample_metric_stream(state)
    summary = features_lib.Summary("samples")
    for idx, y, keep in draw.calls(0, n, self.eval_batch(n), labels):
      samples = draw.draw(self.module, state.ema_params, idx, y, seed, opts, mesh=self.mesh, rules=c.mesh.rules,
                          decoder=decoder)
      images = self._round_program(samples["images"])  # (B, H, W, 3) uint8, on the devices
      summary.add({k: parallel.to_host(v)[:keep] for k, v in features(images).items()})
      wanted = [int(i) for i in idx[:keep] if keep_images is not None and int(i) in keep_images]
      if wanted:  # this call's uint8 images only, for the grid
        host = parallel.to_host(images)
        for i in wanted:
          keep_images[i] = host[i - int(idx[0])]
      if stream is not None:
        stream.add(samples, y, keep)
    return {**self.evaluator.score_summary(summary.result()), **(stream.result() if stream is not None else {})}

  def image_rows(self, state):
    """One row of samples per class (the first ``eval.grid_classes`` classes); an evaluation's when it has them."""
    step = int(jax.device_get(state.step))
    if self._grid_rows is not None and self._grid_rows[0] == step:
      return list(self._grid_rows[1])
    classes, per = self._grid_shape()
    labels = np.repeat(np.arange(classes), per)
    images = np.clip(self.sample_all(state, labels, seed=self.config.seed + 2)["images"], -1, 1)
    return list(images.reshape((classes, per) + images.shape[1:]))

  def _grid_shape(self) -> tuple[int, int]:
    c = self.config
    return min(c.eval.grid_classes, self.num_classes), c.eval.grid_per_class

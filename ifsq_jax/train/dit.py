"""DiT with REPA on iFSQ latents: flow matching (SiT convention, t = 1 is data) on the tokenizer's codes.

What a step does (the reference's ``dit/train.py``): encode the batch's images
with the frozen tokenizer (or read extracted codes), scale the codes by the
run's latent scale, draw x0 ~ N(0, I) and a logit-normal t, and regress the
velocity x1 - x0 with MSE + channel cosine loss + ``repa.coef`` x REPA (the
projector after block ``model.encoder_depth`` aligned with a frozen encoder's
patch features on the same images).

Differences from the reference, on purpose:

* The latent scale is measured (1 / std of the codes over the first
  ``latent.scale_batches`` training batches) at the start of a run and kept in
  the checkpoint and in ``latent.json``; the reference's 1.092421 belongs to its
  own tokenizer (set ``latent.scale`` to use a fixed value).
* The REPA target gets no gradient (the reference computes it with autograd on).
* Samples are guided on all latent channels (``sample.cfg_channels = 0``); the
  reference guides channels 0-2 only (``cfg_channels = 3`` reproduces it).

B batch, H W image size, h w latent size, C latent channels, N tokens.
"""

from __future__ import annotations

import json
import logging
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ifsq_jax import config_lib, parallel
from ifsq_jax.data import pipeline as pipeline_lib
from ifsq_jax.models import dit as dit_lib
from ifsq_jax.nets import repa  # noqa: F401  (GeneratorTrainer loads the target; tests patch it as dit.repa)
from ifsq_jax.objectives import transport
from ifsq_jax.sampling import flow
from ifsq_jax.train import generator, loop

QUICKSTART_TOKENIZER = generator.QUICKSTART_TOKENIZER
set_repa = generator.set_repa


def model_fields(size: str = "L", patch: int = 1, **overrides) -> ml_collections.ConfigDict:
  """``config.model``: the :class:`~ifsq_jax.models.dit.DiT` fields (all but ``dtype``)."""
  fields = dit_lib.dit_config(size, patch, **overrides)
  fields.pop("dtype", None)
  return ml_collections.ConfigDict(fields)


def default_config() -> ml_collections.ConfigDict:
  """The reference's DiT-L/1 REPA run on ImageNet 256 (``configs/dit_l2.py`` builds on it)."""
  c = generator.add_generator_fields(config_lib.add_image_data(config_lib.base_config()))
  c.task = "dit"
  c.seed = 0
  c.data.image_size = 256
  c.data.transform = "adm_random_crop"  # the reference's DiT data: ADM random crop, no flip
  c.data.codes_dir = ""  # train on `python -m ifsq_jax.tools.extract` shards instead of encoding images
  c.data.code_flip = True  # with codes_dir: each example takes its flipped image's codes with probability 1/2
  c.data.eval_examples = 10_000  # validation crops the samples are compared with
  c.latent = ml_collections.ConfigDict()
  c.latent.scale = 0.0  # 0: measure 1 / std of the codes at the start of the run
  c.latent.scale_batches = 4
  c.model = model_fields("L", 1)
  c.transport = ml_collections.ConfigDict()
  c.transport.time_kind = "lognorm"  # "lognorm" | "uniform"
  c.transport.mu = 0.0
  c.transport.sigma = 1.0
  c.transport.shift = 1.0  # training timestep shift (1: none)
  c.transport.use_cosine_loss = True
  c.sample.num_steps = 250
  c.sample.method = "euler"  # "euler" | "heun"
  c.sample.mode = "ode"  # "ode" | "sde"
  c.sample.shift = 0.0  # timestep shift of the sampling grid (0: none)
  c.sample.cfg_scale = 1.0
  c.sample.cfg_channels = 0  # 0: guide every channel; 3: the reference's channels 0-2 only
  c.sample.cfg_interval = (0.0, 1.0)  # guided iff lo <= t < hi (flow time, 0 noise -> 1 data): always
  c.train.global_batch_size = 1024
  c.train.num_steps = 100_000
  c.train.log_every = 100
  c.train.eval_every = 10_000
  c.train.image_every = 10_000
  c.train.ema_decay = 0.9999
  c.train.compute_dtype = "bfloat16"
  c.optimizer.lr = 2e-4
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.95
  c.optimizer.weight_decay = 0.0
  c.optimizer.grad_clip_norm = 0.0
  c.checkpoint.every = 10_000
  return c


def micro_batches(local: dict[str, np.ndarray], num_micro: int) -> list[dict[str, np.ndarray]]:
  """This process's slice of a batch split into ``num_micro`` equal consecutive parts (rows B / num_micro each)."""
  rows = len(next(iter(local.values())))
  if rows % num_micro:
    raise ValueError(f"{rows} rows do not split into {num_micro} micro-batches.")
  step = rows // num_micro
  return [{k: v[j * step:(j + 1) * step] for k, v in local.items()} for j in range(num_micro)]


class DiTTrainer(generator.GeneratorTrainer):
  """Flow matching with REPA on the frozen tokenizer's latents."""

  model_class = dit_lib.DiT

  @classmethod
  def validate_task(cls, config):
    config_lib.require_choice(config, "transport.time_kind", transport.TIME_KINDS)
    config_lib.require_choice(config, "sample.method", flow.METHODS)
    config_lib.require_choice(config, "sample.mode", flow.MODES)
    config_lib.require_choice(config, "model.attention_impl", tuple(dit_lib.ATTENTION_IMPLS))
    config_lib.require_choice(config, "model.remat_policy", dit_lib.REMAT_POLICIES)
    m = config.model
    config_lib.require_range(config, "latent.scale", 0, note="0: measure")
    config_lib.require_range(config, "latent.scale_batches", 1)
    # sigma spreads the logit-normal t and shift remaps t: both fail when the step is first traced otherwise.
    config_lib.require_range(config, "transport.sigma", 0, low_open=True)
    config_lib.require_range(config, "transport.shift", 0, low_open=True, note="1: no shift")
    for key in ("input_size", "patch_size", "in_channels"):
      config_lib.require_range(config, f"model.{key}", 1)
    config_lib.require_range(config, "model.mlp_ratio", 0, low_open=True)
    if m.hidden_size % 4 or (m.use_rope and (m.hidden_size // m.num_heads) % 4):
      raise config_lib.ConfigError(
          f"config.model.hidden_size={m.hidden_size} must be a multiple of 4 (the 2D sin-cos table) and, with "
          f"use_rope, of 4 x num_heads={m.num_heads} (2D RoPE rotates head widths in multiples of 4).")
    if m.input_size % m.patch_size:  # hidden_size % num_heads: the model's own _check, in validate
      raise config_lib.ConfigError(f"config.model.patch_size={m.patch_size} must divide config.model.input_size="
                                   f"{m.input_size}.")

  def make_module(self):
    c = self.config
    tc = self.tokenizer.config
    factor = tc.downsample_factor
    if c.model.in_channels != tc.embed_dim or c.model.input_size * factor != c.data.image_size:
      raise config_lib.ConfigError(
          f"config.model (in_channels={c.model.in_channels}, input_size={c.model.input_size}) does not fit the "
          f"tokenizer's latents of {c.data.image_size}px images: {tc.embed_dim} channels, "
          f"{c.data.image_size // factor} x {c.data.image_size // factor}.")
    self.latent_shape = (c.model.input_size, c.model.input_size, c.model.in_channels)
    return dit_lib.DiT(**c.model.to_dict(), dtype=self.dtype), c.model.input_size // c.model.patch_size

  def example_inputs(self):
    return dit_lib.example_inputs(self.module)

  def code_input(self):
    return "codes", self.latent_shape, np.float32

  def trainable(self, params):
    return dit_lib.trainable_mask(params)  # the fixed sin-cos table never moves (weight decay included)

  def _codes(self, batch, frozen):
    """The batch's FSQ codes (B, h, w, C) float32, from the images through the frozen tokenizer or as read."""
    if "codes" in batch:
      return batch["codes"].astype(jnp.float32)
    return generator.tokenizer_codes(self.tokenizer, frozen["tokenizer"], batch["image"])

  # ----------------------------------------------------------------- state

  def init_state(self, rng):
    state = super().init_state(rng)
    return state.replace(extra={"latent_scale": jnp.asarray(self.config.latent.scale, jnp.float32)})

  def prepare(self, state, data, frozen):
    """Measures the latent scale (1 / std of the codes) on the first training batches, unless it is set.

    The codes are encoded in micro-batches of the train step's size (global batch / ``train.grad_accum_steps``),
    one compiled program of that shape: a whole global batch in one program can exceed a device's memory where
    the step, which accumulates over micro-batches, fits. Each micro-batch gives float32 means of the codes and
    their squares; the host averages them in float64 (equal sizes, so this is the batches' mean).
    """
    c = self.config
    if c.latent.scale > 0:
      logging.info("Latent scale %.6f (config.latent.scale)", c.latent.scale)
      if jax.process_index() == 0:
        self._write_latent_json(c.latent.scale, None, None, 0)
      return state
    moments = self.moments_program()
    parts = []
    with parallel.sharding_context(self.mesh, c.mesh.rules):
      for i in range(c.latent.scale_batches):
        for micro in micro_batches(data.batch(i), c.train.grad_accum_steps):
          parts.append(np.asarray(moments(parallel.global_batch(micro, self.mesh), frozen)))
    m = np.mean(parts, axis=0, dtype=np.float64)
    std = math.sqrt(max(m[1] - m[0] ** 2, 1e-12))
    count = c.latent.scale_batches * c.train.global_batch_size
    logging.info("Latent scale 1 / std = %.6f, measured on the codes of %d training images (mean %.4f)", 1 / std,
                 count, m[0])
    if jax.process_index() == 0:
      self._write_latent_json(1 / std, m[0], std, count)
    return state.replace(extra={**state.extra, "latent_scale": jnp.asarray(1 / std, jnp.float32)})

  def other_programs(self, state, frozen):
    """The latent-scale pass (when it is measured) at the step's micro-batch, then the evaluation's programs."""
    out = {}
    c = self.config
    if c.latent.scale <= 0:
      rows = c.train.global_batch_size // c.train.grad_accum_steps
      batch = {k: jax.ShapeDtypeStruct((rows,) + v.shape[1:], v.dtype,
                                       sharding=parallel.batch_sharding(self.mesh, len(v.shape)))
               for k, v in self.batch_shapes().items()}
      out[f"latent scale ({rows})"] = self.moments_program().lower(batch, frozen)
    return {**out, **super().other_programs(state, frozen)}

  def moments_program(self):
    """jit: (micro-batch, frozen) -> (2,) float32 [mean of the codes, mean of their squares], replicated."""
    def moments(batch, frozen):
      codes = self._codes(pipeline_lib.normalize(batch), frozen)
      return jnp.stack([jnp.mean(codes), jnp.mean(codes ** 2)])

    return jax.jit(moments, out_shardings=parallel.replicated(self.mesh))

  def _write_latent_json(self, scale, mean, std, count):
    if self.workdir is not None:
      (self.workdir / "latent.json").write_text(json.dumps(
          {"latent_scale": scale, "code_mean": mean, "code_std": std, "images": count}, indent=2))

  # -------------------------------------------------------------- objective

  def loss(self, params, batch, rng, frozen, extra):
    """Velocity MSE (+ cosine) + ``repa.coef`` x REPA on the batch's codes scaled by the latent scale."""
    c = self.config
    x1 = self._codes(batch, frozen) * extra["latent_scale"]
    target = None
    if self.target is not None:
      target = self.target.features(frozen["repa"], batch["image"], self.grid)
    k_loss, k_drop = jax.random.split(rng)

    def velocity(x, t, y):
      return self.module.apply({"params": params}, x, t, y, train=True, return_repa=target is not None,
                               rngs={"dropout": k_drop})

    return transport.flow_matching_loss(
        velocity, k_loss, x1, batch["label"], repa_target=target, proj_coef=c.repa.coef,
        use_cosine_loss=c.transport.use_cosine_loss, time_kind=c.transport.time_kind, mu=c.transport.mu,
        sigma=c.transport.sigma, shift=c.transport.shift)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, devices: list | None = None):
  return loop.run(DiTTrainer, config, workdir, schema=default_config(), devices=devices)


TRAINER = DiTTrainer

"""Tokenizer training on the shared loop: L1 + LPIPS-VGG, hinge PatchGAN with the adaptive weight.

As the reference (``ifsq/train_ddp.py`` + ``LPIPSWithDiscriminator2D``):

* generator loss ``mean|x - x_hat| + w_p * LPIPS_vgg(x, x_hat)`` (or squared error),
  ``+ lambda * (-mean D(x_hat))`` from ``disc_start`` on, with
  ``lambda = clip(|grad nll| / (|grad g| + 1e-6), 0, 1e6) * disc_weight`` taken at the
  decoder's last conv weight; plus ``codebook_weight * vq_loss`` (vq) or
  ``kl_weight * KL`` (kl);
* from ``disc_start`` on, odd steps are discriminator-only steps (hinge loss, real
  and fake through separate forward calls, so separate BatchNorm statistics);
  every other step is a generator-only step;
* AdamW for each (the generator's gradients clipped at global norm 1.0, the
  discriminator's not), EMA of the generator after generator steps only.

Differences: the discriminator is not run in generator steps before
``disc_start`` (the reference runs it and discards the output; only its
never-used running statistics changed). BatchNorm statistics cover the global
batch, not each device's share; with ``train.grad_accum_steps`` M > 1 they cover
each micro-batch (as the reference's per-GPU statistics do), and the running
statistics are updated once per micro-batch. Everything else accumulates
exactly: the adaptive weight is taken from the full batch's gradients at the
decoder's last layer, so a step over M micro-batches equals the full-batch step
whenever the micro-batches' BatchNorm statistics equal the batch's.

B batch, H W image size.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ifsq_jax import config_lib, parallel
from ifsq_jax.data import pipeline as pipeline_lib
from ifsq_jax.eval import reconstruction as recon_lib
from ifsq_jax.models import pretrained
from ifsq_jax.models.conv import IMPLS
from ifsq_jax.models.discriminator import PatchDiscriminator
from ifsq_jax.models.tokenizer import BOTTLENECKS, Tokenizer, TokenizerConfig, conv_out
from ifsq_jax.nets import lpips
from ifsq_jax.objectives import tokenizer as objective
from ifsq_jax.train import loop
from ifsq_jax.train import state as state_lib

MAX_INDEX = 2**31 - 1  # indices are int32


def default_config() -> ml_collections.ConfigDict:
  """The paper's f16-d4 iFSQ run (spec 2.8 / 6.1-6.2)."""
  c = config_lib.add_image_data(config_lib.base_config())
  c.task = "tokenizer"
  c.seed = 1234
  c.train.num_steps = 1_000_000
  c.train.global_batch_size = 128
  c.train.log_every = 100
  c.train.eval_every = 5000
  c.train.image_every = 5000
  c.train.ema_decay = 0.999
  c.checkpoint.every = 5000
  c.optimizer.lr = 1e-4
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999
  c.optimizer.weight_decay = 0.0
  c.optimizer.grad_clip_norm = 1.0
  c.data.image_size = 256
  c.data.transform = "resize_crop_flip"
  c.data.eval_examples = 64

  # Every architecture field of TokenizerConfig (the image size comes from data.image_size).
  c.model = config_lib.from_dataclass(TokenizerConfig(), exclude=("resolution",))

  c.loss = ml_collections.ConfigDict()
  c.loss.rec_type = "l1"  # "l1" | "l2"
  c.loss.perceptual_weight = 1.0
  c.loss.disc_start = 50_000
  c.loss.disc_weight = 0.5
  c.loss.disc_factor = 1.0
  c.loss.disc_ndf = 64
  c.loss.disc_layers = 4
  c.loss.kl_weight = 1e-6
  c.loss.codebook_weight = 1.0
  return c


def small_cpu_config(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Turns a tokenizer config into the CPU-sized run on the embedded images (quickstart, ``tiny``)."""
  c.data.name = "embedded"
  c.data.workers = 0
  c.data.image_size = 32
  c.data.eval_examples = 64
  c.train.compute_dtype = "float32"
  c.train.global_batch_size = 16
  c.train.num_steps = 600
  c.train.log_every = 50
  c.train.eval_every = c.train.image_every = c.checkpoint.every = 300
  c.train.ema_decay = 0.99
  c.optimizer.lr = 1e-3
  c.model.hidden_size = 32
  c.model.hidden_size_mult = (1, 2, 2)
  c.model.num_res_blocks = 1
  c.model.downsample = (True, True, False)
  c.model.upsample = (False, True, True)
  c.loss.disc_start = 400
  c.loss.disc_ndf = 16
  c.loss.disc_layers = 2
  return c


model_config = pretrained.model_config  # the architecture of a tokenizer run's config


def _latent_and_encoding(module: Tokenizer, x: jax.Array, train: bool):
  """(pre-bottleneck latent (B, h, w, d) float32, bottleneck output): the latent as the bound sees it."""
  z = module.latent(x, train)
  return z, module.quantize(z, train=train)


class TokenizerTrainer(loop.Trainer):
  """Generator and discriminator steps of the tokenizer."""

  @classmethod
  def validate(cls, config):
    config_lib.validate_image_data(config)
    m, l = config.model, config.loss
    config_lib.require_choice(config, "model.bottleneck", BOTTLENECKS)
    config_lib.require_choice(config, "loss.rec_type", objective.REC_TYPES)
    for key in ("hidden_size", "hidden_size_mult", "num_res_blocks", "z_channels", "embed_dim", "vq_codebook_size",
                "attn_resolutions"):
      config_lib.require_range(config, f"model.{key}", 1)
    if m.bottleneck in ("ifsq", "fsq"):
      bad = [v for v in m.levels if v < 2]
      if bad or len(m.levels) != m.embed_dim:
        raise config_lib.ConfigError(
            f"config.model.levels={tuple(m.levels)} must give embed_dim={m.embed_dim} level counts, each >= 2.")
      groups = tuple(m.group_sizes) or (len(m.levels),)
      if sum(groups) != len(m.levels) or min(groups) < 1:
        raise config_lib.ConfigError(f"config.model.group_sizes={tuple(m.group_sizes)} must be positive and sum to "
                                     f"the {len(m.levels)} channels of config.model.levels (or () for one index).")
      start = 0
      for g in groups:
        size = int(np.prod(m.levels[start:start + g], dtype=np.float64))
        start += g
        if size > MAX_INDEX:
          raise config_lib.ConfigError(
              f"config.model.levels={tuple(m.levels)} with group_sizes={tuple(m.group_sizes)} has a codebook of "
              f"{size:,} codes, more than int32 indices hold; split the channels into index groups, e.g. "
              f"config.model.group_sizes=(2, 2).")
    for key in ("disc_layers", "disc_ndf"):
      if l[key] < 1:
        raise config_lib.ConfigError(f"config.loss.{key}={l[key]} must be >= 1.")
    if l.disc_start < 0:
      raise config_lib.ConfigError(f"config.loss.disc_start={l.disc_start} must be >= 0.")
    for key in ("perceptual_weight", "disc_weight", "disc_factor", "kl_weight", "codebook_weight"):
      config_lib.require_range(config, f"loss.{key}", 0)
    config_lib.require_range(config, "model.dropout", 0, 1, high_open=True)
    config_lib.require_range(config, "model.vq_beta", 0)
    config_lib.require_choice(config, "model.conv_impl", IMPLS)
    # Every feature map of the encoder and decoder goes through GroupNorm(32).
    widths = [m.hidden_size] + [m.hidden_size * k for k in m.hidden_size_mult]
    if any(w % 32 for w in widths):
      raise config_lib.ConfigError(
          f"config.model.hidden_size={m.hidden_size} with hidden_size_mult={tuple(m.hidden_size_mult)} gives widths "
          f"{widths}; GroupNorm(32) needs each to be a multiple of 32.")
    try:
      cfg = model_config(config)
    except (ValueError, TypeError) as e:
      raise config_lib.ConfigError(f"config.model: {e}") from None
    if config.data.image_size % cfg.downsample_factor:
      raise config_lib.ConfigError(
          f"config.data.image_size={config.data.image_size} must be a multiple of the tokenizer's downsampling factor "
          f"{cfg.downsample_factor} (config.model.downsample={tuple(m.downsample)}).")

  def __init__(self, config, mesh):
    super().__init__(config, mesh)
    self.cfg = model_config(config)
    dtype = jnp.bfloat16 if config.train.compute_dtype == "bfloat16" else jnp.float32
    impl = self.cfg.conv_impl
    self.model = Tokenizer(self.cfg, dtype=dtype, compute_stats=self.cfg.bottleneck in ("ifsq", "fsq", "vq"))
    self.disc = PatchDiscriminator(config.loss.disc_ndf, config.loss.disc_layers, dtype=dtype, conv_impl=impl)
    self.lpips = lpips.LPIPS("vgg16", conv_impl=impl)
    o = config.optimizer
    self.tx_gen = state_lib.make_optimizer(o, config.train.num_steps)
    no_clip = ml_collections.ConfigDict(o.to_dict())
    no_clip.grad_clip_norm = 0.0
    self.tx_disc = state_lib.make_optimizer(no_clip, config.train.num_steps)
    self._reconstruct = jax.jit(lambda p, x: self.model.apply({"params": p}, x)[0])
    fsq = self._fsq = self.cfg.bottleneck in ("ifsq", "fsq")
    indices = self.cfg.bottleneck in ("ifsq", "fsq", "vq")

    def eval_step(p, x):
      recon, out = self.model.apply({"params": p}, x)
      return recon, out.codes if fsq else None, out.indices if indices else None

    self._eval_step = jax.jit(eval_step)

  @functools.cached_property
  def _eval_data(self) -> pipeline_lib.Pipeline:
    """The validation images, opened on first use (compiling needs no data)."""
    return pipeline_lib.build_pipeline(self.config, self.config.data.eval_split, train=False, batch_size=8)

  def train_data(self, process_index, process_count):
    c = self.config
    return pipeline_lib.build_pipeline(c, c.data.train_split, train=True, process_index=process_index,
                                       process_count=process_count)

  def batch_shapes(self):
    s, b = self.config.data.image_size, self.config.train.global_batch_size
    # uint8 images: made float32 in [-1, 1] inside the step (a quarter of the bytes to the devices)
    return {"image": jax.ShapeDtypeStruct((b, s, s, 3), jnp.uint8), "label": jax.ShapeDtypeStruct((b,), jnp.int32)}

  def frozen(self):
    return {"lpips": lpips.load_params("vgg16")}

  def init_state(self, rng):
    s = self.config.data.image_size
    x = jnp.zeros((1, s, s, 3))
    k_gen, k_disc, k_sample = jax.random.split(rng, 3)
    gen = self.model.init({"params": k_gen, "sample": k_sample}, x)["params"]
    disc = self.disc.init(k_disc, jnp.zeros((2, s, s, 3)), train=True)
    return state_lib.TrainState(
        step=jnp.zeros((), jnp.int32), params={"gen": gen, "disc": disc["params"]},
        opt_state={"gen": self.tx_gen.init(gen), "disc": self.tx_disc.init(disc["params"])},
        ema_params=jax.tree.map(jnp.copy, gen), extra={"disc_stats": disc["batch_stats"]})

  def step_kind(self, step: int) -> str:
    """Generator steps only before ``disc_start``; then odd steps train the discriminator."""
    if step < self.config.loss.disc_start:
      return "gen"
    return "disc" if step % 2 == 1 else "gen_gan"

  # ------------------------------------------------------------------ losses

  def _generator(self, gen, x, rng):
    """(reconstruction, bottleneck loss) as a function of the generator's parameters; aux (latent, encoding, features)."""
    z, enc = self.model.apply({"params": gen}, x, True, rngs={"sample": rng, "dropout": rng},
                              method=_latent_and_encoding)
    feats = self.model.apply({"params": gen}, enc.codes, train=True, rngs={"dropout": rng},
                             method=Tokenizer.decode_features)
    recon = conv_out(feats, gen["decoder"]["conv_out"]["kernel"], gen["decoder"]["conv_out"]["bias"],
                     self.cfg.conv_impl)
    return (recon, jnp.asarray(enc.loss, jnp.float32)), (z, enc, feats)

  def _bottleneck_weight(self) -> float:
    l = self.config.loss
    return {"vq": l.codebook_weight, "kl": l.kl_weight}.get(self.cfg.bottleneck, 0.0)

  def _generator_parts(self, gen, disc, x, rng, disc_stats, lpips_params, with_gan: bool, combine: bool):
    """One (micro-)batch of the generator step: losses, gradients and metrics.

    Every loss term depends on the parameters through the reconstruction (and
    the bottleneck loss), so the losses are differentiated at the
    reconstruction once and pulled back through the generator. With
    ``combine`` (the whole batch at once) the adaptive weight is taken here and
    one pullback gives the gradients of ``nll + w_b * bottleneck + lambda * g``
    (``lambda`` held constant). Without it (one micro-batch of several) the nll
    and GAN parts are pulled back apart, with their gradients at the decoder's
    last layer, so the caller takes ``lambda`` from the whole batch's.

    Returns:
      (dict of values to average over micro-batches, disc batch statistics).
    """
    l = self.config.loss
    (recon, bottleneck), pullback, (z, enc, feats) = jax.vjp(lambda p: self._generator(p, x, rng), gen,
                                                             has_aux=True)

    def nll_fn(r):
      rec = objective.reconstruction_loss(x, r, l.rec_type)
      if not l.perceptual_weight:  # LPIPS-VGG costs more than a small tokenizer: not run when unweighted
        return rec, (rec, jnp.zeros((), jnp.float32))
      perceptual = jnp.mean(self.lpips.apply(lpips_params, x, r))
      return rec + l.perceptual_weight * perceptual, (rec, perceptual)

    (nll, (rec, perceptual)), d_recon = jax.value_and_grad(nll_fn, has_aux=True)(recon)
    w_b = jnp.asarray(self._bottleneck_weight(), jnp.float32)
    out = {"metrics": {"rec_loss": rec, "lpips": perceptual, "nll": nll, "bottleneck_loss": bottleneck,
                       **self._latent_metrics(z, enc)}}
    if not with_gan:
      out["grads"] = pullback((d_recon, w_b))[0]
      return out, disc_stats

    def g_fn(r):
      logits, upd = self.disc.apply({"params": disc, "batch_stats": disc_stats}, r, train=True,
                                    mutable=["batch_stats"])
      return objective.generator_loss(logits), (logits, upd["batch_stats"])

    (g, (logits_fake, disc_stats)), d_g = jax.value_and_grad(g_fn, has_aux=True)(recon)
    dec = gen["decoder"]["conv_out"]
    last_layer = jax.vjp(lambda w_: conv_out(jax.lax.stop_gradient(feats), w_, dec["bias"], self.cfg.conv_impl),
                         dec["kernel"])[1]
    out["metrics"].update(g_loss=g, logits_fake=jnp.mean(logits_fake))
    if combine:
      lam = objective.adaptive_weight(last_layer(d_recon)[0], last_layer(d_g)[0], l.disc_weight)
      out["lambda"] = lam
      out["grads"] = pullback((d_recon + lam * l.disc_factor * d_g, w_b))[0]
    else:
      out["last_nll"], out["last_g"] = last_layer(d_recon)[0], last_layer(d_g)[0]
      out["grads_nll"] = pullback((d_recon, w_b))[0]
      out["grads_g"] = pullback((d_g, jnp.zeros_like(w_b)))[0]
    return out, disc_stats

  def _latent_metrics(self, z, enc) -> dict[str, jax.Array]:
    """Per-channel mean / std of the latent before the bound (the scale iFSQ's argument is about), code stats."""
    latent = jax.lax.stop_gradient(z).reshape(-1, z.shape[-1])
    metrics = {}
    for i in range(min(latent.shape[-1], 8)):
      metrics[f"latent_mean/{i}"] = jnp.mean(latent[:, i])
      metrics[f"latent_std/{i}"] = jnp.std(latent[:, i])
    for k in ("usage", "perplexity"):
      if k in enc.stats:
        metrics[f"codes/{k}"] = jnp.mean(enc.stats[k])
    if "channel_entropy_bits" in enc.stats:
      for i, e in enumerate(enc.stats["channel_entropy_bits"][:8]):
        metrics[f"codes/entropy_bits/{i}"] = e
    return metrics

  def generator_loss_and_grads(self, gen, batch, rng, state, with_gan, lpips_params):
    """The generator's loss, its gradients, metrics and the discriminator's updated BatchNorm statistics,
    over ``train.grad_accum_steps`` micro-batches.

    Returns:
      (total loss, gradients like ``gen``, metrics, disc batch statistics).
    """
    l = self.config.loss
    m = self.config.train.grad_accum_steps
    disc = state.params["disc"]

    def micro(mb, r, stats):
      return self._generator_parts(gen, disc, mb["image"], r, stats, lpips_params, with_gan, combine=m == 1)

    out, disc_stats = state_lib.accumulate(micro, {"image": batch["image"]}, rng, m, state.extra["disc_stats"])
    metrics = out["metrics"]
    total = metrics["nll"] + self._bottleneck_weight() * metrics["bottleneck_loss"]
    grads = out.get("grads")
    if with_gan:
      lam = out["lambda"] if m == 1 else objective.adaptive_weight(out["last_nll"], out["last_g"], l.disc_weight)
      if grads is None:
        grads = jax.tree.map(lambda a, b: a + lam * l.disc_factor * b, out["grads_nll"], out["grads_g"])
      total = total + lam * l.disc_factor * metrics["g_loss"]
      metrics["adaptive_weight"] = lam
    metrics["total_loss"] = total
    return total, grads, metrics, disc_stats

  def discriminator_loss_and_grads(self, state, batch, rng):
    """The hinge loss, its gradients like ``params["disc"]``, metrics and updated statistics (micro-batched)."""
    l = self.config.loss
    gen, disc = state.params["gen"], state.params["disc"]

    def micro(mb, r, stats):
      del r
      x = mb["image"]
      recon = jax.lax.stop_gradient(self.model.apply({"params": gen}, x)[0])

      def loss_fn(dp):
        real, upd = self.disc.apply({"params": dp, "batch_stats": stats}, x, train=True, mutable=["batch_stats"])
        fake, upd = self.disc.apply({"params": dp, "batch_stats": upd["batch_stats"]}, recon, train=True,
                                    mutable=["batch_stats"])
        loss = l.disc_factor * objective.hinge_d_loss(real, fake)
        return loss, (upd["batch_stats"], jnp.mean(real), jnp.mean(fake))

      (loss, (stats, real, fake)), grads = jax.value_and_grad(loss_fn, has_aux=True)(disc)
      return {"loss": loss, "real": real, "fake": fake, "grads": grads}, stats

    out, stats = state_lib.accumulate(micro, {"image": batch["image"]}, rng, self.config.train.grad_accum_steps,
                                      state.extra["disc_stats"])
    metrics = {"disc/loss": out["loss"], "disc/logits_real": out["real"], "disc/logits_fake": out["fake"]}
    return out["loss"], out["grads"], metrics, stats

  def train_steps(self):
    ema_decay = self.config.train.ema_decay

    def gen_step(state, batch, key, frozen, with_gan):
      loss, grads, metrics, disc_stats = self.generator_loss_and_grads(state.params["gen"], batch, key, state,
                                                                      with_gan, frozen["lpips"])
      norm = optax.tree.norm(grads)

      def update(s):
        updates, opt = self.tx_gen.update(grads, s.opt_state["gen"], s.params["gen"])
        gen = optax.apply_updates(s.params["gen"], updates)
        return s.replace(params={**s.params, "gen": gen}, opt_state={**s.opt_state, "gen": opt},
                         ema_params=state_lib.ema_update(s.ema_params, gen, ema_decay),
                         extra={"disc_stats": disc_stats})

      new, nonfinite = state_lib.apply_if_finite(state, loss, norm, update)
      return new, {**metrics, "loss": loss, "gen/loss": loss, "gen/grad_norm": norm, "nonfinite": nonfinite}

    def disc_step(state, batch, key, frozen):
      del frozen
      loss, grads, metrics, stats = self.discriminator_loss_and_grads(state, batch, key)
      norm = optax.tree.norm(grads)

      def update(s):
        updates, opt = self.tx_disc.update(grads, s.opt_state["disc"], s.params["disc"])
        return s.replace(params={**s.params, "disc": optax.apply_updates(s.params["disc"], updates)},
                         opt_state={**s.opt_state, "disc": opt}, extra={"disc_stats": stats})

      new, nonfinite = state_lib.apply_if_finite(state, loss, norm, update)
      return new, {**metrics, "disc/grad_norm": norm, "nonfinite": nonfinite}

    return {"gen": lambda s, b, k, f: gen_step(s, b, k, f, False),
            "gen_gan": lambda s, b, k, f: gen_step(s, b, k, f, True), "disc": disc_step}

  # --------------------------------------------------------------- evaluation

  def evaluate(self, state, step):
    """Reconstruction metrics of the EMA weights on the first ``data.eval_examples`` validation images."""
    del step
    c = self.config
    metrics = recon_lib.ReconstructionMetrics(self.cfg.index_sizes, fsq=self.cfg.fsq if self._fsq else None)
    out = recon_lib.evaluate_split(lambda x: self._eval_step(state.ema_params, x), self.mesh, self._eval_data.source,
                                   c.data.image_size, metrics, batch=c.train.global_batch_size // jax.process_count(),
                                   max_examples=c.data.eval_examples)
    return {k: v for k, v in out.items() if np.ndim(v) == 0}

  def image_rows(self, state):
    x = self._eval_data.batch(0)["image"][:8]  # the same on every process
    recon = self._reconstruct(state.ema_params, jax.device_put(x, parallel.replicated(self.mesh)))
    return [x, np.clip(recon_lib.to_host(recon), -1, 1)]


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, devices: list | None = None):
  state = loop.run(TokenizerTrainer, config, workdir, schema=default_config(), devices=devices)
  return state


TRAINER = TokenizerTrainer

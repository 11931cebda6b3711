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
batch, not each device's share.

B batch, H W image size.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ifsq_jax import config_lib, parallel
from ifsq_jax.data import pipeline as pipeline_lib
from ifsq_jax.eval import reconstruction as recon_lib
from ifsq_jax.losses import gan
from ifsq_jax.models.discriminator import PatchDiscriminator
from ifsq_jax.models.tokenizer import Tokenizer, TokenizerConfig, conv_out
from ifsq_jax.nets import lpips
from ifsq_jax.train import loop
from ifsq_jax.train import state as state_lib


def default_config() -> ml_collections.ConfigDict:
  """The paper's f16-d4 iFSQ run (spec 2.8 / 6.1-6.2)."""
  c = config_lib.base_config()
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

  c.model = ml_collections.ConfigDict()
  m = TokenizerConfig()
  c.model.hidden_size = m.hidden_size
  c.model.hidden_size_mult = m.hidden_size_mult
  c.model.num_res_blocks = m.num_res_blocks
  c.model.z_channels = m.z_channels
  c.model.embed_dim = m.embed_dim
  c.model.downsample = m.downsample
  c.model.upsample = m.upsample
  c.model.attn_resolutions = m.attn_resolutions
  c.model.dropout = m.dropout
  c.model.bottleneck = m.bottleneck
  c.model.levels = m.levels
  c.model.group_sizes = ()  # () for one index per token
  c.model.vq_codebook_size = m.vq_codebook_size
  c.model.vq_beta = m.vq_beta

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


def model_config(c: ml_collections.ConfigDict) -> TokenizerConfig:
  m = c.model
  return TokenizerConfig(
      hidden_size=m.hidden_size, hidden_size_mult=tuple(m.hidden_size_mult), num_res_blocks=m.num_res_blocks,
      z_channels=m.z_channels, embed_dim=m.embed_dim, downsample=tuple(m.downsample), upsample=tuple(m.upsample),
      attn_resolutions=tuple(m.attn_resolutions), resolution=c.data.image_size, dropout=m.dropout,
      bottleneck=m.bottleneck, levels=tuple(m.levels), group_sizes=tuple(m.group_sizes) or None,
      vq_codebook_size=m.vq_codebook_size, vq_beta=m.vq_beta)


class TokenizerTrainer(loop.Trainer):
  """Generator and discriminator steps of the tokenizer."""

  def __init__(self, config, mesh):
    super().__init__(config, mesh)
    self.cfg = model_config(config)
    dtype = jnp.bfloat16 if config.train.compute_dtype == "bfloat16" else jnp.float32
    self.model = Tokenizer(self.cfg, dtype=dtype, compute_stats=self.cfg.bottleneck in ("ifsq", "fsq", "vq"))
    self.disc = PatchDiscriminator(config.loss.disc_ndf, config.loss.disc_layers, dtype=dtype)
    self.lpips = lpips.LPIPS("vgg16")
    self.lpips_params = lpips.load_params("vgg16")
    o = config.optimizer
    self.tx_gen = state_lib.make_optimizer(o, config.train.num_steps)
    no_clip = ml_collections.ConfigDict(o.to_dict())
    no_clip.grad_clip_norm = 0.0
    self.tx_disc = state_lib.make_optimizer(no_clip, config.train.num_steps)
    self._eval_data = pipeline_lib.build_pipeline(config, config.data.eval_split, train=False, batch_size=8)
    self._reconstruct = jax.jit(lambda p, x: self.model.apply({"params": p}, x)[0])
    fsq = self._fsq = self.cfg.bottleneck in ("ifsq", "fsq")
    indices = self.cfg.bottleneck in ("ifsq", "fsq", "vq")

    def eval_step(p, x):
      recon, out = self.model.apply({"params": p}, x)
      return recon, out.codes if fsq else None, out.indices if indices else None

    self._eval_step = jax.jit(eval_step)

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

  def _nll(self, x, recon):
    rec = jnp.abs(x - recon) if self.config.loss.rec_type == "l1" else jnp.square(x - recon)
    p = self.lpips.apply(self.lpips_params, x, recon)
    return jnp.mean(rec) + self.config.loss.perceptual_weight * jnp.mean(p), jnp.mean(rec), jnp.mean(p)

  def _generator(self, gen, x, rng):
    """(reconstruction, bottleneck loss) as a function of the generator's parameters; aux (encoding, features)."""
    enc = self.model.apply({"params": gen}, x, train=True, rngs={"sample": rng, "dropout": rng},
                           method=Tokenizer.encode)
    feats = self.model.apply({"params": gen}, enc.codes, train=True, rngs={"dropout": rng},
                             method=Tokenizer.decode_features)
    recon = conv_out(feats, gen["decoder"]["conv_out"]["kernel"], gen["decoder"]["conv_out"]["bias"])
    return (recon, jnp.asarray(enc.loss, jnp.float32)), (enc, feats)

  def generator_loss_and_grads(self, gen, batch, rng, state, with_gan):
    """The generator's loss, its gradients, metrics and the discriminator's updated BatchNorm statistics.

    Every loss term depends on the parameters through the reconstruction (and the
    bottleneck loss), so the losses are differentiated at the reconstruction once
    and pulled back through the generator once. The adaptive weight reuses the
    same reconstruction gradients at the decoder's last conv, instead of two more
    backward passes through LPIPS and the discriminator; the gradients equal those
    of ``nll + w_b * bottleneck + lambda * g`` with ``lambda`` held constant.

    Returns:
      (total loss, gradients like ``gen``, metrics, disc batch statistics).
    """
    l = self.config.loss
    x = batch["image"]
    (recon, bottleneck), pullback, (enc, feats) = jax.vjp(lambda p: self._generator(p, x, rng), gen, has_aux=True)

    def nll_fn(r):
      nll, rec, perceptual = self._nll(x, r)
      return nll, (rec, perceptual)

    (nll, (rec, perceptual)), d_recon = jax.value_and_grad(nll_fn, has_aux=True)(recon)
    metrics = {"rec_loss": rec, "lpips": perceptual, "nll": nll, "bottleneck_loss": bottleneck}
    w_b = {"vq": l.codebook_weight, "kl": l.kl_weight}.get(self.cfg.bottleneck, 0.0)
    total = nll + w_b * bottleneck
    disc_stats = state.extra["disc_stats"]
    if with_gan:
      def g_fn(r):
        logits, upd = self.disc.apply({"params": state.params["disc"], "batch_stats": disc_stats}, r,
                                      train=True, mutable=["batch_stats"])
        return gan.generator_loss(logits), (logits, upd["batch_stats"])

      (g, (logits_fake, disc_stats)), d_g = jax.value_and_grad(g_fn, has_aux=True)(recon)
      dec = gen["decoder"]["conv_out"]
      last_layer = jax.vjp(lambda w_: conv_out(jax.lax.stop_gradient(feats), w_, dec["bias"]), dec["kernel"])[1]
      lam = gan.adaptive_weight(last_layer(d_recon)[0], last_layer(d_g)[0], l.disc_weight)
      total = total + lam * l.disc_factor * g
      d_recon = d_recon + lam * l.disc_factor * d_g
      metrics.update(g_loss=g, adaptive_weight=lam, logits_fake=jnp.mean(logits_fake))
    grads = pullback((d_recon, jnp.asarray(w_b, jnp.float32)))[0]
    latent = jax.lax.stop_gradient(enc.codes).reshape(-1, enc.codes.shape[-1])
    for i in range(latent.shape[-1]):
      metrics[f"latent_mean/{i}"] = jnp.mean(latent[:, i])
      metrics[f"latent_std/{i}"] = jnp.std(latent[:, i])
    for k in ("usage", "perplexity"):
      if k in enc.stats:
        metrics[f"codes/{k}"] = jnp.mean(enc.stats[k])
    if "channel_entropy_bits" in enc.stats:
      for i, e in enumerate(enc.stats["channel_entropy_bits"][:8]):
        metrics[f"codes/entropy_bits/{i}"] = e
    metrics["total_loss"] = total
    return total, grads, metrics, disc_stats

  def train_steps(self):
    l = self.config.loss

    def gen_step(state, batch, key, with_gan):
      rng = jax.random.fold_in(key, state.step)
      loss, grads, metrics, disc_stats = self.generator_loss_and_grads(state.params["gen"], batch, rng, state,
                                                                      with_gan)
      updates, opt = self.tx_gen.update(grads, state.opt_state["gen"], state.params["gen"])
      gen = optax.apply_updates(state.params["gen"], updates)
      new = state.replace(step=state.step + 1, params={**state.params, "gen": gen},
                          opt_state={**state.opt_state, "gen": opt},
                          ema_params=state_lib.ema_update(state.ema_params, gen, self.config.train.ema_decay),
                          extra={"disc_stats": disc_stats})
      return new, {**metrics, "loss": loss, "gen/loss": loss, "grad_norm": optax.tree.norm(grads)}

    def disc_step(state, batch, key):
      del key
      x = batch["image"]
      recon = jax.lax.stop_gradient(self.model.apply({"params": state.params["gen"]}, x)[0])

      def loss_fn(dp):
        stats = state.extra["disc_stats"]
        real, upd = self.disc.apply({"params": dp, "batch_stats": stats}, x, train=True, mutable=["batch_stats"])
        fake, upd = self.disc.apply({"params": dp, "batch_stats": upd["batch_stats"]}, recon, train=True,
                                    mutable=["batch_stats"])
        loss = l.disc_factor * gan.hinge_d_loss(real, fake)
        return loss, (upd["batch_stats"], jnp.mean(real), jnp.mean(fake))

      (loss, (stats, real, fake)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params["disc"])
      updates, opt = self.tx_disc.update(grads, state.opt_state["disc"], state.params["disc"])
      new = state.replace(step=state.step + 1,
                          params={**state.params, "disc": optax.apply_updates(state.params["disc"], updates)},
                          opt_state={**state.opt_state, "disc": opt}, extra={"disc_stats": stats})
      return new, {"loss": loss, "disc/loss": loss, "logits_real": real, "disc/logits_fake": fake,
                   "grad_norm": optax.tree.norm(grads)}

    return {"gen": lambda s, b, k: gen_step(s, b, k, False), "gen_gan": lambda s, b, k: gen_step(s, b, k, True),
            "disc": disc_step}

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

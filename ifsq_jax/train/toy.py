"""A tiny FSQ autoencoder on the embedded images: the test vehicle of the shared loop.

It exercises everything the real trainers use (logically sharded convs and
Dense layers, an FSQ bottleneck, gradient accumulation, EMA, evaluation and
image grids) at a size that trains in seconds on CPU. It is not a tokenizer of
the paper; see the ``tokenizer`` task for that.

B batch, H W image size, C channels.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ifsq_jax import config_lib, parallel
from ifsq_jax.data import pipeline as pipeline_lib
from ifsq_jax.quantizers import FSQ, FSQBottleneck
from ifsq_jax.train import loop
from ifsq_jax.train import state as state_lib


def default_config() -> ml_collections.ConfigDict:
  c = config_lib.add_image_data(config_lib.base_config())
  c.task = "toy"
  c.train.num_steps = 50
  c.train.log_every = 10
  c.checkpoint.every = 25
  c.optimizer.lr = 3e-3
  c.train.ema_decay = 0.9
  c.model = ml_collections.ConfigDict()
  c.model.width = 32
  c.model.mlp_width = 128
  c.model.levels = (5, 5, 5, 5)
  return c


def _conv(features: int, stride: int = 1, name: str | None = None) -> nn.Conv:
  init = nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                      (parallel.KERNEL_H, parallel.KERNEL_W, parallel.CONV_IN, parallel.CONV_OUT))
  return nn.Conv(features, (3, 3), strides=stride, padding="SAME", kernel_init=init, name=name)


def _dense(features: int, names: tuple[str, str], name: str) -> nn.Dense:
  return nn.Dense(features, kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), names), name=name)


class ToyAutoencoder(nn.Module):
  """(B, H, W, 3) -> codes (B, H/4, W/4, d) -> (B, H, W, 3)."""

  width: int
  mlp_width: int
  levels: tuple[int, ...]

  @nn.compact
  def __call__(self, x: jax.Array):
    h = nn.gelu(_conv(self.width, 2, "enc0")(x))
    h = nn.gelu(_conv(self.width, 2, "enc1")(h))  # (B, H/4, W/4, C)
    h = h + _dense(self.width, (parallel.MLP, parallel.EMBED), "mlp_out")(
        nn.gelu(_dense(self.mlp_width, (parallel.EMBED, parallel.MLP), "mlp_in")(h)))
    z = _dense(len(self.levels), (parallel.EMBED, None), "to_latent")(h)
    q = FSQBottleneck(FSQ(self.levels), compute_stats=False)(z)
    h = nn.gelu(_dense(self.width, (None, parallel.EMBED), "from_latent")(q.codes))
    b, hh, ww, c = h.shape
    h = jax.image.resize(h, (b, hh * 4, ww * 4, c), "nearest")
    h = nn.gelu(_conv(self.width, 1, "dec0")(h))
    return _conv(3, 1, "dec_out")(h), q.indices


class ToyTrainer(loop.Trainer):
  """L1 reconstruction with an FSQ bottleneck."""

  def __init__(self, config, mesh):
    super().__init__(config, mesh)
    m = config.model
    self.model = ToyAutoencoder(m.width, m.mlp_width, tuple(m.levels))
    self.tx = state_lib.make_optimizer(config.optimizer, config.train.num_steps)
    self._reconstruct = jax.jit(lambda params, images: self.model.apply({"params": params}, images)[0])

  @classmethod
  def validate(cls, config):
    config_lib.validate_image_data(config)
    bad = [l for l in config.model.levels if l < 2]
    if bad or not config.model.levels:
      raise config_lib.ConfigError(f"config.model.levels={tuple(config.model.levels)}: every level count must be >= 2 "
                                   "(at least one channel).")
    for key in ("width", "mlp_width"):
      config_lib.require_range(config, f"model.{key}", 1)
    # Two stride-2 convolutions down, one 4x resize up: other sizes come back at another size.
    if config.data.image_size % 4:
      raise config_lib.ConfigError(f"config.data.image_size={config.data.image_size} must be a multiple of 4 for the "
                                   "toy model (it downsamples 4x).")

  def train_data(self, process_index, process_count):
    c = self.config
    return pipeline_lib.build_pipeline(c, c.data.train_split, train=True, process_index=process_index,
                                       process_count=process_count)

  def batch_shapes(self):
    c = self.config
    s, b = c.data.image_size, c.train.global_batch_size
    # uint8 images: made float32 in [-1, 1] inside the step (a quarter of the bytes to the devices)
    return {"image": jax.ShapeDtypeStruct((b, s, s, 3), jnp.uint8), "label": jax.ShapeDtypeStruct((b,), jnp.int32)}

  @functools.cached_property
  def _eval(self) -> pipeline_lib.Pipeline:
    c = self.config
    return pipeline_lib.build_pipeline(c, c.data.eval_split, train=False, batch_size=c.data.eval_examples)

  def init_state(self, rng):
    s = self.config.data.image_size
    params = self.model.init(rng, jnp.zeros((1, s, s, 3)))["params"]
    return state_lib.create_state(params, self.tx)

  def loss_fn(self, params, batch, rng):
    del rng
    recon, _ = self.model.apply({"params": params}, batch["image"])
    loss = jnp.mean(jnp.abs(recon - batch["image"]))
    return loss, {"l1": loss}

  def train_steps(self):
    t = self.config.train

    def step(state, batch, key, frozen):
      del frozen
      loss, aux, grads = state_lib.accumulate_gradients(self.loss_fn, state.params, batch, key, t.grad_accum_steps)
      norm = optax.tree.norm(grads)
      new, nonfinite = state_lib.apply_if_finite(state, loss, norm,
                                                 lambda s: state_lib.apply_gradients(s, grads, self.tx, t.ema_decay))
      return new, {"loss": loss, "grad_norm": norm, "nonfinite": nonfinite, **aux}

    return {"train": step}

  def evaluate(self, state, step):
    batch = self._eval.batch(0)
    recon = np.asarray(self._reconstruct(state.ema_params, batch["image"]))
    mse = np.mean(((np.clip(recon, -1, 1) - batch["image"]) / 2.0) ** 2)
    return {"psnr_ema": float(10 * np.log10(1.0 / max(mse, 1e-12)))}

  def image_rows(self, state):
    images = self._eval.batch(0)["image"][:8]
    return [images, np.asarray(self._reconstruct(state.ema_params, images))]


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, devices: list | None = None
                       ) -> state_lib.TrainState:
  return loop.run(ToyTrainer, config, workdir, schema=default_config(), devices=devices)


TRAINER = ToyTrainer

"""LlamaGen with REPA on iFSQ indices: next-token prediction over the frozen tokenizer's indices.

What a step does (the reference's ``llamagen/train.py``): encode the batch's
images to indices with the frozen tokenizer (or turn extracted codes into
indices), flatten the token grid in raster order, and train the GPT
teacher-forced with the cross-entropy of every position (float32; a factorized
model sums its groups' terms) + ``repa.coef`` x REPA: the projector output at
position n (after layer ``model.encoder_depth``) aligned with the frozen
encoder's feature of patch n, the patch that position predicts.

Tokens: the tokenizer's own index layout, or FSQ indices re-split into groups
with ``tokens.group_sizes`` (the reference's ``factorized_bits``: (2, 2) turns
17^4 = 83,521 indices into 289 + 289 sub-tokens) from the same tokenizer.
``model.vocab_sizes`` must list the resulting codebook sizes.

Differences from the reference, on purpose:

* Weight decay 0.05 applies to weight matrices and embeddings by default
  (``optimizer.decay_mask = "matrices"``); the reference decays every
  parameter, norm scales included (``"all"`` reproduces it).
* The REPA target gets no gradient, and training from extracted codes works
  (the reference's offline path crashes).
* Evaluation samples get a distinct key per sample (the reference seeds every
  rank alike and repeats samples across GPUs).
* CKNNA is computed for FSQ tokenizers too (the reference computes it only
  for VQ ones), on the EMA model's own samples.

B batch, N tokens (grid * grid), G sub-token groups, V vocabulary, D width, L layers.
"""

from __future__ import annotations

import contextlib
import functools
import logging

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ifsq_jax import config_lib, parallel
from ifsq_jax.eval.cknna import cknna
from ifsq_jax.models import llamagen as llamagen_lib
from ifsq_jax.nets import repa
from ifsq_jax.objectives import autoregressive as objective
from ifsq_jax.train import generator, loop

QUICKSTART_TOKENIZER = generator.QUICKSTART_TOKENIZER
set_repa = generator.set_repa


def model_fields(size: str = "L", **overrides) -> ml_collections.ConfigDict:
  """``config.model``: the :class:`~ifsq_jax.models.llamagen.LlamaGen` fields (all but ``dtype``)."""
  fields = llamagen_lib.llamagen_config(size, **overrides)
  fields.pop("dtype", None)
  return ml_collections.ConfigDict(fields)


def default_config() -> ml_collections.ConfigDict:
  """The reference's LlamaGen-L REPA run on ImageNet 256 (``configs/llamagen_l.py`` builds on it)."""
  c = generator.add_generator_fields(config_lib.add_image_data(config_lib.base_config()))
  c.task = "llamagen"
  c.seed = 0
  c.data.image_size = 256
  c.data.transform = "adm_random_crop_flip"  # the reference's AR data: ADM random crop, flip p 0.5
  c.data.codes_dir = ""  # train on `python -m ifsq_jax.tools.extract` shards instead of encoding images
  c.data.code_flip = True  # with codes_dir: each example takes its flipped image's codes with probability 1/2
  c.data.eval_examples = 10_000  # validation crops the samples are compared with
  c.tokens = ml_collections.ConfigDict()
  c.tokens.group_sizes = ()  # () the tokenizer's indices; (2, 2): FSQ channels split into 2 index groups of 2
  c.tokens.group_weights = ()  # () all 1: weights of the groups' cross-entropies (the reference's loss_weights)
  c.model = model_fields("L")
  c.repa.coef = 2.0
  c.sample.cfg_scale = 1.0  # in-training evaluation (the reference's); the paper's samples use 2.0
  c.sample.cfg_interval = (0.0, 1.0)  # token n guided iff lo <= n / N < hi: always
  c.sample.temperature = 1.0
  c.sample.top_k = 0
  c.sample.top_p = 1.0
  c.eval.cknna = True  # CKNNA of the layers' mean-pooled features against the REPA target's (vgg16 without REPA)
  c.eval.cknna_batch = 64  # samples per CKNNA computation (the reference's per-GPU batch); scores are averaged
  c.eval.cknna_topk = 10
  c.train.global_batch_size = 256
  c.train.num_steps = 500_000
  c.train.log_every = 100
  c.train.eval_every = 25_000
  c.train.image_every = 25_000
  c.train.ema_decay = 0.9999
  c.train.compute_dtype = "bfloat16"
  c.optimizer.lr = 1e-4
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.95
  c.optimizer.weight_decay = 0.05
  c.optimizer.decay_mask = "matrices"  # "all" decays norm scales and biases too, as the reference does
  c.optimizer.grad_clip_norm = 1.0
  c.checkpoint.every = 25_000
  return c


class LlamaGenTrainer(generator.GeneratorTrainer):
  """Next-token prediction with REPA on the frozen tokenizer's indices."""

  model_class = llamagen_lib.LlamaGen

  @classmethod
  def validate_task(cls, config):
    config_lib.require_choice(config, "model.attention_impl", tuple(llamagen_lib.ATTENTION_IMPLS))
    config_lib.require_choice(config, "model.remat_policy", llamagen_lib.REMAT_POLICIES)
    m, e = config.model, config.eval
    for key in ("token_dropout_prob", "dropout_prob"):
      config_lib.require_range(config, f"model.{key}", 0, 1, high_open=True)
    config_lib.require_range(config, "model.grid_size", 1)
    config_lib.require_range(config, "model.factorized_depth", 0)
    config_lib.require_range(config, "model.vocab_sizes", 1)
    if (m.hidden_size // m.num_heads) % 4:  # the model's own _check (in validate) covers the rest of config.model
      raise config_lib.ConfigError(f"config.model.hidden_size={m.hidden_size} / num_heads={m.num_heads} must be a "
                                   "multiple of 4: 2D RoPE rotates head widths in multiples of 4.")
    config_lib.require_range(config, "tokens.group_sizes", 1)
    config_lib.require_range(config, "tokens.group_weights", 0)
    weights = tuple(config.tokens.group_weights)
    if weights and len(weights) != len(m.vocab_sizes):
      raise config_lib.ConfigError(f"config.tokens.group_weights={weights} must have one weight per token group "
                                   f"(config.model.vocab_sizes={tuple(m.vocab_sizes)}), or be () for all 1.")
    if e.cknna and not 2 <= e.cknna_topk < e.cknna_batch <= e.num_samples:
      raise config_lib.ConfigError(f"config.eval: CKNNA needs 2 <= cknna_topk ({e.cknna_topk}) < cknna_batch "
                                   f"({e.cknna_batch}) <= num_samples ({e.num_samples}); or set "
                                   "config.eval.cknna=False.")

  def __init__(self, config, mesh):
    super().__init__(config, mesh)
    # CKNNA compares the layers with the REPA target, or with VGG16 (shipped) when REPA is off.
    self.cknna_target = None
    if config.eval.cknna:
      self.cknna_target = self.target if self.target is not None else repa.load_target("vgg16")

  def tokenizer_groups(self):
    return tuple(self.config.tokens.group_sizes)

  def make_module(self):
    c = self.config
    tc = self.tokenizer.config
    grid = c.data.image_size // tc.downsample_factor
    vocab = tuple(int(v) for v in tc.index_sizes)
    if not vocab:
      raise config_lib.ConfigError(f"config.tokenizer={c.tokenizer!r} has a {tc.bottleneck!r} bottleneck, which "
                                   "gives no indices; LlamaGen needs an FSQ, iFSQ or VQ tokenizer.")
    if tuple(c.model.vocab_sizes) != vocab or c.model.grid_size != grid:
      groups = tuple(c.tokens.group_sizes)
      raise config_lib.ConfigError(
          f"config.model (vocab_sizes={tuple(c.model.vocab_sizes)}, grid_size={c.model.grid_size}) does not fit the "
          f"tokenizer's indices of {c.data.image_size}px images"
          f"{' split by config.tokens.group_sizes=' + str(groups) if groups else ''}"
          f": vocab_sizes={vocab}, grid_size={grid}.")
    fields = c.model.to_dict()
    fields["vocab_sizes"] = vocab
    return llamagen_lib.LlamaGen(**fields, dtype=self.dtype), grid

  def example_inputs(self):
    return llamagen_lib.example_inputs(self.module)

  def _uses_codes(self) -> bool:
    """From extracted shards: FSQ indices are recomputed from the codes (any grouping); others are read."""
    return self.tokenizer.config.bottleneck in ("ifsq", "fsq")

  def code_input(self):
    if self._uses_codes():
      return "codes", (self.grid, self.grid, self.tokenizer.config.embed_dim), np.float32
    return "indices", (self.grid, self.grid), np.int32

  def tokens(self, batch, frozen) -> jax.Array:
    """The batch's tokens (B, N) int32, or (B, N, G) for a factorized model, in raster order."""
    if "codes" in batch:
      idx = self.tokenizer.config.fsq.codes_to_indices(batch["codes"].astype(jnp.float32))
    elif "indices" in batch:
      idx = batch["indices"]
    else:
      idx = self.tokenizer.model.apply(frozen["tokenizer"], batch["image"], method=lambda m, x: m.encode(x).indices)
    b = idx.shape[0]
    groups = (len(self.module.vocab_sizes),) if self.module.factorized else ()
    return jax.lax.stop_gradient(idx.astype(jnp.int32).reshape((b, self.grid * self.grid) + groups))

  # -------------------------------------------------------------- objective

  def loss(self, params, batch, rng, frozen, extra):
    """Teacher-forced cross-entropy of every position (+ ``repa.coef`` x REPA)."""
    del extra
    c = self.config
    tokens = self.tokens(batch, frozen)
    target = None
    if self.target is not None:
      target = self.target.features(frozen["repa"], batch["image"], self.grid)
    out = self.module.apply({"params": params}, tokens, batch["label"], train=True, return_repa=target is not None,
                            rngs={"dropout": rng})
    logits, z = out if target is not None else (out, None)
    return objective.token_loss(logits, tokens, repa_features=z, repa_target=target, proj_coef=c.repa.coef,
                                group_weights=tuple(c.tokens.group_weights) or None)

  # ---------------------------------------------------------------- CKNNA

  @functools.cached_property
  def _cknna_features(self):
    """jit: (EMA params, target params, tokens, labels, images) -> (layer means (L + 1, B, D), target means (B, Z)).

    Layer 0 is the embeddings; layer l the residual stream after block l; each is
    mean-pooled over the N positions, as is the target's patch grid.
    """
    target = self.cknna_target

    def features(params, target_params, tokens, labels, images):
      _, state = self.module.apply({"params": params}, tokens, labels, mutable=["intermediates"])
      inter = state["intermediates"]
      layers = inter["layers"]["hidden"][0] if self.module.scan_layers else jnp.stack(
          [inter[f"layers_{i}"]["hidden"][0] for i in range(self.module.depth)])
      stream = jnp.concatenate([inter["embeddings"][0][None], layers])  # (L + 1, B, N, D)
      pooled = jnp.mean(stream.astype(jnp.float32), axis=2)
      feats = jnp.mean(target.features(target_params, jnp.clip(images, -1, 1), self.grid), axis=1)
      return pooled, feats

    return jax.jit(features)

  def sample_metric_stream(self, state, target_params=None):
    """``cknna/layer-{l}`` for l = 0, 2, ..., L: CKNNA of the layer's mean-pooled features and the target's.

    The EMA model reruns teacher-forced on its own samples; CKNNA is computed
    per batch of ``eval.cknna_batch`` samples (top-k ``eval.cknna_topk``) and
    averaged over the whole batches, as the reference does. The sampler calls'
    features are computed where the samples are and buffered on the host until
    a CKNNA batch is whole, so the batches are those of all samples in order.

    Args:
      state: The train state (its EMA params).
      target_params: The target's params; default: the devices' copy (the REPA
        target's is the steps' own).
    """
    if self.cknna_target is None:
      return None
    if target_params is None:
      target_params = self._cknna_target_on_devices
    return _CknnaStream(self, state.ema_params, target_params)

  @functools.cached_property
  def _cknna_target_on_devices(self):
    if self.target is not None and self.cknna_target is self.target:
      return self.frozen_on_devices["repa"]
    return parallel.replicate(self.cknna_target.params, self.mesh)

  def sample_metrics(self, state, samples, labels):
    """:meth:`sample_metric_stream` of host samples (``tokens`` (N, ...), ``images`` (N, H, W, 3)) and labels (N,)."""
    stream = self.sample_metric_stream(state, self.cknna_target.params if self.cknna_target else None)
    if stream is None:
      return {}
    n = self.config.eval.cknna_batch
    for start in range(0, len(labels), n):
      sl = slice(start, start + n)
      stream.add({"tokens": jnp.asarray(samples["tokens"][sl]), "images": jnp.asarray(samples["images"][sl])},
                 np.asarray(labels[sl]), len(labels[sl]))
    return stream.result()


class _CknnaStream:
  """CKNNA of an evaluation's samples, fed sampler call by call (see ``LlamaGenTrainer.sample_metric_stream``)."""

  def __init__(self, trainer: LlamaGenTrainer, params, target_params):
    self.trainer, self.params, self.target_params = trainer, params, target_params
    self.pooled: list[np.ndarray] = []  # (L + 1, b, D) per call, not yet in a whole CKNNA batch
    self.feats: list[np.ndarray] = []  # (b, Z)
    self.scores: list[list[float]] = []

  def add(self, samples, labels, keep):
    t, e = self.trainer, self.trainer.config.eval
    labels, tokens = np.asarray(labels, np.int32), samples["tokens"]
    on_mesh = isinstance(tokens, jax.Array) and isinstance(tokens.sharding, jax.sharding.NamedSharding)
    if on_mesh:  # a sampler call's arrays: labels sharded as the tokens (several processes need global arrays)
      labels = parallel.global_array(labels, t.mesh)
    program = t._cknna_features  # pylint: disable=protected-access
    with parallel.sharding_context(t.mesh, t.config.mesh.rules) if on_mesh else contextlib.nullcontext():
      pooled, feats = program(self.params, self.target_params, tokens, labels, samples["images"])
    self.pooled.append(parallel.to_host(pooled)[:, :keep])
    self.feats.append(parallel.to_host(feats)[:keep])
    pooled, feats = np.concatenate(self.pooled, axis=1), np.concatenate(self.feats)
    n = e.cknna_batch
    while len(feats) >= n:
      self.scores.append([cknna(pooled[l, :n], feats[:n], e.cknna_topk) for l in range(0, pooled.shape[0], 2)])
      pooled, feats = pooled[:, n:], feats[n:]
    self.pooled, self.feats = [pooled], [feats]

  def result(self):
    if not self.scores:
      return {}
    means = np.mean(np.asarray(self.scores), axis=0)
    logging.info("CKNNA (layers 0, 2, ...) against %s: %s", self.trainer.cknna_target.name,
                 np.round(means, 4).tolist())
    return {f"cknna/layer-{2 * i}": float(v) for i, v in enumerate(means)}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, devices: list | None = None):
  return loop.run(LlamaGenTrainer, config, workdir, schema=default_config(), devices=devices)


TRAINER = LlamaGenTrainer

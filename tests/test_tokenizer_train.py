"""Tokenizer training: G/D alternation, the disc_start switch, loss going down, resume and load_tokenizer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ifsq_jax
from conftest import REPO, apply_overrides, read_metrics, read_records
from ifsq_jax import config_lib, parallel
from ifsq_jax.models.tokenizer import conv_out
from ifsq_jax.objectives import tokenizer as gan
from ifsq_jax.train import loop, tokenizer


def tiny_config(**overrides):
  c = tokenizer.default_config()
  c.seed = 0
  c.data.image_size = 16
  c.data.eval_examples = 8
  c.train.global_batch_size = 8
  c.train.num_steps = 4
  c.train.log_every = 1
  c.train.eval_every = 0
  c.train.ema_decay = 0.9
  c.checkpoint.every = 2
  c.checkpoint.async_save = False
  c.optimizer.lr = 1e-3
  c.model.hidden_size = 32
  c.model.hidden_size_mult = (1, 1)
  c.model.num_res_blocks = 1
  c.model.downsample = (True, False)
  c.model.upsample = (False, True)
  c.model.levels = (5, 5, 5, 5)
  c.loss.disc_start = 2
  c.loss.disc_ndf = 8
  c.loss.disc_layers = 1
  return apply_overrides(c, overrides)


def _init(trainer):
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  return jax.jit(lambda k: nn.meta.unbox(trainer.init_state(k)))(jax.random.key(0))


def _leaves(t):
  return [np.asarray(x) for x in jax.tree.leaves(t)]


def test_generator_and_discriminator_steps_update_only_their_own_side():
  cfg = tiny_config()
  mesh = parallel.make_mesh(1, 1, 1, jax.devices()[:1])
  trainer = tokenizer.TokenizerTrainer(cfg, mesh)
  assert [trainer.step_kind(s) for s in range(6)] == ["gen", "gen", "gen_gan", "disc", "gen_gan", "disc"]
  state = _init(trainer)
  batch = {"image": jnp.asarray(trainer._eval_data.batch(0)["image"]), "label": jnp.zeros((8,), jnp.int32)}
  frozen = trainer.frozen()
  steps = {k: jax.jit(lambda s, b, k_, f=f: f(s, b, k_, frozen)) for k, f in trainer.train_steps().items()}
  key = jax.random.key(1)
  losses = []
  s = state
  for _ in range(3):  # the generator's loss goes down on a fixed batch
    s, m = steps["gen"](s, batch, key)
    losses.append(float(m["loss"]))
  assert losses[2] < losses[0], losses
  assert all(np.array_equal(a, b) for a, b in zip(_leaves(s.params["disc"]), _leaves(state.params["disc"])))
  g, mg = steps["gen_gan"](s, batch, key)
  assert float(mg["adaptive_weight"]) > 0 and "g_loss" in mg
  d, md = steps["disc"](g, batch, key)
  assert "disc/loss" in md and int(d.step) == int(g.step) + 1
  assert all(np.array_equal(a, b) for a, b in zip(_leaves(d.params["gen"]), _leaves(g.params["gen"])))
  assert all(np.array_equal(a, b) for a, b in zip(_leaves(d.ema_params), _leaves(g.ema_params)))
  assert not all(np.array_equal(a, b) for a, b in zip(_leaves(d.params["disc"]), _leaves(g.params["disc"])))


@pytest.mark.parametrize("bottleneck", ["ifsq", "vq"])
def test_one_pullback_gives_the_gradients_of_the_written_out_loss(bottleneck):
  """The generator's gradients equal autodiff of nll + w_b * bottleneck + lambda * g (lambda constant)."""
  cfg = tiny_config(**{"model.bottleneck": bottleneck, "model.vq_codebook_size": 16, "loss.kl_weight": 0.1,
                       "loss.codebook_weight": 0.5})
  trainer = tokenizer.TokenizerTrainer(cfg, parallel.make_mesh(1, 1, 1, jax.devices()[:1]))
  state = _init(trainer)
  batch = {"image": jnp.asarray(trainer._eval_data.batch(0)["image"])}
  rng = jax.random.key(3)
  disc_vars = {"params": state.params["disc"], "batch_stats": state.extra["disc_stats"]}
  d = lambda r: trainer.disc.apply(disc_vars, r, train=True, mutable=["batch_stats"])[0]
  w_b = {"vq": 0.5, "kl": 0.1}.get(bottleneck, 0.0)

  lpips_params = trainer.frozen()["lpips"]
  x = batch["image"]
  nll_of = lambda r: gan.reconstruction_loss(x, r) + jnp.mean(trainer.lpips.apply(lpips_params, x, r))

  def written_out(gen):
    (recon, bottleneck_loss), (_, _, feats) = trainer._generator(gen, x, rng)
    g = gan.generator_loss(d(recon))
    f, b = jax.lax.stop_gradient(feats), gen["decoder"]["conv_out"]["bias"]
    last = lambda loss: jax.grad(lambda w: loss(conv_out(f, w, b)))(gen["decoder"]["conv_out"]["kernel"])
    lam = gan.adaptive_weight(last(nll_of), last(lambda r: gan.generator_loss(d(r))), 0.5)
    return nll_of(recon) + w_b * bottleneck_loss + lam * g, lam

  (want, want_lam), want_grads = jax.jit(jax.value_and_grad(written_out, has_aux=True))(state.params["gen"])
  got, grads, metrics, _ = jax.jit(lambda p: trainer.generator_loss_and_grads(p, batch, rng, state, True,
                                                                              lpips_params))(state.params["gen"])
  np.testing.assert_allclose(got, want, rtol=1e-5)
  np.testing.assert_allclose(metrics["adaptive_weight"], want_lam, rtol=1e-4)
  if bottleneck != "ifsq":
    assert float(metrics["bottleneck_loss"]) > 0
  scale = max(float(np.abs(b).max()) for b in jax.tree.leaves(want_grads))
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6 * scale)


def test_training_resumes_and_load_tokenizer_opens_the_work_dir(tmp_path):
  tokenizer.train_and_evaluate(tiny_config(), tmp_path, devices=jax.devices()[:1])
  m = read_records(tmp_path)
  assert sorted(m) == [1, 2, 3, 4]
  assert "adaptive_weight" in m[3] and "disc/loss" in m[4] and "adaptive_weight" not in m[2]
  # The discriminator's hinge loss is logged apart from the generator's loss.
  assert "loss" in m[3] and "loss" not in m[4] and "disc/loss" not in m[3]
  assert (tmp_path / "eval.json").exists() and list((tmp_path / "images").glob("*.png"))
  state = tokenizer.train_and_evaluate(tiny_config(**{"train.num_steps": 6}), tmp_path, devices=jax.devices()[:1])
  assert sorted(read_records(tmp_path)) == [1, 2, 3, 4, 5, 6] and int(state.step) == 6
  tok = ifsq_jax.load_tokenizer(str(tmp_path))
  x = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  codes, idx = tok.encode(x), tok.encode_to_indices(x)
  assert codes.shape == (2, 8, 8, 4) and idx.shape == (2, 8, 8)
  recon = tok.decode(codes)
  expected = tok.model.apply({"params": jax.device_get(state.ema_params)}, x)[0]
  np.testing.assert_allclose(np.asarray(recon), np.asarray(expected), atol=1e-5)
  np.testing.assert_allclose(np.asarray(tok.decode_indices(idx)), np.asarray(recon), atol=1e-6)


def _one_device_trainer(cfg):
  return tokenizer.TokenizerTrainer(cfg, parallel.make_mesh(1, 1, 1, jax.devices()[:1]))


def _step(trainer, kind, state, batch):
  frozen = trainer.frozen()
  fn = trainer.train_steps()[kind]
  return jax.jit(lambda s, b: fn(s, b, jax.random.key(5), frozen))(state, batch)


@pytest.mark.parametrize("kind", ["gen", "gen_gan", "disc"])
def test_grad_accumulation_steps_equal_the_full_batch(kind):
  """M = 2 micro-batches give the full batch's loss and gradients. The batch holds each image twice, in rows 2i and
  2i + 1, so each micro-batch (rows i, i + M, ...) holds every image once and has the batch's BatchNorm statistics:
  only the accumulation can differ."""
  full = _one_device_trainer(tiny_config())
  accum = _one_device_trainer(tiny_config(**{"train.grad_accum_steps": 2}))
  images = full._eval_data.batch(0)["image"][:4]
  batch = {"image": jnp.asarray(np.repeat(images, 2, axis=0)), "label": jnp.zeros((8,), jnp.int32)}
  state = _init(full)
  key = jax.random.key(5)
  lp = full.frozen()["lpips"]
  if kind == "disc":
    fn = lambda t: jax.jit(lambda s: t.discriminator_loss_and_grads(s, batch, key))(state)
  else:
    fn = lambda t: jax.jit(lambda s: t.generator_loss_and_grads(s.params["gen"], batch, key, s, kind == "gen_gan",
                                                                lp))(state)
  (loss_a, grads_a, metrics_a, stats_a), (loss_b, grads_b, metrics_b, stats_b) = fn(full), fn(accum)
  np.testing.assert_allclose(loss_b, loss_a, rtol=1e-5)
  if kind == "gen_gan":
    np.testing.assert_allclose(metrics_b["adaptive_weight"], metrics_a["adaptive_weight"], rtol=1e-4)
  scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(grads_a))
  assert scale > 0
  for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-3, atol=1e-5 * scale)
  if kind == "gen_gan":  # running means start at 0 and are updated once per micro-batch (momentum 0.1): 0.19 vs 0.1
    means = lambda t: [np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(t) if "mean" in str(k)]
    assert means(stats_a)
    for a, b in zip(means(stats_a), means(stats_b)):
      np.testing.assert_allclose(b, 1.9 * a, rtol=1e-4, atol=1e-7)
  if kind == "disc":  # the whole step runs with accumulation too
    new, metrics = _step(accum, kind, state, batch)
    assert int(new.step) == 1 and float(metrics["nonfinite"]) == 0.0


def test_logged_latent_is_the_latent_before_the_bound():
  trainer = _one_device_trainer(tiny_config())
  state = _init(trainer)
  x = jnp.asarray(trainer._eval_data.batch(0)["image"])
  _, _, metrics, _ = jax.jit(lambda p: trainer.generator_loss_and_grads(
      p, {"image": x}, jax.random.key(1), state, False, trainer.frozen()["lpips"]))(state.params["gen"])
  z = trainer.model.apply({"params": state.params["gen"]}, x, method=tokenizer.Tokenizer.latent)
  codes = trainer.model.apply({"params": state.params["gen"]}, x)[1].codes
  for i in range(4):
    np.testing.assert_allclose(metrics[f"latent_std/{i}"], np.std(np.asarray(z)[..., i]), rtol=1e-4)
    np.testing.assert_allclose(metrics[f"latent_mean/{i}"], np.mean(np.asarray(z)[..., i]), rtol=1e-4, atol=1e-6)
  assert not np.allclose(float(metrics["latent_std/0"]), np.std(np.asarray(codes)[..., 0]), rtol=1e-2)


def test_fine_tuning_a_tokenizer_from_a_tokenizer_checkpoint(tmp_path):
  src = tokenizer.train_and_evaluate(tiny_config(), tmp_path / "src", devices=jax.devices()[:1])
  cfg = tiny_config(**{"train.num_steps": 1, "checkpoint.init_from": str(tmp_path / "src"), "loss.disc_start": 100})
  cfg.optimizer.lr = 1e-12
  tuned = tokenizer.train_and_evaluate(cfg, tmp_path / "dst", devices=jax.devices()[:1])
  assert int(tuned.step) == 1
  for a, b in zip(jax.tree.leaves(src.params), jax.tree.leaves(tuned.params)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-6)
  # The EMA continues from the source's EMA of the generator (decay 0.9, one step at lr ~0).
  for e, p, b in zip(jax.tree.leaves(src.ema_params), jax.tree.leaves(src.params["gen"]),
                     jax.tree.leaves(tuned.ema_params)):
    np.testing.assert_allclose(np.asarray(b), 0.9 * np.asarray(e) + 0.1 * np.asarray(p), atol=1e-5)
  assert int(tuned.opt_state["gen"][1][0].count) == 1  # a fresh optimizer


def test_fsdp_shards_tokenizer_and_discriminator_state_with_one_device_numbers(tmp_path):
  overrides = {"train.num_steps": 2, "loss.disc_start": 1}  # a generator step, then a discriminator step
  one = tokenizer.train_and_evaluate(tiny_config(**overrides), tmp_path / "one", devices=jax.devices()[:1])
  eight = tokenizer.train_and_evaluate(tiny_config(**overrides, **{"mesh.data": 1, "mesh.fsdp": 8}), tmp_path / "8")
  a, b = read_records(tmp_path / "one"), read_records(tmp_path / "8")
  np.testing.assert_allclose(b[1]["loss"], a[1]["loss"], rtol=2e-5)
  np.testing.assert_allclose(b[2]["disc/loss"], a[2]["disc/loss"], rtol=2e-5)
  # Adam's first moments are 0.1 x the gradients: linear in them, unlike the first update (lr x their sign).
  mu = lambda s: [x for x in jax.tree.leaves(s.opt_state) if x.ndim]
  scale = max(float(np.abs(x).max()) for x in mu(one))
  for x, y in zip(mu(one), mu(eight)):
    np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-3, atol=1e-4 * scale)

  def sharded(tree):
    return [x for x in jax.tree.leaves(tree) if x.ndim and "fsdp" in str(x.sharding.spec)]

  kernel = eight.params["gen"]["encoder"]["conv_in"]["kernel"]  # (3, 3, 3, 32): output channels over fsdp
  assert kernel.sharding.spec[-1] == "fsdp" and {s.data.shape for s in kernel.addressable_shards} == {(3, 3, 3, 4)}
  assert len(sharded(eight.params["disc"])) >= 2
  assert len(sharded(eight.ema_params)) == len(sharded(eight.params["gen"])) > 10
  assert len(sharded(eight.opt_state["gen"])) == 2 * len(sharded(eight.params["gen"]))  # Adam's mu and nu


def test_frozen_lpips_is_a_step_argument_not_a_compiled_constant():
  trainer = _one_device_trainer(tiny_config())
  state = jax.eval_shape(lambda: nn_unbox(trainer.init_state(jax.random.key(0))))
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in trainer.batch_shapes().items()}
  frozen = trainer.frozen()
  frozen_bytes = sum(x.nbytes for x in jax.tree.leaves(frozen))
  assert frozen_bytes > 50e6  # VGG16's convolutions
  fn = trainer.train_steps()["gen_gan"]
  text = jax.jit(fn).lower(state, batch, jax.random.key(0), frozen).as_text()
  assert len(text) < frozen_bytes / 20, len(text)
  # The same step with the weights captured in a closure embeds them.
  closed = jax.jit(lambda s, b, k: fn(s, b, k, frozen)).lower(state, batch, jax.random.key(0)).as_text()
  assert len(closed) > frozen_bytes


def nn_unbox(tree):
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  return nn.meta.unbox(tree)


@pytest.mark.parametrize("override,message", [
    ({"model.bottleneck": "foo"}, "config.model.bottleneck='foo' is not valid; use one of"),
    ({"model.levels": (1, 17, 17, 17)}, r"config.model.levels=\(1, 17, 17, 17\) must give embed_dim=4 level counts"),
    ({"loss.rec_type": "huber"}, r"config.loss.rec_type='huber' is not valid; use one of \('l1', 'l2'\)"),
    ({"model.levels": (257,) * 4}, "more than int32 indices hold; split the channels into index groups"),
    ({"model.conv_impl": "cudnn"}, "conv_impl='cudnn'"),
])
def test_bad_task_fields_are_one_error_naming_key_value_and_choices(override, message):
  with pytest.raises(config_lib.ConfigError, match=message):
    loop.validate(tokenizer.TokenizerTrainer, tiny_config(**override), tokenizer.default_config(), 1)


def test_eight_bit_variant_builds_with_index_groups():
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("recipe", REPO / "configs" / "ifsq_f16_d4.py")
  recipe = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(recipe)
  cfg = recipe.get_config("bits=8,tiny")
  assert tuple(cfg.model.levels) == (257,) * 4 and tuple(cfg.model.group_sizes) == (2, 2)
  loop.validate(tokenizer.TokenizerTrainer, cfg, tokenizer.default_config(), 1)
  model_cfg = tokenizer.model_config(cfg)
  assert model_cfg.index_sizes == (257**2, 257**2)
  model = tokenizer.Tokenizer(model_cfg)
  x = jnp.zeros((1, 32, 32, 3))
  params = model.init(jax.random.key(0), x)
  out = model.apply(params, x)[1]
  assert out.indices.shape == (1, 8, 8, 2) and out.indices.dtype == jnp.int32
  with pytest.raises(config_lib.ConfigError, match="unknown config variant 'bitz'"):
    recipe.get_config("bitz=3")


def test_unweighted_lpips_is_not_run():
  """perceptual_weight 0 (the quickstart) trains L1 alone, and the step program holds no LPIPS network."""
  trainer = _one_device_trainer(tiny_config(**{"loss.perceptual_weight": 0.0}))
  state = _init(trainer)
  x = jnp.asarray(trainer._eval_data.batch(0)["image"])
  lpips = trainer.frozen()["lpips"]
  fn = lambda p: trainer.generator_loss_and_grads(p, {"image": x}, jax.random.key(1), state, False, lpips)
  _, _, metrics, _ = jax.jit(fn)(state.params["gen"])
  assert float(metrics["lpips"]) == 0.0 and float(metrics["nll"]) == float(metrics["rec_loss"])
  convs = str(jax.make_jaxpr(fn)(state.params["gen"])).count("conv_general_dilated")
  with_lpips = _one_device_trainer(tiny_config())
  fn1 = lambda p: with_lpips.generator_loss_and_grads(p, {"image": x}, jax.random.key(1), state, False, lpips)
  assert str(jax.make_jaxpr(fn1)(state.params["gen"])).count("conv_general_dilated") > convs + 13

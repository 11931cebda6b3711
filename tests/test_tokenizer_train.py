"""Tokenizer training: G/D alternation, the disc_start switch, loss going down, resume and load_tokenizer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ifsq_jax
from conftest import apply_overrides, read_metrics
from ifsq_jax import parallel
from ifsq_jax.objectives import tokenizer as gan
from ifsq_jax.models.tokenizer import conv_out
from ifsq_jax.train import tokenizer


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


def _leaves(t):
  return [np.asarray(x) for x in jax.tree.leaves(t)]


def test_generator_and_discriminator_steps_update_only_their_own_side():
  cfg = tiny_config()
  mesh = parallel.make_mesh(1, 1, 1, jax.devices()[:1])
  trainer = tokenizer.TokenizerTrainer(cfg, mesh)
  assert [trainer.step_kind(s) for s in range(6)] == ["gen", "gen", "gen_gan", "disc", "gen_gan", "disc"]
  state = jax.jit(trainer.init_state)(jax.random.key(0))
  batch = {"image": jnp.asarray(trainer._eval_data.batch(0)["image"]), "label": jnp.zeros((8,), jnp.int32)}
  steps = {k: jax.jit(f) for k, f in trainer.train_steps().items()}
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
  state = jax.jit(trainer.init_state)(jax.random.key(0))
  batch = {"image": jnp.asarray(trainer._eval_data.batch(0)["image"])}
  rng = jax.random.key(3)
  disc_vars = {"params": state.params["disc"], "batch_stats": state.extra["disc_stats"]}
  d = lambda r: trainer.disc.apply(disc_vars, r, train=True, mutable=["batch_stats"])[0]
  w_b = {"vq": 0.5, "kl": 0.1}.get(bottleneck, 0.0)

  def written_out(gen):
    (recon, bottleneck_loss), (_, feats) = trainer._generator(gen, batch["image"], rng)
    nll = trainer._nll(batch["image"], recon)[0]
    g = gan.generator_loss(d(recon))
    f, b = jax.lax.stop_gradient(feats), gen["decoder"]["conv_out"]["bias"]
    last = lambda loss: jax.grad(lambda w: loss(conv_out(f, w, b)))(gen["decoder"]["conv_out"]["kernel"])
    lam = gan.adaptive_weight(last(lambda r: trainer._nll(batch["image"], r)[0]),
                              last(lambda r: gan.generator_loss(d(r))), 0.5)
    return nll + w_b * bottleneck_loss + lam * g, lam

  (want, want_lam), want_grads = jax.jit(jax.value_and_grad(written_out, has_aux=True))(state.params["gen"])
  got, grads, metrics, _ = jax.jit(lambda p: trainer.generator_loss_and_grads(p, batch, rng, state, True))(
      state.params["gen"])
  np.testing.assert_allclose(got, want, rtol=1e-5)
  np.testing.assert_allclose(metrics["adaptive_weight"], want_lam, rtol=1e-4)
  if bottleneck != "ifsq":
    assert float(metrics["bottleneck_loss"]) > 0
  scale = max(float(np.abs(b).max()) for b in jax.tree.leaves(want_grads))
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6 * scale)


def test_training_resumes_and_load_tokenizer_opens_the_work_dir(tmp_path):
  tokenizer.train_and_evaluate(tiny_config(), tmp_path, devices=jax.devices()[:1])
  m = read_metrics(tmp_path)
  assert sorted(m) == [1, 2, 3, 4]
  assert "adaptive_weight" in m[3] and "disc/loss" in m[4] and "adaptive_weight" not in m[2]
  assert (tmp_path / "eval.json").exists() and list((tmp_path / "images").glob("*.png"))
  state = tokenizer.train_and_evaluate(tiny_config(**{"train.num_steps": 6}), tmp_path, devices=jax.devices()[:1])
  assert sorted(read_metrics(tmp_path)) == [1, 2, 3, 4, 5, 6] and int(state.step) == 6
  tok = ifsq_jax.load_tokenizer(str(tmp_path))
  x = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  codes, idx = tok.encode(x), tok.encode_to_indices(x)
  assert codes.shape == (2, 8, 8, 4) and idx.shape == (2, 8, 8)
  recon = tok.decode(codes)
  expected = tok.model.apply({"params": jax.device_get(state.ema_params)}, x)[0]
  np.testing.assert_allclose(np.asarray(recon), np.asarray(expected), atol=1e-5)
  np.testing.assert_allclose(np.asarray(tok.decode_indices(idx)), np.asarray(recon), atol=1e-6)

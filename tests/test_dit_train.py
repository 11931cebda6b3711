"""The DiT trainer: latents from the frozen tokenizer, the measured latent scale, REPA, evaluation, resume, load_model."""

import dataclasses
import importlib.util
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import REPO, apply_overrides

import ifsq_jax
from ifsq_jax import config_lib, parallel
from ifsq_jax.convert import torch_io
from ifsq_jax.data import pipeline as pipeline_lib
from ifsq_jax.models.tokenizer import Tokenizer, TokenizerConfig
from ifsq_jax.tools import extract
from ifsq_jax.train import dit, loop


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
  """A small random tokenizer (32 px -> 8 x 8 x 4 codes, 17 levels) as a converted directory."""
  path = tmp_path_factory.mktemp("tok")
  cfg = TokenizerConfig(hidden_size=32, hidden_size_mult=(1, 1, 1), num_res_blocks=1, downsample=(True, True, False),
                        upsample=(False, True, True), resolution=32, levels=(17, 17, 17, 17))
  params = nn.meta.unbox(Tokenizer(cfg).init(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32))["params"])
  params = jax.tree.map(lambda p: np.asarray(p) * 2.0, params)  # spread the latent over the levels
  torch_io.save_converted(str(path), params, {"kind": "tokenizer", "model": dataclasses.asdict(cfg)})
  return str(path)


def read_lines(workdir):
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def tiny_config(tokenizer_path, **overrides):
  c = dit.default_config()
  c.tokenizer = tokenizer_path
  c.data.image_size = 32
  c.data.transform = "resize_crop_flip"
  c.data.eval_examples = 16
  c.model = dit.model_fields("S", 1, depth=2, hidden_size=32, num_heads=2, input_size=8, num_classes=9,
                             encoder_depth=1, projector_dim=32)
  dit.set_repa(c, "vgg16")
  c.train.compute_dtype = "float32"
  c.train.global_batch_size = 8
  c.train.num_steps = 4
  c.train.log_every = 1
  c.train.eval_every = c.train.image_every = 0
  c.checkpoint.every = 2
  c.checkpoint.async_save = False
  c.train.ema_decay = 0.5
  c.optimizer.lr = 1e-3
  c.latent.scale_batches = 2
  c.sample.num_steps = 2
  c.sample.batch_size = 8
  c.eval.num_samples = 8
  c.eval.grid_classes = 2
  c.eval.grid_per_class = 2
  return apply_overrides(c, overrides)


def test_dit_run_measures_the_latent_scale_evaluates_at_start_and_end_and_loads(tokenizer_dir, tmp_path):
  c = tiny_config(tokenizer_dir, **{"train.eval_at_start": True})
  state = dit.train_and_evaluate(c, str(tmp_path))
  records = read_lines(tmp_path)
  train = [r for r in records if "loss" in r]
  assert [r["step"] for r in train] == [1, 2, 3, 4]
  for r in train:
    assert np.isfinite(r["loss"]) and {"mse", "cos", "proj"} <= set(r) and r["nonfinite_steps"] == 0
    assert r["loss"] == pytest.approx(r["mse"] + r["cos"] + 0.5 * r["proj"], rel=1e-4)
  evals = [r for r in records if "eval/fd_vgg16" in r]
  assert [r["step"] for r in evals] == [0, 4]
  assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["step_00000000.png", "step_00000004.png"]

  # The scale is 1 / std of the codes of the first latent.scale_batches training batches.
  tok = ifsq_jax.load_tokenizer(tokenizer_dir)
  data = pipeline_lib.build_pipeline(c, "train", train=True)
  codes = np.concatenate([np.asarray(tok.encode(pipeline_lib.normalize(data.batch(i))["image"])) for i in range(2)])
  saved = json.loads((tmp_path / "latent.json").read_text())
  assert saved["latent_scale"] == pytest.approx(1 / codes.std(), rel=1e-4)
  assert float(state.extra["latent_scale"]) == pytest.approx(saved["latent_scale"], rel=1e-6)
  assert train[0]["latent_scale"] == pytest.approx(saved["latent_scale"], rel=1e-6)

  # The fixed position table never moves; everything else trains.
  module, params = ifsq_jax.load_model(str(tmp_path))
  init_key, _ = jax.random.split(jax.random.key(c.seed))  # the loop's init key
  init = nn.meta.unbox(dit.DiTTrainer(c, parallel.make_mesh()).init_state(init_key).params)
  np.testing.assert_array_equal(params["pos_embed"], init["pos_embed"])
  np.testing.assert_array_equal(np.asarray(state.params["pos_embed"]), init["pos_embed"])
  changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), state.params, init)
  assert sum(jax.tree.leaves(changed)) == len(jax.tree.leaves(changed)) - 1
  x, t, y = jnp.zeros((2, 8, 8, 4)), jnp.array([0.3, 0.7]), jnp.array([1, 9])
  out = module.apply({"params": params}, x, t, y)
  np.testing.assert_allclose(out, module.apply({"params": state.ema_params}, x, t, y), atol=1e-6)


def test_dit_resume_continues_exactly(tokenizer_dir, tmp_path):
  full = dit.train_and_evaluate(tiny_config(tokenizer_dir), str(tmp_path / "full"))
  dit.train_and_evaluate(tiny_config(tokenizer_dir, **{"train.num_steps": 2}), str(tmp_path / "resumed"))
  resumed = dit.train_and_evaluate(tiny_config(tokenizer_dir), str(tmp_path / "resumed"))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), full.params, resumed.params)
  assert float(resumed.extra["latent_scale"]) == float(full.extra["latent_scale"])


def test_dit_trains_from_extracted_codes_with_flips(tokenizer_dir, tmp_path):
  data = ml_collections.ConfigDict({"name": "embedded", "tfds_name": "", "path": "", "data_dir": "", "manual_dir": ""})
  extract.extract(tokenizer_dir, str(tmp_path / "codes"), data, split="train", image_size=32, shard_size=64, batch=16)
  c = tiny_config(tokenizer_dir, **{"data.codes_dir": str(tmp_path / "codes"), "train.num_steps": 2,
                                    "latent.scale": 1.25})
  dit.set_repa(c, "none")
  state = dit.train_and_evaluate(c, str(tmp_path / "run"))
  assert float(state.extra["latent_scale"]) == 1.25
  assert json.loads((tmp_path / "run" / "latent.json").read_text())["latent_scale"] == 1.25
  losses = [r["loss"] for r in read_lines(tmp_path / "run") if "loss" in r]
  assert len(losses) == 2 and np.all(np.isfinite(losses))


def test_dit_step_on_eight_devices_equals_one(tokenizer_dir):
  """One train step (DiT on extracted-style codes) with fsdp over 8 devices equals one device's."""
  rng = np.random.default_rng(0)
  batch_np = {"codes": (rng.integers(-8, 9, (8, 8, 8, 4)) / 8).astype(np.float32),
              "label": rng.integers(0, 9, (8,)).astype(np.int32)}
  results = []
  for n in (1, 8):
    c = tiny_config(tokenizer_dir, **{"mesh.fsdp": n, "mesh.data": 1, "data.codes_dir": "codes"})
    dit.set_repa(c, "none")
    mesh = parallel.make_mesh(1, n, 1, jax.devices()[:n])
    trainer = dit.DiTTrainer(c, mesh)
    shardings, _ = loop.abstract_state(trainer, jax.random.key(0), mesh, c.mesh.rules)
    with parallel.sharding_context(mesh, c.mesh.rules):
      state = jax.jit(lambda k: nn.meta.unbox(trainer.init_state(k)), out_shardings=shardings)(jax.random.key(0))
      state = state.replace(extra={"latent_scale": jnp.float32(1.5)})
      if n == 8:
        assert any(len(x.sharding.device_set) == 8 and not x.sharding.is_fully_replicated
                   for x in jax.tree.leaves(state.params))
      batch = parallel.global_batch(batch_np, mesh)
      new, metrics = jax.jit(trainer.train_steps()["train"])(state, batch, jax.random.key(3), trainer.frozen())
    results.append((jax.device_get(metrics), jax.device_get(new.params)))
  (m1, p1), (m8, p8) = results
  for k in ("loss", "mse", "cos", "grad_norm"):
    assert m8[k] == pytest.approx(m1[k], rel=1e-4, abs=1e-6), k
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-6), p1, p8)


@pytest.mark.parametrize("overrides,match", [
    ({"tokenizer": ""}, "config.tokenizer is empty.*configs/quickstart.py"),
    ({"model.z_dim": 64}, "z_dim=64.*vgg16.*256"),
    ({"repa.target": "dino"}, "repa.target='dino'"),
    ({"data.codes_dir": "somewhere"}, "REPA needs the images"),
    ({"sample.cfg_channels": 5}, "cfg_channels=5"),
    ({"repa.target": "dinov2", "model.z_dim": 768}, "repa.path is empty.*convert dinov2"),
    ({"repa.target": "dinov2", "repa.path": "nowhere"}, "repa.path='nowhere'.*no converted DINOv2.*convert dinov2"),
    ({"sample.method": "rk4"}, "sample.method='rk4'"),
    ({"model.encoder_depth": 3}, "encoder_depth=3"),
    ({"model.attention_impl": "flash"}, "attention_impl='flash'"),
    ({"model.remat_policy": "some"}, "remat_policy='some'"),
])
def test_dit_config_errors_name_the_key(tokenizer_dir, overrides, match):
  with pytest.raises(config_lib.ConfigError, match=match):
    loop.validate(dit.DiTTrainer, tiny_config(tokenizer_dir, **overrides), dit.default_config(), 1)


def test_missing_quickstart_tokenizer_names_the_command_that_makes_it(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  c = tiny_config("out/quickstart")
  with pytest.raises(config_lib.ConfigError, match="python -m ifsq_jax.main --config=configs/quickstart.py"):
    dit.DiTTrainer(c, parallel.make_mesh())


def test_tokenizer_that_does_not_fit_the_model_is_refused(tokenizer_dir):
  c = tiny_config(tokenizer_dir, **{"model.input_size": 16})
  with pytest.raises(config_lib.ConfigError, match="input_size=16.*8 x 8"):
    dit.DiTTrainer(c, parallel.make_mesh())


@pytest.fixture(scope="module")
def f16_tokenizer_dir(tmp_path_factory):
  """A narrow random tokenizer with the paper's geometry: 256 px -> 16 x 16 x 4 codes."""
  path = tmp_path_factory.mktemp("tok16")
  cfg = TokenizerConfig(hidden_size=32, hidden_size_mult=(1, 1, 1, 1, 1), num_res_blocks=1,
                        downsample=(True, True, True, True, False), upsample=(False, True, True, True, True),
                        resolution=256, levels=(17, 17, 17, 17))
  params = jax.eval_shape(lambda: Tokenizer(cfg).init(jax.random.key(0), jnp.zeros((1, 256, 256, 3))))["params"]
  params = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), nn.meta.unbox(params))
  torch_io.save_converted(str(path), params, {"kind": "tokenizer", "model": dataclasses.asdict(cfg)})
  return str(path)


# Patch 2: patch embedding and output layer x4 in the patch's 4 -> 16 values, position table for 64 tokens.
@pytest.mark.parametrize("variant,params,tokens", [("", 465_967_844, 256),
                                                     ("patch=2", 465_967_844 + 2 * 12 * 1024 + 12 - 192 * 1024, 64),
                                                     ("model=S,repa=none", None, 256)])
def test_paper_config_builds_dit_l1_with_the_reference_parameter_count(f16_tokenizer_dir, variant, params, tokens,
                                                                        monkeypatch):
  # No DINOv2 weights offline: a stand-in target of DINOv2-B's width (only the projector's shape depends on it).
  monkeypatch.setattr(dit.repa, "load_target", lambda name, path="": None if name == "none" else
                      dit.repa.RepaTarget(name, 768, {}, lambda p, x, g: jnp.zeros((x.shape[0], g * g, 768))))
  monkeypatch.setattr(dit.repa, "target_dim", lambda name, path="": 0 if name == "none" else 768)
  spec = importlib.util.spec_from_file_location("dit_l2", REPO / "configs" / "dit_l2.py")
  dit_l2 = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(dit_l2)
  c = dit_l2.get_config(variant)
  c.data.manual_dir = "ILSVRC2012_tars"  # the paper's ImageNet (validated, never read here)
  c.tokenizer = f16_tokenizer_dir
  if c.repa.target == "dinov2":
    c.repa.path = "weights/dinov2_b14"
  loop.validate(dit.DiTTrainer, c, dit.default_config(), 8)
  trainer = dit.DiTTrainer(c, parallel.make_mesh())
  _, abstract = loop.abstract_state(trainer, jax.random.key(0), trainer.mesh, c.mesh.rules)
  assert trainer.grid ** 2 == tokens
  count = sum(x.size for x in jax.tree.leaves(abstract.params))
  if params is not None:
    assert count == params
  else:
    assert c.model.hidden_size == 384 and c.model.z_dim == 0 and "projector" not in abstract.params
  assert (c.train.global_batch_size, c.optimizer.lr, c.optimizer.b2, c.train.ema_decay) == (1024, 2e-4, 0.95, 0.9999)


def test_dit_init_from_converted_weights(tokenizer_dir, tmp_path):
  c = tiny_config(tokenizer_dir)
  trainer = dit.DiTTrainer(c, parallel.make_mesh())
  fresh = jax.jit(lambda k: nn.meta.unbox(trainer.init_state(k)))(jax.random.key(0))
  params = jax.tree.map(lambda p: np.asarray(p) + 0.01, jax.device_get(fresh.params))
  torch_io.save_converted(str(tmp_path / "conv"), params, {"kind": "dit", "model": c.model.to_dict(),
                                                            "weights": "ema"})
  state = trainer.init_from(fresh, str(tmp_path / "conv"))
  for tree in (state.params, state.ema_params):
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), tree, params)


def test_evaluation_decodes_with_the_tokenizer_copy_the_steps_take(tokenizer_dir, monkeypatch):
  trainer = dit.DiTTrainer(tiny_config(tokenizer_dir), parallel.make_mesh())
  state = jax.jit(lambda k: nn.meta.unbox(trainer.init_state(k)))(jax.random.key(0))
  state = state.replace(extra={"latent_scale": jnp.asarray(1.5, jnp.float32)})
  placed = trainer.frozen_on_devices["tokenizer"]  # what loop.run passes to every step
  assert trainer.decoder(state).variables is placed
  placements = []
  monkeypatch.setattr(parallel, "replicate", lambda tree, mesh: placements.append(tree))
  samples = trainer.sample_all(state, np.arange(8) % 9, seed=0)
  assert samples["images"].shape == (8, 32, 32, 3) and np.isfinite(samples["images"]).all()
  assert not placements  # no second copy of the tokenizer (or anything else) placed for sampling

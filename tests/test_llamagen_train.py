"""The LlamaGen trainer: tokens from the frozen tokenizer, CE + REPA, evaluation with CKNNA, resume, init_from."""

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
from ifsq_jax.eval.cknna import cknna
from ifsq_jax.models import llamagen as llamagen_lib
from ifsq_jax.models.tokenizer import Tokenizer, TokenizerConfig
from ifsq_jax.train import llamagen, loop
from ifsq_jax.train import state as state_lib
from ifsq_jax.tools import extract


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
  """A small random tokenizer (32 px -> 8 x 8 x 4 codes, levels 17, 17, 5, 5) as a converted directory."""
  path = tmp_path_factory.mktemp("tok")
  cfg = TokenizerConfig(hidden_size=32, hidden_size_mult=(1, 1, 1), num_res_blocks=1, downsample=(True, True, False),
                        upsample=(False, True, True), resolution=32, levels=(17, 17, 5, 5))
  params = nn.meta.unbox(Tokenizer(cfg).init(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32))["params"])
  params = jax.tree.map(lambda p: np.asarray(p) * 2.0, params)  # spread the latent over the levels
  torch_io.save_converted(str(path), params, {"kind": "tokenizer", "model": dataclasses.asdict(cfg)})
  return str(path)


def read_lines(workdir):
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def tiny_config(tokenizer_path, factorized=True, **overrides):
  c = llamagen.default_config()
  c.tokenizer = tokenizer_path
  c.data.image_size = 32
  c.data.transform = "resize_crop_flip"
  c.data.eval_examples = 16
  if factorized:
    c.tokens.group_sizes = (2, 2)
  vocab = (289, 25) if factorized else (289 * 25,)
  c.model = llamagen.model_fields("S", depth=2, hidden_size=32, num_heads=2, grid_size=8, num_classes=9,
                                  vocab_sizes=vocab, encoder_depth=1, projector_dim=32)
  llamagen.set_repa(c, "vgg16")
  c.train.compute_dtype = "float32"
  c.train.global_batch_size = 8
  c.train.num_steps = 4
  c.train.log_every = 1
  c.train.eval_every = c.train.image_every = 0
  c.checkpoint.every = 2
  c.checkpoint.async_save = False
  c.train.ema_decay = 0.5
  c.optimizer.lr = 1e-3
  c.sample.batch_size = 8
  c.eval.num_samples = 24
  c.eval.cknna_batch = 12
  c.eval.cknna_topk = 3
  c.eval.grid_classes = 2
  c.eval.grid_per_class = 2
  return apply_overrides(c, overrides)


def test_llamagen_run_logs_ce_and_repa_evaluates_with_cknna_and_loads(tokenizer_dir, tmp_path):
  c = tiny_config(tokenizer_dir, **{"train.eval_at_start": True})
  state = llamagen.train_and_evaluate(c, str(tmp_path))
  records = read_lines(tmp_path)
  train = [r for r in records if "loss" in r]
  assert [r["step"] for r in train] == [1, 2, 3, 4]
  for r in train:
    assert r["nonfinite_steps"] == 0 and 0 <= r["accuracy"] <= 1
    assert r["ce"] == pytest.approx(r["ce_0"] + r["ce_1"], rel=1e-5)
    assert r["loss"] == pytest.approx(r["ce"] + 2.0 * r["proj"], rel=1e-5)
  # Zero-initialised heads: the first step's cross-entropy is that of uniform logits.
  assert train[0]["ce"] == pytest.approx(np.log(289) + np.log(25), rel=1e-4)
  evals = [r for r in records if "eval/fd_vgg16" in r]
  assert [r["step"] for r in evals] == [0, 4]
  for r in evals:  # layers 0 (embeddings) and 2 of a 2-layer model
    assert {"eval/cknna/layer-0", "eval/cknna/layer-2"} <= set(r) and "eval/cknna/layer-1" not in r
    assert all(-1 <= r[f"eval/cknna/layer-{l}"] <= 1 for l in (0, 2))
  assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["step_00000000.png", "step_00000004.png"]

  module, params = ifsq_jax.load_model(str(tmp_path))
  assert module.vocab_sizes == (289, 25) and module.grid_size == 8
  tokens, labels = llamagen_lib.example_inputs(module, 2)
  out = module.apply({"params": params}, tokens, labels)
  ref = module.apply({"params": jax.device_get(state.ema_params)}, tokens, labels)
  for a, b in zip(out, ref):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_tokens_are_the_tokenizers_grouped_indices_in_raster_order(tokenizer_dir):
  c = tiny_config(tokenizer_dir)
  trainer = llamagen.LlamaGenTrainer(c, parallel.make_mesh())
  batch = pipeline_lib.normalize(pipeline_lib.build_pipeline(c, "train", train=True).batch(0))
  tokens = np.asarray(trainer.tokens(batch, trainer.frozen()))
  tok = ifsq_jax.load_tokenizer(tokenizer_dir)
  codes = np.asarray(tok.encode(batch["image"]))  # (B, 8, 8, 4)
  lv = np.array([17, 17, 5, 5])
  digits = np.rint(codes * (lv // 2) + lv // 2).astype(int)  # level index of each channel
  want = np.stack([digits[..., 0] + 17 * digits[..., 1], digits[..., 2] + 5 * digits[..., 3]], -1)
  np.testing.assert_array_equal(tokens, want.reshape(8, 64, 2))
  assert tokens[..., 0].max() < 289 and tokens[..., 1].max() < 25
  # From extracted codes: the same tokens.
  np.testing.assert_array_equal(np.asarray(trainer.tokens({"codes": codes}, None)), tokens)
  # Single tokens: one mixed-radix index over the four channels.
  single = llamagen.LlamaGenTrainer(tiny_config(tokenizer_dir, factorized=False), parallel.make_mesh())
  np.testing.assert_array_equal(np.asarray(single.tokens(batch, single.frozen())),
                                (want[..., 0] + 289 * want[..., 1]).reshape(8, 64))


def test_cknna_of_layer_zero_is_that_of_the_mean_input_embeddings(tokenizer_dir):
  c = tiny_config(tokenizer_dir)
  trainer = llamagen.LlamaGenTrainer(c, parallel.make_mesh())
  state = jax.jit(lambda k: nn.meta.unbox(trainer.init_state(k)))(jax.random.key(1))
  labels = np.arange(24) % 9
  samples = trainer.sample_all(state, labels, seed=5)
  assert samples["tokens"].shape == (24, 64, 2) and samples["images"].shape == (24, 32, 32, 3)
  got = trainer.sample_metrics(state, samples, labels)
  p = jax.device_get(state.ema_params)
  cls = p["cls_embedding"]["embedding_table"][labels]  # (24, D)
  emb = p["emb_0"]["embedding"][samples["tokens"][:, :-1, 0]] + p["emb_1"]["embedding"][samples["tokens"][:, :-1, 1]]
  pooled = (cls + emb.sum(1)) / 64
  vgg = trainer.cknna_target
  feats = np.asarray(jnp.mean(vgg.features(vgg.params, jnp.clip(jnp.asarray(samples["images"]), -1, 1), 8), axis=1))
  want = np.mean([cknna(pooled[s:s + 12], feats[s:s + 12], 3) for s in (0, 12)])
  assert got["cknna/layer-0"] == pytest.approx(want, abs=1e-4)


def test_llamagen_resume_continues_exactly(tokenizer_dir, tmp_path):
  full = llamagen.train_and_evaluate(tiny_config(tokenizer_dir), str(tmp_path / "full"))
  llamagen.train_and_evaluate(tiny_config(tokenizer_dir, **{"train.num_steps": 2}), str(tmp_path / "resumed"))
  resumed = llamagen.train_and_evaluate(tiny_config(tokenizer_dir), str(tmp_path / "resumed"))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), full.params, resumed.params)


def test_llamagen_trains_single_tokens_from_extracted_codes(tokenizer_dir, tmp_path):
  data = ml_collections.ConfigDict({"name": "embedded", "tfds_name": "", "path": "", "data_dir": "", "manual_dir": ""})
  extract.extract(tokenizer_dir, str(tmp_path / "codes"), data, split="train", image_size=32, shard_size=64, batch=16)
  c = tiny_config(tokenizer_dir, factorized=False, **{"data.codes_dir": str(tmp_path / "codes"),
                                                      "train.num_steps": 2})
  llamagen.set_repa(c, "none")
  llamagen.train_and_evaluate(c, str(tmp_path / "run"))
  train = [r for r in read_lines(tmp_path / "run") if "loss" in r]
  assert len(train) == 2 and train[0]["ce"] == pytest.approx(np.log(289 * 25), rel=1e-4)
  assert train[0]["proj"] == 0 and train[0]["loss"] == train[0]["ce"]


def test_llamagen_step_on_eight_devices_equals_one(tokenizer_dir):
  """One train step (factorized, REPA on) with fsdp over 8 devices equals one device's."""
  c0 = tiny_config(tokenizer_dir)
  batch_np = pipeline_lib.normalize(pipeline_lib.build_pipeline(c0, "train", train=True).batch(0))
  results = []
  for n in (1, 8):
    c = tiny_config(tokenizer_dir, **{"mesh.fsdp": n, "mesh.data": 1})
    mesh = parallel.make_mesh(1, n, 1, jax.devices()[:n])
    trainer = llamagen.LlamaGenTrainer(c, mesh)
    shardings, _ = loop.abstract_state(trainer, jax.random.key(0), mesh, c.mesh.rules)
    with parallel.sharding_context(mesh, c.mesh.rules):
      state = jax.jit(lambda k: nn.meta.unbox(trainer.init_state(k)), out_shardings=shardings)(jax.random.key(0))
      if n == 8:
        assert any(len(x.sharding.device_set) == 8 and not x.sharding.is_fully_replicated
                   for x in jax.tree.leaves(state.params))
      frozen = parallel.replicate(trainer.frozen(), mesh)
      step = jax.jit(trainer.train_steps()["train"])
      for i in range(2):  # the second step sees non-zero heads
        state, metrics = step(state, parallel.global_batch(batch_np, mesh), jax.random.key(3 + i), frozen)
    results.append((jax.device_get(metrics), jax.device_get(state.params)))
  (m1, p1), (m8, p8) = results
  for k in ("loss", "ce", "proj", "grad_norm"):
    assert m8[k] == pytest.approx(m1[k], rel=1e-4, abs=1e-6), k
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=5e-6), p1, p8)


def test_weight_decay_skips_stacked_norm_scales_and_biases(tokenizer_dir):
  trainer = llamagen.LlamaGenTrainer(tiny_config(tokenizer_dir), parallel.make_mesh())
  params = nn.meta.unbox(jax.eval_shape(trainer.init_state, jax.random.key(0)).params)
  mask = state_lib.matrices_mask(params)
  assert params["layers"]["attention_norm"]["scale"].shape == (2, 32)  # rank 2 under scan, still a vector
  assert not mask["layers"]["attention_norm"]["scale"] and not mask["norm"]["scale"]
  assert not mask["projector"]["linear_0"]["bias"]
  assert mask["layers"]["attention"]["wqkv"]["kernel"] and mask["emb_0"]["embedding"]
  assert mask["cls_embedding"]["embedding_table"] and mask["output_1"]["kernel"]


def test_init_from_converted_weights(tokenizer_dir, tmp_path):
  c = tiny_config(tokenizer_dir)
  module = llamagen_lib.LlamaGen(**{**c.model.to_dict(), "vocab_sizes": (289, 25)})
  params = nn.meta.unbox(module.init(jax.random.key(7), *llamagen_lib.example_inputs(module))["params"])
  params = jax.tree.map(lambda p: np.asarray(p) + 0.01, params)  # non-zero heads
  torch_io.save_converted(str(tmp_path / "conv"), params, {"kind": "llamagen", "model": c.model.to_dict(),
                                                            "weights": "ema"})
  trainer = llamagen.LlamaGenTrainer(c, parallel.make_mesh())
  fresh = jax.jit(lambda k: nn.meta.unbox(trainer.init_state(k)))(jax.random.key(0))
  state = trainer.init_from(fresh, str(tmp_path / "conv"))
  for tree in (state.params, state.ema_params):
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), tree, params)
  # Another architecture is refused, naming it.
  wide = llamagen.LlamaGenTrainer(tiny_config(tokenizer_dir, **{"model.hidden_size": 64}), parallel.make_mesh())
  fresh = jax.eval_shape(lambda k: nn.meta.unbox(wide.init_state(k)), jax.random.key(0))
  fresh = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), fresh)
  with pytest.raises(config_lib.ConfigError, match="hidden_size=32.*do not match config.model"):
    wide.init_from(fresh, str(tmp_path / "conv"))


@pytest.mark.parametrize("overrides,match", [
    ({"tokenizer": ""}, "config.tokenizer is empty.*configs/quickstart.py"),
    ({"model.z_dim": 64}, "z_dim=64.*vgg16.*256"),
    ({"data.codes_dir": "somewhere"}, "REPA needs the images"),
    ({"model.encoder_depth": 3}, "encoder_depth=3"),
    ({"model.vocab_sizes": (289, 25, 5, 5, 5)}, "vocab_sizes=.*1 to 4"),
    ({"tokens.group_weights": (1.0,)}, "group_weights=\\(1.0,\\).*one weight per token group"),
    ({"sample.top_p": 1.5}, "config.sample.top_p=1.5"),
    ({"sample.cfg_interval": (0.5, 0.2)}, "cfg_interval"),
    ({"eval.cknna_batch": 40}, "cknna_batch \\(40\\) <= num_samples \\(24\\)"),
    ({"model.attention_impl": "flash"}, "attention_impl='flash'"),
])
def test_llamagen_config_errors_name_the_key(tokenizer_dir, overrides, match):
  with pytest.raises(config_lib.ConfigError, match=match):
    loop.validate(llamagen.LlamaGenTrainer, tiny_config(tokenizer_dir, **overrides), llamagen.default_config(), 1)


@pytest.mark.parametrize("overrides,match", [
    ({"model.vocab_sizes": (83521,)}, "vocab_sizes=\\(83521,\\).*group_sizes=\\(2, 2\\).*vocab_sizes=\\(289, 25\\)"),
    ({"model.grid_size": 16}, "grid_size=16.*grid_size=8"),
    ({"tokens.group_sizes": (3, 2)}, "group_sizes=\\(3, 2\\).*4 FSQ channels"),
])
def test_tokenizer_that_does_not_fit_the_model_is_refused(tokenizer_dir, overrides, match):
  with pytest.raises(config_lib.ConfigError, match=match):
    llamagen.LlamaGenTrainer(tiny_config(tokenizer_dir, **overrides), parallel.make_mesh())


@pytest.fixture(scope="module")
def f16_tokenizer_dir(tmp_path_factory):
  """A narrow zero tokenizer with the paper's geometry: 256 px -> 16 x 16 x 4 codes of 17 levels."""
  path = tmp_path_factory.mktemp("tok16")
  cfg = TokenizerConfig(hidden_size=32, hidden_size_mult=(1, 1, 1, 1, 1), num_res_blocks=1,
                        downsample=(True, True, True, True, False), upsample=(False, True, True, True, True),
                        resolution=256, levels=(17, 17, 17, 17))
  params = jax.eval_shape(lambda: Tokenizer(cfg).init(jax.random.key(0), jnp.zeros((1, 256, 256, 3))))["params"]
  params = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), nn.meta.unbox(params))
  torch_io.save_converted(str(path), params, {"kind": "tokenizer", "model": dataclasses.asdict(cfg)})
  return str(path)


@pytest.mark.parametrize("variant,params", [("", 488_276_736), ("factorized", 344_103_680),
                                            ("model=B,repa=none", None)])
def test_paper_config_builds_llamagen_l_with_the_reference_parameter_count(f16_tokenizer_dir, variant, params,
                                                                           monkeypatch):
  # No DINOv2 weights offline: a stand-in target of DINOv2-B's width (only the projector's shape depends on it).
  monkeypatch.setattr(llamagen.repa, "load_target", lambda name, path="": None if name == "none" else
                      llamagen.repa.RepaTarget(name, 768, {}, lambda p, x, g: jnp.zeros((x.shape[0], g * g, 768))))
  monkeypatch.setattr(llamagen.repa, "target_dim", lambda name, path="": 0 if name == "none" else 768)
  spec = importlib.util.spec_from_file_location("llamagen_l", REPO / "configs" / "llamagen_l.py")
  llamagen_l = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(llamagen_l)
  c = llamagen_l.get_config(variant)
  c.data.manual_dir = "ILSVRC2012_tars"  # the paper's ImageNet (validated, never read here)
  c.tokenizer = f16_tokenizer_dir
  if c.repa.target == "dinov2":
    c.repa.path = "weights/dinov2_b14"
  loop.validate(llamagen.LlamaGenTrainer, c, llamagen.default_config(), 8)
  trainer = llamagen.LlamaGenTrainer(c, parallel.make_mesh())
  _, abstract = loop.abstract_state(trainer, jax.random.key(0), trainer.mesh, c.mesh.rules)
  count = sum(x.size for x in jax.tree.leaves(abstract.params))
  if params is not None:
    assert count == params
  else:
    assert c.model.hidden_size == 768 and c.model.z_dim == 0 and "projector" not in abstract.params
  o = c.optimizer
  assert (c.train.global_batch_size, o.lr, o.b1, o.b2, o.weight_decay, o.grad_clip_norm, c.train.ema_decay,
          c.repa.coef, c.model.encoder_depth) == (256, 1e-4, 0.9, 0.95, 0.05, 1.0, 0.9999, 2.0, 8)
  assert c.data.transform == "adm_random_crop_flip" and trainer.grid == 16

"""The DiT against the official model's outputs (tests/golden/dit_small.npz), its converter and load_model.

XLA's CPU backend compiles threefry draws slowly (about 8 s for the small model's
init): the two tests that init use an "rbg" key (about 1 s), as the converter does;
the others build params from the golden state dict or from random arrays of
``jax.eval_shape``'s shapes.
"""

import functools
import json
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

import ifsq_jax
from conftest import GOLDEN, REPO
from ifsq_jax import checkpoint, parallel
from ifsq_jax.convert import __main__ as convert_main
from ifsq_jax.convert import dit as conv
from ifsq_jax.convert import torch_io
from ifsq_jax.models.dit import (DiT, DiTBlock, dit_config, example_inputs, num_params, rope_tables, sincos_pos_embed,
                                 trainable_mask)

# The tiny golden model (section 4 of tests/golden/README.md).
SMALL = dit_config("S", 1, input_size=8, hidden_size=64, depth=3, num_heads=4, num_classes=10, z_dim=32,
                   encoder_depth=2, projector_dim=64)


def _nhwc(a):
  return np.transpose(a, (0, 2, 3, 1))


@functools.partial(jax.jit, static_argnums=0)
def _forward(model, params, x, t, y):
  """(velocity, REPA features)."""
  return model.apply({"params": params}, x, t, y, return_repa=True)


def _random_params(model, seed=0, scale=0.05):
  """Random params of ``model``'s shapes (no init to compile); the fixed table as init makes it."""
  shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), *example_inputs(model))["params"])
  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda s: np.float32(scale) * rng.standard_normal(s.shape, np.float32), shapes)
  params["pos_embed"] = sincos_pos_embed(model.hidden_size, model.grid)[None]
  return params


@pytest.fixture(scope="module")
def golden():
  g = dict(np.load(GOLDEN / "dit_small.npz"))
  return g, {k[3:]: v for k, v in g.items() if k.startswith("sd/")}


@pytest.mark.parametrize("scan_layers", [True, False])
def test_small_dit_matches_the_reference(golden, scan_layers):
  g, sd = golden
  fields = {**SMALL, "scan_layers": scan_layers}
  params = conv.to_params(sd, fields)
  model = DiT(**fields)
  is_block = lambda m, _: isinstance(m, DiTBlock)
  run = jax.jit(lambda p, x, t, y: model.apply({"params": p}, x, t, y, return_repa=True,
                                               capture_intermediates=is_block, mutable=["intermediates"]))
  (out, zs), state = run(params, _nhwc(g["x"]), g["t"], g["y"])
  np.testing.assert_allclose(np.asarray(out), _nhwc(g["out"]), atol=2e-5)
  np.testing.assert_allclose(np.asarray(zs), g["zs0"], atol=2e-5)
  inter = state["intermediates"]
  blocks = (inter["blocks"]["__call__"][0] if scan_layers
            else np.stack([inter[f"blocks_{i}"]["__call__"][0] for i in range(3)]))
  for i in range(3):
    np.testing.assert_allclose(np.asarray(blocks[i]), g[f"block_out/{i}"], atol=5e-5)
  c = model.apply({"params": params}, g["t"], g["y"], method=DiT.conditioning)
  np.testing.assert_allclose(np.asarray(c), g["c"], atol=1e-5)
  cfg_x = np.concatenate([g["cfg/x"][:2], g["cfg/x"][:2]])  # forward_with_cfg's combined batch
  cfg_out, _ = _forward(model, params, _nhwc(cfg_x), g["cfg/t"], g["cfg/y"])
  np.testing.assert_allclose(np.asarray(cfg_out), _nhwc(g["cfg/model_out"]), atol=2e-5)


def test_fixed_tables_equal_the_reference_buffers(golden):
  _, sd = golden
  np.testing.assert_array_equal(sincos_pos_embed(64, 8)[None], sd["pos_embed"])
  cos, sin = rope_tables(16, 8)
  np.testing.assert_allclose(cos, sd["feat_rope.freqs_cos"], atol=1e-6)
  np.testing.assert_allclose(sin, sd["feat_rope.freqs_sin"], atol=1e-6)


def test_initialisation_follows_the_reference():
  model = DiT(**{**SMALL, "scan_layers": False})
  key = jax.random.key(0, impl="rbg")  # as the converter's initial values
  p = jax.device_get(nn.meta.unbox(jax.jit(model.init)(key, *example_inputs(model))["params"]))
  assert {leaf.dtype for leaf in jax.tree.leaves(p)} == {np.dtype(np.float32)}
  np.testing.assert_array_equal(p["pos_embed"], sincos_pos_embed(64, 8)[None])
  for name in ("adaLN_modulation_1", "linear"):  # adaLN-Zero and the zero final layer
    assert not np.any(p["final_layer"][name]["kernel"]) and not np.any(p["final_layer"][name]["bias"])
  block = p["blocks_1"]
  assert not np.any(block["adaLN_modulation_1"]["kernel"]) and not np.any(block["attn"]["qkv"]["bias"])
  np.testing.assert_array_equal(block["attn"]["q_norm"]["scale"], 1.0)
  qkv = block["attn"]["qkv"]["kernel"]  # xavier-uniform on the (64, 192) view
  bound = np.sqrt(6 / (64 + 192))
  assert np.abs(qkv).max() <= bound and abs(qkv.std() - bound / np.sqrt(3)) < 0.05 * bound
  assert abs(p["y_embedder"]["embedding_table"].std() - 0.02) < 0.003  # N(0, 0.02)
  assert abs(p["t_embedder"]["mlp_0"]["kernel"].std() - 0.02) < 0.001


def test_state_dict_round_trip_in_both_layouts(golden):
  _, sd = golden
  scanned = conv.to_params(sd, SMALL)
  assert scanned["blocks"]["attn"]["qkv"]["kernel"].shape == (3, 64, 3, 4, 16)
  unscanned = conv.to_params(sd, {**SMALL, "scan_layers": False})
  np.testing.assert_array_equal(conv.stack_blocks(unscanned, 3)["blocks"]["mlp"]["w12"]["kernel"],
                                scanned["blocks"]["mlp"]["w12"]["kernel"])
  for params in (scanned, unscanned):
    back = conv.to_state_dict(params, SMALL)
    assert sorted(back) == sorted(sd)
    for key, value in sd.items():
      if key.startswith("feat_rope."):  # recomputed, not stored
        np.testing.assert_allclose(back[key], value, atol=1e-6)
      else:
        np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_dit_l1_has_the_reference_parameters_and_state_dict():
  full = json.loads((GOLDEN / "dit_full_keys.json").read_text())
  fields = dit_config("L", 1)  # the defaults are the reference's DiT-L/1 with REPA on DINOv2-B at block 8
  model = DiT(**fields)
  params = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), *example_inputs(model))["params"])
  assert num_params(params) == full["num_params"] == 465_967_844
  mask = trainable_mask(params)
  trainable = sum(int(np.prod(p.shape)) for p, keep in zip(jax.tree.leaves(params), jax.tree.leaves(mask)) if keep)
  assert trainable == full["num_trainable_params"] == 465_705_700
  # The converter's table maps the state dict 1:1 onto these params; blocks_{i}/... is blocks/... without the layer axis.
  flat = {}
  for entry in conv.key_map(fields):
    first, *rest = entry.path.split("/")
    node, layered = (params["blocks"], True) if first.startswith("blocks_") else (params[first], False)
    for part in rest:
      node = node[part]
    flat[entry.key] = list(conv.torch_shape(entry, node.shape[1:] if layered else node.shape))
  for key, table in zip(conv.ROPE_BUFFERS, rope_tables(64, 16)):
    flat[key] = list(table.shape)
  assert flat == {e["key"]: e["shape"] for e in full["state_dict"]}
  assert len(flat) == full["num_state_dict_entries"] == 357
  assert conv.fields_from_reference(_run_yaml("DiT-L/1", 256, 1000, "dinov2-vit-b", 8)) == fields


def test_label_dropout_replaces_labels_by_the_null_class_at_the_set_rate(golden):
  fields = {**SMALL, "class_dropout_prob": 0.25}
  model = DiT(**fields)
  params = conv.to_params(golden[1], fields)
  n = 4096
  t, y = np.full((n,), 0.5, np.float32), np.full((n,), 3, np.int32)
  cond = lambda y, train, seed=0: np.asarray(model.apply({"params": params}, t, y, train, method=DiT.conditioning,
                                                         rngs={"dropout": jax.random.key(seed)}))
  null = cond(np.full((n,), 10, np.int32), False)[0]
  kept = cond(y, False)[0]
  out = cond(y, True)
  dropped = np.all(np.isclose(out, null), axis=1)
  assert np.all(dropped | np.all(np.isclose(out, kept), axis=1))
  assert abs(dropped.mean() - 0.25) < 0.025  # 4 standard deviations
  assert not np.array_equal(dropped, np.all(np.isclose(cond(y, True, seed=1), null), axis=1))
  np.testing.assert_array_equal(cond(y, False), np.broadcast_to(kept, (n, kept.size)))  # eval: no dropout
  with pytest.raises(Exception, match="dropout"):
    model.apply({"params": params}, t, y, True, method=DiT.conditioning)  # train mode needs the rng


def test_bfloat16_compute_keeps_float32_params_and_outputs(golden):
  g, sd = golden
  params = conv.to_params(sd, SMALL)
  x, t, y = _nhwc(g["x"]), g["t"], g["y"]
  bf16 = DiT(**SMALL, dtype=jnp.bfloat16)
  shapes = jax.eval_shape(bf16.init, jax.random.key(0), *example_inputs(bf16))
  assert {leaf.dtype for leaf in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}
  out, z = _forward(bf16, params, x, t, y)
  assert out.dtype == z.dtype == jnp.float32
  out32, z32 = _nhwc(g["out"]), g["zs0"]  # the float32 reference
  err = np.abs(np.asarray(out) - out32).max()
  assert 2e-4 < err < 0.03 * np.abs(out32).max()  # bf16 was used (float32 matches to 2e-5), and stays close
  assert np.abs(np.asarray(z) - z32).max() < 0.03 * np.abs(z32).max()


def _fsdp_setup(golden, scan_layers):
  """(mesh, model, boxed abstract params, x, t, y): the golden batch tiled to 8 on an 8-device fsdp mesh."""
  g, _ = golden
  mesh = parallel.make_mesh(data=1, fsdp=8)
  model = DiT(**{**SMALL, "scan_layers": scan_layers})
  x, t, y = _nhwc(np.tile(g["x"], (3, 1, 1, 1))[:8]), np.tile(g["t"], 3)[:8], np.tile(g["y"], 3)[:8]
  with parallel.sharding_context(mesh, parallel.DEFAULT_RULES):
    boxed = jax.eval_shape(model.init, jax.random.key(0), x, t, y)["params"]
  return mesh, model, boxed, x, t, y


@pytest.mark.parametrize("scan_layers", [True, False])
def test_every_param_has_logical_axis_names(golden, scan_layers):
  mesh, _, boxed, *_ = _fsdp_setup(golden, scan_layers)
  for path, leaf in jax.tree_util.tree_leaves_with_path(boxed, is_leaf=lambda v: isinstance(v, nn.Partitioned)):
    name = jax.tree_util.keystr(path, simple=True, separator="/")
    assert isinstance(leaf, nn.LogicallyPartitioned), name
    assert len(leaf.names) == leaf.value.ndim, name
    if scan_layers and name.startswith("blocks/"):
      assert leaf.names[0] == parallel.LAYERS, name
  shardings = parallel.logical_shardings(boxed, mesh, parallel.DEFAULT_RULES)
  qkv = shardings["blocks" if scan_layers else "blocks_0"]["attn"]["qkv"]["kernel"].spec
  assert "fsdp" in tuple(qkv)  # the embed axis (64) splits over the 8 fsdp devices


def test_sharded_forward_on_an_fsdp_mesh_matches_the_reference(golden):
  g, sd = golden
  mesh, model, boxed, x, t, y = _fsdp_setup(golden, scan_layers=True)
  params = jax.device_put(conv.to_params(sd, SMALL), parallel.logical_shardings(boxed, mesh, parallel.DEFAULT_RULES))
  batch = lambda a: jax.device_put(a, parallel.batch_sharding(mesh, a.ndim))
  with parallel.sharding_context(mesh, parallel.DEFAULT_RULES):
    out = jax.jit(lambda p, x, t, y: model.apply({"params": p}, x, t, y))(params, batch(x), batch(t), batch(y))
  np.testing.assert_allclose(np.asarray(out), np.concatenate([_nhwc(g["out"])] * 3)[:8], atol=2e-5)


def test_scanned_and_rematerialised_gradients_match_finite_differences(golden):
  g, sd = golden
  fields = {**SMALL, "remat_policy": "full"}  # scanned; the REPA tap rides in the scan's carry
  model = DiT(**fields)
  x, t, y = _nhwc(g["x"]), g["t"], g["y"]

  @jax.jit
  def loss(p):
    v, z = model.apply({"params": p}, x, t, y, return_repa=True)
    return jnp.mean(v ** 2) + jnp.mean(jnp.sin(3 * z))

  params = conv.to_params(sd, fields)
  grads = jax.jit(jax.grad(loss))(params)
  assert not np.any(np.asarray(grads["pos_embed"]))  # the fixed table gets no gradient
  assert np.abs(np.asarray(grads["projector"]["linear_0"]["kernel"])).max() > 0
  rng = np.random.default_rng(0)
  for part in ("blocks", "projector", "t_embedder"):  # directions in the stacked blocks, the projector, the t-MLP
    direction = jax.tree.map(np.zeros_like, params)
    direction[part] = jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(np.float32), params[part])
    analytic = sum(float(jnp.vdot(gr, d)) for gr, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction)))
    eps = 1e-3
    shifted = lambda s: float(loss(jax.tree.map(lambda a, d: a + s * d, params, direction)))
    numeric = (shifted(eps) - shifted(-eps)) / (2 * eps)
    assert abs(analytic - numeric) < 0.02 * abs(analytic) + 1e-3, (part, analytic, numeric)


def test_options_off_follow_the_original_dit():
  fields = dict(SMALL, use_qknorm=True, use_swiglu=False, use_rope=False, use_rmsnorm=False)
  model = DiT(**fields)
  params = _random_params(model)
  block = params["blocks"]
  assert set(block) == {"attn", "mlp", "adaLN_modulation_1"}  # LayerNorms without affine parameters
  assert set(block["mlp"]) == {"fc1", "fc2"} and block["mlp"]["fc1"]["kernel"].shape == (3, 64, 256)
  assert set(block["attn"]["q_norm"]) == {"scale", "bias"}  # QK-norm: nn.LayerNorm(head_dim) with affine
  sd = conv.to_state_dict(params, fields)
  assert "feat_rope.freqs_cos" not in sd and "blocks.2.mlp.fc2.weight" in sd and "blocks.0.norm1.weight" not in sd
  np.testing.assert_array_equal(conv.to_params(sd, fields)["blocks"]["mlp"]["fc1"]["kernel"],
                                block["mlp"]["fc1"]["kernel"])
  x = np.random.default_rng(0).normal(size=(2, 8, 8, 4)).astype(np.float32)
  out, z = _forward(model, params, x, np.full((2,), 0.3, np.float32), np.array([1, 10]))
  assert out.shape == (2, 8, 8, 4) and z.shape == (2, 64, 32) and np.all(np.isfinite(np.asarray(out)))


@pytest.mark.parametrize("field, value, match", [
    ("attention_impl", "flash", "attention_impl='flash'.*'xla', 'cudnn'"),
    ("remat_policy", "some", "remat_policy='some'.*'full'"),
    ("patch_size", 3, "patch_size=3 must divide input_size=8"),
    ("encoder_depth", 4, r"encoder_depth=4 must be in \[0, depth=3\]"),
])
def test_invalid_fields_are_named(field, value, match):
  model = DiT(**{**SMALL, field: value})
  with pytest.raises(ValueError, match=match):
    jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, 8, 8, 4), np.float32), np.zeros((1,), np.float32),
                   np.zeros((1,), np.int32))


def test_attention_impl_selects_the_dot_product_attention_implementation(monkeypatch):
  seen = []
  real = jax.nn.dot_product_attention

  def spy(*args, implementation=None, **kwargs):
    seen.append(implementation)
    return real(*args, **kwargs)  # XLA's: cuDNN needs a GPU

  monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
  for impl in ("cudnn", "xla"):
    model = DiT(**{**SMALL, "attention_impl": impl})
    jax.eval_shape(model.init, jax.random.key(0), *example_inputs(model))
    assert set(seen) == {impl}
    seen.clear()


def test_wrong_input_shape_is_named():
  with pytest.raises(ValueError, match=r"\(B, 8, 8, 4\)"):
    jax.eval_shape(DiT(**SMALL).init, jax.random.key(0), np.zeros((1, 4, 8, 8), np.float32),
                   np.zeros((1,), np.float32), np.zeros((1,), np.int32))


# ------------------------------------------------------------------ converter and load_model

def _run_yaml(model_type, image_size, num_classes, enc_type, encoder_depth):
  return {"model": {"model_type": model_type, "use_qknorm": True, "use_swiglu": True, "use_rope": True,
                    "use_rmsnorm": True, "in_chans": 4, "use_checkpoint": False},
          "data": {"image_size": image_size, "num_classes": num_classes}, "vae": {"downsample_ratio": 16},
          "repa": {"use_repa": True, "enc_type": enc_type, "encoder_depth": encoder_depth, "proj_coef": 0.5},
          "scheduler": {"diffusion": False, "transport": True}}


def test_converter_refuses_unmapped_missing_and_foreign_entries(golden):
  _, sd = golden
  bad = {k: v for k, v in sd.items() if k != "blocks.1.mlp.w3.bias"}
  bad["blocks.1.extra.weight"] = np.ones((2,), np.float32)
  with pytest.raises(torch_io.ConversionError, match=r"blocks.1.mlp.w3.bias -> blocks_1/mlp/w3/bias"):
    conv.to_params(bad, SMALL)
  dropped = torch_io.Dropped()
  params = conv.to_params(bad, SMALL, allow_partial=True, dropped=dropped)
  assert dropped.unmapped == ["blocks.1.extra.weight"] and dropped.left_at_init == ["blocks_1/mlp/w3/bias"]
  np.testing.assert_array_equal(params["blocks"]["mlp"]["w3"]["bias"][1], 0.0)  # its initial value
  np.testing.assert_array_equal(params["blocks"]["mlp"]["w3"]["bias"][2], sd["blocks.2.mlp.w3.bias"])
  with pytest.raises(torch_io.ConversionError, match="feat_rope.freqs_sin .*differs"):
    conv.to_params({**sd, "feat_rope.freqs_sin": sd["feat_rope.freqs_sin"] + 1e-3}, SMALL)
  with pytest.raises(torch_io.ConversionError, match=r"y_embedder.embedding_table.weight: checkpoint shape \(11, 64\)"):
    conv.to_params(sd, {**SMALL, "num_classes": 1000})
  with pytest.raises(torch_io.ConversionError, match="enc_type='mocov3-vit-b'"):
    conv.fields_from_reference(_run_yaml("DiT-S/2", 128, 10, "mocov3-vit-b", 4))
  with pytest.raises(torch_io.ConversionError, match="model_type='DiT-1p0B/1'"):
    conv.fields_from_reference(_run_yaml("DiT-1p0B/1", 128, 10, "dinov2-vit-b", 4))


@pytest.fixture(scope="module")
def s2_checkpoint(tmp_path_factory):
  """A random DiT-S/2 (latents 8 x 8, 10 classes, REPA on DINOv2-B at block 8) saved as the official train.py does."""
  import torch  # pylint: disable=g-import-not-at-top
  run = _run_yaml("DiT-S/2", 128, 10, "dinov2-vit-b", 8)
  fields = conv.fields_from_reference(run)
  assert fields == dit_config("S", 2, input_size=8, num_classes=10)
  ema = _random_params(DiT(**fields), seed=1)
  raw = {k: jax.tree.map(lambda a: -a, v) if k == "final_layer" else v for k, v in ema.items()}
  tensors = lambda p: {k: torch.tensor(v) for k, v in conv.to_state_dict(p, fields).items()}
  path = tmp_path_factory.mktemp("official") / "0010000.pt"
  torch.save({"model": tensors(raw), "ema": tensors(ema), "opt": {"state": {}, "param_groups": [{"lr": 2e-4}]},
              "config": run}, path)
  (path.parent / "run.yaml").write_text(yaml.safe_dump(run))
  return path, fields, ema, raw


def test_convert_cli_then_load_model_gives_the_same_outputs(s2_checkpoint, tmp_path, capsys):
  path, fields, ema, raw = s2_checkpoint
  rng = np.random.default_rng(0)
  x, t, y = rng.normal(size=(2, 8, 8, 4)).astype(np.float32), np.array([0.2, 0.9], np.float32), np.array([4, 10])
  for flags, weights in (([], ema), (["--no_ema", "--config", str(path.parent / "run.yaml")], raw)):
    out_dir = tmp_path / ("ema" if weights is ema else "model")
    assert convert_main.main(["dit", "--checkpoint", str(path), "--out", str(out_dir), *flags]) == 0
    assert "Converted dit DiT-S/2" in capsys.readouterr().out
    module, params = ifsq_jax.load_model(str(out_dir))
    assert module == DiT(**fields) and module.scan_layers and module.z_dim == 768
    want_v, want_z = _forward(module, weights, x, t, y)
    got_v, got_z = _forward(module, params, x, t, y)
    np.testing.assert_array_equal(np.asarray(got_v), np.asarray(want_v))
    np.testing.assert_array_equal(np.asarray(got_z), np.asarray(want_z))
    assert np.abs(np.asarray(got_v)).max() > 0.01


def test_convert_cli_refuses_a_checkpoint_without_the_asked_weights(s2_checkpoint, tmp_path, capsys):
  import torch  # pylint: disable=g-import-not-at-top
  path, *_ = s2_checkpoint
  only_model = {k: v for k, v in torch.load(path, weights_only=True).items() if k != "ema"}
  torch.save(only_model, tmp_path / "model_only.pt")
  assert convert_main.main(["dit", "--checkpoint", str(tmp_path / "model_only.pt"), "--out", str(tmp_path / "o")]) == 1
  err = capsys.readouterr().err
  assert "has no 'ema' state dict" in err and "--no_ema" in err


def test_load_model_from_a_work_dir(tmp_path):
  fields = dict(SMALL, z_dim=0)
  params = _random_params(DiT(**fields))
  ema = jax.tree.map(lambda a: a + 1.0, params)
  config = {"task": "dit", "model": fields}
  workdir = tmp_path / "run"
  ck = checkpoint.Checkpointer(workdir / "checkpoints", async_save=False)
  ck.save(5, {"step": np.int32(5), "params": params, "ema_params": ema}, {"next_step": 5}, config)
  ck.close()
  (workdir / "config.json").write_text(json.dumps(config))
  module, got = ifsq_jax.load_model(str(workdir))
  assert module == DiT(**fields)
  np.testing.assert_array_equal(got["blocks"]["attn"]["qkv"]["kernel"], ema["blocks"]["attn"]["qkv"]["kernel"])
  _, got = ifsq_jax.load_model(str(workdir / "checkpoints" / "5"), ema=False)
  np.testing.assert_array_equal(got["final_layer"]["linear"]["bias"], params["final_layer"]["linear"]["bias"])
  (workdir / "config.json").write_text(json.dumps({"task": "tokenizer"}))
  with pytest.raises(ValueError, match="holds a 'tokenizer' run.*load_tokenizer"):
    ifsq_jax.load_model(str(workdir))
  with pytest.raises(FileNotFoundError, match="neither a DiT work dir"):
    ifsq_jax.load_model(str(tmp_path / "nothing" / "here"))


# ------------------------------------------------------------------ against the PyTorch DiT of bench/

def test_random_torch_dit_s2_converts_to_the_same_outputs():
  import torch  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, str(REPO / "bench"))
  import torch_dit  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  model = torch_dit.TorchDiT(**torch_dit.dit_kwargs("S", 2, input_size=8, num_classes=10)).eval()
  with torch.no_grad():  # move the zero-initialised adaLN and final layers off zero
    for name, p in model.named_parameters():
      if name != "pos_embed":
        p.add_(0.05 * torch.randn_like(p))
  fields = dit_config("S", 2, input_size=8, num_classes=10)
  params = conv.to_params({k: v.numpy() for k, v in model.state_dict().items()}, fields)
  rng = np.random.default_rng(0)
  x, t = rng.normal(size=(3, 4, 8, 8)).astype(np.float32), np.array([0.1, 0.5, 0.95], np.float32)
  y = np.array([0, 9, 10])
  with torch.no_grad():
    want_v, want_z = model(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(y))
  got_v, got_z = _forward(DiT(**fields), params, _nhwc(x), t, y)
  assert want_v.abs().max() > 0.1
  np.testing.assert_allclose(np.asarray(got_v), _nhwc(want_v.numpy()), atol=1e-4)
  np.testing.assert_allclose(np.asarray(got_z), want_z[0].numpy(), atol=1e-4)

"""LlamaGen against the official model's outputs (tests/golden/llamagen_small.npz), its converter and load_model.

The golden models (section 5 of tests/golden/README.md): 2 layers, width 64, 4 heads,
a 4 x 4 grid, 10 classes, REPA (Z 32) after layer 1; "ar" has one 289-way vocabulary,
"fact" two 17-way sub-token groups. Params come from the golden state dicts or from
random arrays of ``jax.eval_shape``'s shapes; the one init that compiles uses an
"rbg" key (XLA's CPU backend compiles threefry draws slowly).
"""

import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

import ifsq_jax
from conftest import GOLDEN
from ifsq_jax import checkpoint, parallel
from ifsq_jax.convert import __main__ as convert_main
from ifsq_jax.convert import llamagen as conv
from ifsq_jax.convert import torch_io
from ifsq_jax.models.llamagen import (LlamaGen, example_inputs, ffn_hidden, init_cache, llamagen_config, num_params,
                                      rope_table, trainable_mask)

SMALL = dict(grid_size=4, hidden_size=64, depth=2, num_heads=4, num_classes=10, z_dim=32, encoder_depth=1,
             projector_dim=64)
VOCABS = {"ar": (289,), "fact": (17, 17)}


def _fields(kind, **overrides):
  return llamagen_config("S", vocab_sizes=VOCABS[kind], **{**SMALL, **overrides})


@pytest.fixture(scope="module")
def golden():
  g = dict(np.load(GOLDEN / "llamagen_small.npz"))
  out = {}
  for kind in VOCABS:
    sd = {k[len(kind) + 4:]: v for k, v in g.items() if k.startswith(f"{kind}/sd/")}
    tokens = g["ar/tokens"] if kind == "ar" else np.stack([g["fact/tokens0"], g["fact/tokens1"]], axis=-1)
    logits = (g["ar/logits"],) if kind == "ar" else (g["fact/logits0"], g["fact/logits1"])
    kv = (g["ar/kv_logits"],) if kind == "ar" else (g["fact/kv_logits0"], g["fact/kv_logits1"])
    ce = (g["ar/ce_loss"],) if kind == "ar" else (g["fact/ce_loss0"], g["fact/ce_loss1"])
    out[kind] = dict(sd=sd, tokens=tokens, labels=g[f"{kind}/cond"], logits=logits, kv=kv, ce=ce,
                     zs0=g[f"{kind}/zs0"], target=g[f"{kind}/repa_target"], proj=g[f"{kind}/proj_loss"],
                     total=g[f"{kind}/total_loss"], hidden=[g[f"ar/hidden/{i}"] for i in range(3)])
  out["rope"] = (g["rope/freqs_cis"], g["rope/freqs_cis_L"])
  return out


@functools.partial(jax.jit, static_argnums=0)
def _teacher_forced(model, params, tokens, labels):
  """((logits per head), REPA features, intermediates)."""
  (logits, z), state = model.apply({"params": params}, tokens, labels, return_repa=True, mutable=["intermediates"])
  return (logits if model.factorized else (logits,)), z, state["intermediates"]


@functools.partial(jax.jit, static_argnums=0)
def _logits(model, params, tokens, labels):
  return model.apply({"params": params}, tokens, labels)


@functools.partial(jax.jit, static_argnums=0)
def _kv_decode(model, params, cache, tokens, labels):
  """((logits per head (B, N, V_g)), final cache): prefill, then one decode_step per position in a lax.scan."""
  groups = range(len(model.vocab_sizes))

  def heads(out, subtokens):
    if not model.factorized:
      return (out,)
    return tuple(model.apply({"params": params}, out, subtokens, g, method=LlamaGen.decode_subtoken) for g in groups)

  out, state = model.apply({"params": params, "cache": cache}, labels, method=LlamaGen.prefill, mutable=["cache"])
  first = heads(out, tokens[:, 0])

  def step(state, inputs):
    previous, current = inputs
    out, state = model.apply({"params": params, **state}, previous, method=LlamaGen.decode_step, mutable=["cache"])
    return state, heads(out, current)

  state, rest = jax.lax.scan(step, state, (jnp.moveaxis(tokens[:, :-1], 1, 0), jnp.moveaxis(tokens[:, 1:], 1, 0)))
  logits = tuple(jnp.concatenate([f[:, None], jnp.moveaxis(r, 0, 1)], axis=1) for f, r in zip(first, rest))
  return logits, state["cache"]


def _random_params(model, seed=0, scale=0.05):
  shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), *example_inputs(model))["params"])
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: np.float32(scale) * rng.standard_normal(s.shape, np.float32), shapes)


def _losses(logits, tokens, z, target):
  """As llamagen/train.py: CE per head (float32, mean over B * N) and -mean cos(z, target)."""
  tokens = tokens[..., None] if tokens.ndim == 2 else tokens
  ce = [-jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(l), tokens[..., g, None], -1)) for g, l in enumerate(logits)]
  unit = lambda a: a / jnp.maximum(jnp.linalg.norm(a, axis=-1, keepdims=True), 1e-12)
  return ce, -jnp.mean(jnp.sum(unit(z) * unit(target), axis=-1))


def test_rope_tables_equal_the_reference(golden):
  small, large = golden["rope"]
  np.testing.assert_allclose(rope_table(4, 16), small, atol=1e-6)
  np.testing.assert_allclose(rope_table(16, 64), large, atol=1e-6)
  assert not np.any(rope_table(4, 16)[0])  # the class position: q and k become zero
  np.testing.assert_array_equal(rope_table(4, 16)[1], np.stack([np.ones(8), np.zeros(8)], -1))  # cell (0, 0)


@pytest.mark.parametrize("kind", ["ar", "fact"])
@pytest.mark.parametrize("scan_layers, remat_policy", [(True, "none"), (False, "full")])
def test_small_models_match_the_reference(golden, kind, scan_layers, remat_policy):
  fields = _fields(kind, scan_layers=scan_layers, remat_policy=remat_policy)
  g = golden[kind]
  model = LlamaGen(**fields)
  params = conv.to_params(g["sd"], fields)
  logits, z, inter = _teacher_forced(model, params, g["tokens"], g["labels"])
  for got, want in zip(logits, g["logits"], strict=True):
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5)
  np.testing.assert_allclose(np.asarray(z), g["zs0"], atol=2e-5)
  if kind == "ar":
    np.testing.assert_allclose(np.asarray(inter["embeddings"][0]), g["hidden"][0], atol=2e-5)
    layers = (inter["layers"]["hidden"][0] if scan_layers
              else [inter[f"layers_{i}"]["hidden"][0] for i in range(2)])
    for i in range(2):
      np.testing.assert_allclose(np.asarray(layers[i]), g["hidden"][i + 1], atol=2e-5)
  ce, proj = _losses(logits, g["tokens"], z, g["target"])
  for got, want in zip(ce, g["ce"], strict=True):
    np.testing.assert_allclose(float(got), want, atol=1e-5)
  np.testing.assert_allclose(float(proj), g["proj"], atol=1e-5)
  np.testing.assert_allclose(float(sum(ce) + 2.0 * proj), g["total"], atol=1e-5)
  # KV-cache decoding, one position per step, against the reference's and our own teacher forcing. The second
  # run starts from the first run's full cache: prefill restarts the sequence.
  cache = init_cache(model, 2)
  for _ in range(2):
    kv, cache = _kv_decode(model, params, cache, g["tokens"], g["labels"])
    for got, want, forced in zip(kv, g["kv"], logits, strict=True):
      np.testing.assert_allclose(np.asarray(got), want, atol=2e-5)
      np.testing.assert_allclose(np.asarray(got), np.asarray(forced), atol=1e-5)
  assert int(cache["cache_index"]["index"]) == 16


def test_llamagen_l_has_the_reference_parameters_and_state_dicts():
  full = json.loads((GOLDEN / "llamagen_full_keys.json").read_text())["variants"]
  counts = {"fsq17x4": 488_276_736, "fsq17x4_f2x2": 344_103_680, "vq16384": 350_780_160}
  for name, variant in full.items():
    vocab = variant["kwargs"]["vocab_size"]
    vocab = tuple(vocab) if isinstance(vocab, list) else (vocab,)
    run = _config_yaml("LlamaGen-L", vq=name.startswith("vq"), bits=[2, 2] if len(vocab) == 2 else None)
    fields = conv.fields_from_reference(run, vocab)
    assert fields == llamagen_config("L", vocab_sizes=vocab)  # the defaults are the reference's LlamaGen-L runs
    model = LlamaGen(**fields)
    params = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), *example_inputs(model))["params"])
    assert num_params(params) == variant["num_params"] == counts[name]
    # The converter's table maps the state dict 1:1 onto these params; layers_{i}/... is layers/... without the
    # layer axis.
    flat = {}
    for entry in conv.key_map(fields):
      first, *rest = entry.path.split("/")
      stack = first.rsplit("_", 1)[0]
      node, layered = (params[stack], True) if stack in conv.STACKS else (params[first], False)
      for part in rest:
        node = node[part]
      flat[entry.key] = list(conv.torch_shape(entry, node.shape[1:] if layered else node.shape))
    assert flat == {e["key"]: e["shape"] for e in variant["state_dict"]}
    assert len(flat) == variant["num_state_dict_entries"]
  assert ffn_hidden(1024) == 2816


def test_initialisation_follows_the_reference():
  model = LlamaGen(**_fields("fact"))
  key = jax.random.key(0, impl="rbg")  # the converter's initial values (the same program: compiled once)
  p = jax.device_get(nn.meta.unbox(jax.jit(model.init)(key, *example_inputs(model))["params"]))
  assert {leaf.dtype for leaf in jax.tree.leaves(p)} == {np.dtype(np.float32)}
  assert all(not np.any(p[f"output_{g}"]["kernel"]) for g in range(2))  # zero heads
  assert not np.any(p["projector"]["linear_1"]["bias"])
  np.testing.assert_array_equal(p["layers"]["ffn_norm"]["scale"], 1.0)
  layers, blocks = p["layers"]["attention"]["wqkv"]["kernel"], p["factorized_blocks"]["feed_forward"]["w2"]["kernel"]
  assert not np.array_equal(layers[0], layers[1])  # each layer draws its own
  for weight in (layers, blocks, p["emb_1"]["embedding"], p["cls_embedding"]["embedding_table"],
                 p["projector"]["linear_2"]["kernel"]):
    assert abs(weight.std() - 0.02) < 0.002 and abs(weight.mean()) < 0.002
  assert p["cls_embedding"]["embedding_table"].shape == (11, 64)  # the null class row
  assert trainable_mask(p)["layers"]["attention"]["wo"]["kernel"] is True


def test_dropout_and_label_dropout_act_in_training_only(golden):
  g = golden["ar"]
  fields = _fields("ar", class_dropout_prob=0.5)  # token and residual dropout 0.1, as the reference's runs
  model = LlamaGen(**fields)
  params = conv.to_params(g["sd"], fields)
  # Label dropout: each label becomes the null class (row 10) with probability 0.5.
  n = 4096
  embed = lambda y, train, seed=0: np.asarray(model.apply(
      {"params": params}, y, train, method=lambda m, y, train: m.cls_embedding(y, train),
      rngs={"dropout": jax.random.key(seed)}))
  table = g["sd"]["cls_embedding.embedding_table.weight"]
  out = embed(np.full((n,), 3), True)
  dropped = np.all(out == table[10], axis=1)
  assert np.all(dropped | np.all(out == table[3], axis=1))
  assert abs(dropped.mean() - 0.5) < 0.032  # 4 standard deviations
  assert not np.array_equal(dropped, np.all(embed(np.full((n,), 3), True, seed=1) == table[10], axis=1))
  # The model's forward drops in training only (eval mode is the golden test's), with the "dropout" rng.
  train = jax.jit(lambda p, key: model.apply({"params": p}, g["tokens"], g["labels"], train=True,
                                             rngs={"dropout": key}))
  first, again = np.asarray(train(params, jax.random.key(1))), np.asarray(train(params, jax.random.key(1)))
  np.testing.assert_array_equal(first, again)
  assert np.abs(first - g["logits"][0]).max() > 0.05
  assert np.abs(np.asarray(train(params, jax.random.key(2))) - first).max() > 0.05
  with pytest.raises(Exception, match="dropout"):
    model.apply({"params": params}, g["tokens"], g["labels"], train=True)


def test_bfloat16_compute_keeps_float32_params_and_logits(golden):
  g = golden["fact"]
  fields = _fields("fact")
  bf16 = LlamaGen(**fields, dtype=jnp.bfloat16)
  shapes = jax.eval_shape(bf16.init, jax.random.key(0), *example_inputs(bf16))
  assert {leaf.dtype for leaf in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}
  logits, z, _ = _teacher_forced(bf16, conv.to_params(g["sd"], fields), g["tokens"], g["labels"])
  for got, want in zip(logits, g["logits"], strict=True):
    err = np.abs(np.asarray(got) - want).max()
    assert got.dtype == jnp.float32 and 2e-4 < err < 0.03 * np.abs(want).max()  # bf16 was used, and stays close
  assert z.dtype == jnp.float32 and np.abs(np.asarray(z) - g["zs0"]).max() < 0.03 * np.abs(g["zs0"]).max()


@pytest.mark.parametrize("scan_layers", [True, False])
def test_every_param_has_logical_axis_names(scan_layers):
  mesh = parallel.make_mesh(data=1, fsdp=8)
  model = LlamaGen(**_fields("fact", scan_layers=scan_layers))
  with parallel.sharding_context(mesh, parallel.DEFAULT_RULES):
    boxed = jax.eval_shape(model.init, jax.random.key(0), *example_inputs(model, 8))["params"]
  for path, leaf in jax.tree_util.tree_leaves_with_path(boxed, is_leaf=lambda v: isinstance(v, nn.Partitioned)):
    name = jax.tree_util.keystr(path, simple=True, separator="/")
    assert isinstance(leaf, nn.LogicallyPartitioned), name
    assert len(leaf.names) == leaf.value.ndim, name
    if scan_layers and name.split("/")[0] in conv.STACKS:
      assert leaf.names[0] == parallel.LAYERS, name
  shardings = parallel.logical_shardings(boxed, mesh, parallel.DEFAULT_RULES)
  assert "fsdp" in tuple(shardings["emb_0"]["embedding"].spec)  # the embed axis (64) splits over 8 fsdp devices


def test_sharded_forward_and_decoding_on_an_fsdp_mesh_match_the_reference(golden):
  g = golden["ar"]
  mesh = parallel.make_mesh(data=2, fsdp=4)
  model = LlamaGen(**_fields("ar"))
  tokens, labels = np.tile(g["tokens"], (4, 1)), np.tile(g["labels"], 4)
  with parallel.sharding_context(mesh, parallel.DEFAULT_RULES):
    boxed = jax.eval_shape(model.init, jax.random.key(0), tokens, labels)["params"]
  params = jax.device_put(conv.to_params(g["sd"], _fields("ar")),
                          parallel.logical_shardings(boxed, mesh, parallel.DEFAULT_RULES))
  batch = lambda a: jax.device_put(a, parallel.batch_sharding(mesh, a.ndim))
  with parallel.sharding_context(mesh, parallel.DEFAULT_RULES):
    logits, _, _ = _teacher_forced(model, params, batch(tokens), batch(labels))
    kv, _ = _kv_decode(model, params, init_cache(model, 8), batch(tokens), batch(labels))
  np.testing.assert_allclose(np.asarray(logits[0]), np.tile(g["logits"][0], (4, 1, 1)), atol=2e-5)
  np.testing.assert_allclose(np.asarray(kv[0]), np.tile(g["kv"][0], (4, 1, 1)), atol=2e-5)


def test_rematerialised_scan_gradients_match_finite_differences(golden):
  g = golden["ar"]
  fields = _fields("ar", remat_policy="full")  # scanned; the REPA tap rides in the scan's carry
  model = LlamaGen(**fields)

  @jax.jit
  def loss(p):
    logits, z = model.apply({"params": p}, g["tokens"], g["labels"], return_repa=True)
    return jnp.mean(jnp.sin(3 * logits)) + jnp.mean(z ** 2)

  params = conv.to_params(g["sd"], fields)
  grads = jax.jit(jax.grad(loss))(params)
  rng = np.random.default_rng(0)
  for part in ("layers", "projector", "cls_embedding"):  # the stacked layers, the tap's projector, the class table
    direction = jax.tree.map(np.zeros_like, params)
    direction[part] = jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(np.float32), params[part])
    analytic = sum(float(np.vdot(np.asarray(gr), d))
                   for gr, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction)))
    eps = 1e-3
    shifted = lambda s: float(loss(jax.tree.map(lambda a, d: a + s * d, params, direction)))
    numeric = (shifted(eps) - shifted(-eps)) / (2 * eps)
    assert abs(analytic) > 1e-3 and abs(analytic - numeric) < 0.02 * abs(analytic) + 1e-3, (part, analytic, numeric)


@pytest.mark.parametrize("field, value, match", [
    ("attention_impl", "flash", "attention_impl='flash'.*'xla', 'cudnn'"),
    ("remat_policy", "some", "remat_policy='some'.*'full'"),
    ("encoder_depth", 3, r"encoder_depth=3 must be in \[0, depth=2\]"),
    ("vocab_sizes", (17,) * 5, r"vocab_sizes=\(17, 17, 17, 17, 17\) must hold 1 to 4"),
    ("num_heads", 3, "hidden_size=64 is not divisible by num_heads=3"),
])
def test_invalid_fields_are_named(field, value, match):
  model = LlamaGen(**{**_fields("ar"), field: value})
  with pytest.raises(ValueError, match=match):
    jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, 16), np.int32), np.zeros((1,), np.int32))


def test_wrong_tokens_are_named():
  fact = LlamaGen(**_fields("fact"))
  with pytest.raises(ValueError, match=r"shape \(1, 16\).*integer tokens \(B, S, 2\) with S in \[1, 16\]"):
    jax.eval_shape(fact.init, jax.random.key(0), np.zeros((1, 16), np.int32), np.zeros((1,), np.int32))
  ar = LlamaGen(**_fields("ar"))
  with pytest.raises(ValueError, match=r"shape \(1, 17\)"):
    jax.eval_shape(ar.init, jax.random.key(0), np.zeros((1, 17), np.int32), np.zeros((1,), np.int32))
  with pytest.raises(ValueError, match="decode_subtoken is for factorized models"):
    jax.eval_shape(functools.partial(ar.init, method=LlamaGen.decode_subtoken), jax.random.key(0),
                   np.zeros((1, 64), np.float32), np.zeros((1, 1), np.int32), 0)


def test_attention_impl_selects_the_dot_product_attention_implementation(monkeypatch):
  seen = []
  real = jax.nn.dot_product_attention

  def spy(*args, implementation=None, **kwargs):
    seen.append((args[0].shape[1], implementation))
    return real(*args, **kwargs)  # XLA's: cuDNN needs a GPU

  monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
  model = LlamaGen(**_fields("fact", attention_impl="cudnn", grid_size=4))
  jax.eval_shape(model.init, jax.random.key(0), *example_inputs(model))
  assert set(seen) == {(16, "cudnn"), (2, "xla")}  # the trunk; the 2-long sub-token sequences


# ------------------------------------------------------------------ converter and load_model

def _config_yaml(model_type, vq=False, bits=None, image_size=256, num_classes=1000, ratio=16, use_repa=True):
  """The official config.yaml's fields that the converter reads."""
  tokenizer = ({"vqvae": {"vq_model": "VQ-16", "codebook_size": 16384, "codebook_embed_dim": 8,
                          "downsample_ratio": ratio}} if vq
               else {"fsq": {"config_path": "config.json", "factorized_bits": bits, "downsample_ratio": ratio}})
  return {"data": {"image_size": image_size, "num_classes": num_classes, "offline_features": False}, **tokenizer,
          "model": {"model_type": model_type, "drop_path_rate": 0.0, "dropout_p": 0.1, "token_dropout_p": 0.1,
                    "use_checkpoint": False},
          "repa": {"use_repa": use_repa, "enc_type": "dinov2-vit-b", "encoder_depth": 8, "proj_coef": 2.0}}


def test_converter_refuses_unmapped_missing_and_foreign_entries(golden):
  sd, fields = golden["fact"]["sd"], _fields("fact")
  bad = {k: v for k, v in sd.items() if k != "layers.1.feed_forward.w3.weight"}
  bad["layers.1.extra.weight"] = np.ones((2,), np.float32)
  with pytest.raises(torch_io.ConversionError, match=r"layers.1.feed_forward.w3.weight -> layers_1/feed_forward/w3"):
    conv.to_params(bad, fields)
  with pytest.raises(torch_io.ConversionError, match=r"1 checkpoint entries are not mapped: \['layers.1.extra"):
    conv.to_params({**sd, "layers.1.extra.weight": np.ones((2,), np.float32)}, fields)
  dropped = torch_io.Dropped()
  params = conv.to_params(bad, fields, allow_partial=True, dropped=dropped)
  assert dropped.unmapped == ["layers.1.extra.weight"] and dropped.left_at_init == ["layers_1/feed_forward/w3/kernel"]
  w3 = params["layers"]["feed_forward"]["w3"]["kernel"]
  assert abs(w3[1].std() - 0.02) < 0.003  # its initial value
  np.testing.assert_array_equal(w3[0], sd["layers.0.feed_forward.w3.weight"].T)
  with pytest.raises(torch_io.ConversionError, match=r"cls_embedding.embedding_table.weight: checkpoint shape \(11,"):
    conv.to_params(sd, {**fields, "num_classes": 1000})
  with pytest.raises(torch_io.ConversionError, match=r"factorized_bits=\[2, 2\] means 2 sub-token group\(s\)"):
    conv.fields_from_reference(_config_yaml("LlamaGen-B", bits=[2, 2]), conv.vocab_sizes_of(golden["ar"]["sd"]))
  with pytest.raises(torch_io.ConversionError, match=r"vqvae.codebook_size=16384.*vocabulary \(289,\)"):
    conv.fields_from_reference(_config_yaml("LlamaGen-B", vq=True), (289,))
  with pytest.raises(torch_io.ConversionError, match="model_type='GPT-B'"):
    conv.fields_from_reference(_config_yaml("GPT-B"), (289,))
  assert conv.fields_from_reference(_config_yaml("LlamaGen-XXXL", use_repa=False), (289,)) == llamagen_config(
      "3B", vocab_sizes=(289,), z_dim=0)


def test_state_dict_round_trip_in_both_layouts(golden):
  sd, fields = golden["fact"]["sd"], _fields("fact")
  scanned = conv.to_params(sd, fields)
  assert scanned["factorized_blocks"]["attention"]["wqkv"]["kernel"].shape == (2, 64, 3, 4, 16)
  assert scanned["layers"]["attention"]["wo"]["kernel"].shape == (2, 4, 16, 64)
  unscanned = conv.to_params(sd, {**fields, "scan_layers": False})
  for params in (scanned, unscanned):
    back = conv.to_state_dict(params, fields)
    assert sorted(back) == sorted(sd)
    for key, value in sd.items():
      np.testing.assert_array_equal(back[key], value, err_msg=key)


@pytest.fixture(scope="module")
def official_checkpoint(tmp_path_factory):
  """A random factorized LlamaGen-S (4 x 4 grid, 10 classes, no REPA) saved as llamagen/train.py does."""
  import torch  # pylint: disable=g-import-not-at-top
  run = _config_yaml("LlamaGen-S", bits=[1, 1], image_size=64, num_classes=10, use_repa=False)
  fields = conv.fields_from_reference(run, (17, 17))
  assert fields == llamagen_config("S", vocab_sizes=(17, 17), grid_size=4, num_classes=10, z_dim=0)
  ema = _random_params(LlamaGen(**fields), seed=1)
  raw = {k: jax.tree.map(lambda a: -a, v) if k.startswith("output") else v for k, v in ema.items()}
  tensors = lambda p: {k: torch.tensor(v) for k, v in conv.to_state_dict(p, fields).items()}
  path = tmp_path_factory.mktemp("official") / "0025000.pt"
  torch.save({"model": tensors(raw), "ema": tensors(ema), "opt": {"state": {}, "param_groups": [{"lr": 1e-4}]},
              "config": run}, path)
  (path.parent / "config.yaml").write_text(yaml.safe_dump(run))
  return path, fields, ema, raw


def test_convert_cli_then_load_model_gives_the_same_logits(official_checkpoint, tmp_path, capsys):
  path, fields, ema, raw = official_checkpoint
  rng = np.random.default_rng(0)
  tokens, labels = rng.integers(0, 17, size=(2, 16, 2)), np.array([4, 10])
  for flags, weights in (([], ema), (["--no_ema", "--config", str(path.parent / "config.yaml")], raw)):
    out_dir = tmp_path / ("ema" if weights is ema else "model")
    assert convert_main.main(["llamagen", "--checkpoint", str(path), "--out", str(out_dir), *flags]) == 0
    assert "Converted llamagen LlamaGen-S (vocabulary 17+17)" in capsys.readouterr().out
    module, params = ifsq_jax.load_model(str(out_dir))
    assert module == LlamaGen(**fields) and module.scan_layers and module.vocab_sizes == (17, 17)
    want, got = (_logits(module, p, tokens, labels) for p in (weights, params))
    for a, b in zip(got, want, strict=True):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.abs(np.asarray(got[1])).max() > 0.01


def test_load_model_from_a_llamagen_work_dir(tmp_path):
  fields = _fields("fact", z_dim=0)
  params = _random_params(LlamaGen(**fields))
  ema = jax.tree.map(lambda a: a + 1.0, params)
  config = {"task": "llamagen", "model": {**fields, "vocab_sizes": list(fields["vocab_sizes"])}}  # as JSON has it
  workdir = tmp_path / "run"
  ck = checkpoint.Checkpointer(workdir / "checkpoints", async_save=False)
  ck.save(5, {"step": np.int32(5), "params": params, "ema_params": ema}, {"next_step": 5}, config)
  ck.close()
  (workdir / "config.json").write_text(json.dumps(config))
  module, got = ifsq_jax.load_model(str(workdir), dtype=jnp.bfloat16)
  assert module == LlamaGen(**fields, dtype=jnp.bfloat16) and module.vocab_sizes == (17, 17)
  np.testing.assert_array_equal(got["emb_1"]["embedding"], ema["emb_1"]["embedding"])
  _, got = ifsq_jax.load_model(str(workdir / "checkpoints" / "5"), ema=False)
  np.testing.assert_array_equal(got["norm"]["scale"], params["norm"]["scale"])
  (workdir / "config.json").write_text(json.dumps({"task": "toy"}))
  with pytest.raises(ValueError, match="holds a 'toy' run; load_model opens generator runs"):
    ifsq_jax.load_model(str(workdir))

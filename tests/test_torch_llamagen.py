"""bench/torch_llamagen.py, the PyTorch side of bench/llamagen_bench.py, is the official LlamaGen, and the JAX one.

Golden models: section 5 of tests/golden/README.md (2 layers, width 64, 4 heads, a 4 x 4 grid,
10 classes, REPA Z 32 after layer 1; "ar" one 289-way vocabulary, "fact" two 17-way groups).
"""

import functools
import json
import sys

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import GOLDEN, REPO
from ifsq_jax.convert import llamagen as conv
from ifsq_jax.models.llamagen import LlamaGen, llamagen_config
from ifsq_jax.sampling import autoregressive as ar

sys.path.insert(0, str(REPO / "bench"))
import torch_llamagen  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

SMALL = dict(dim=64, n_layer=2, n_head=4, block_size=16, num_classes=10, z_dims=[32], encoder_depth=1,
             projector_dim=64, token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0)
JAX_SMALL = dict(grid_size=4, hidden_size=64, depth=2, num_heads=4, num_classes=10, z_dim=32, encoder_depth=1,
                 projector_dim=64)
VOCABS = {"ar": [289], "fact": [17, 17]}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
  """Tiny models: one thread. Spinning OpenMP threads on a loaded 2-core machine made the step-by-step
  sampling loops over 100x slower (9 s instead of 0.07 s)."""
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def golden():
  return dict(np.load(GOLDEN / "llamagen_small.npz"))


@functools.cache
def _official(kind):
  """The golden model in eval mode (its label dropout off, as the fixture's)."""
  g = np.load(GOLDEN / "llamagen_small.npz")
  model = torch_llamagen.TorchLlamaGen(vocab_size=VOCABS[kind], **SMALL)
  model.load_state_dict({k[len(kind) + 4:]: torch.tensor(g[k]) for k in g.files if k.startswith(f"{kind}/sd/")},
                        strict=True)
  return model.eval()


def _inputs(golden, kind):
  """(tokens: a (B, N) tensor or a list of G, labels (B,))."""
  if kind == "ar":
    return torch.tensor(golden["ar/tokens"]), torch.tensor(golden["ar/cond"])
  return [torch.tensor(golden[f"fact/tokens{g}"]) for g in range(2)], torch.tensor(golden["fact/cond"])


def _heads(golden, kind, name):
  return [golden[f"ar/{name}"]] if kind == "ar" else [golden[f"fact/{name}{g}"] for g in range(2)]


def _cos_loss(z, target):
  return -F.cosine_similarity(z, target, dim=-1).mean()


@pytest.mark.parametrize("kind", ["ar", "fact"])
def test_teacher_forcing_matches_the_official_logits_repa_and_losses(golden, kind):
  model = _official(kind)
  tokens, labels = _inputs(golden, kind)
  captured = []
  hooks = [m.register_forward_hook(lambda m, i, o: captured.append(o.numpy()))
           for m in [model.tok_dropout, *model.layers]]
  try:
    with torch.no_grad():
      logits, zs = model(tokens, labels)
  finally:
    for h in hooks:
      h.remove()
  logits = logits if kind == "fact" else [logits]
  for got, want in zip(logits, _heads(golden, kind, "logits"), strict=True):
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), want, atol=2e-5)
  assert len(zs) == 1
  np.testing.assert_allclose(zs[0].numpy(), golden[f"{kind}/zs0"], atol=2e-5)
  if kind == "ar":  # the embeddings, then the stream after each layer
    for i, hidden in enumerate(captured):
      np.testing.assert_allclose(hidden, golden[f"ar/hidden/{i}"], atol=2e-5)
  targets = tokens if kind == "fact" else [tokens]
  ce = [F.cross_entropy(l.flatten(0, 1), t.flatten()) for l, t in zip(logits, targets)]
  for got, want in zip(ce, _heads(golden, kind, "ce_loss")):
    np.testing.assert_allclose(float(got), want, atol=1e-5)
  proj = _cos_loss(zs[0], torch.tensor(golden[f"{kind}/repa_target"]))
  np.testing.assert_allclose(float(proj), golden[f"{kind}/proj_loss"], atol=1e-5)
  np.testing.assert_allclose(float(sum(ce) + 2.0 * proj), golden[f"{kind}/total_loss"], atol=1e-5)


@pytest.mark.parametrize("kind", ["ar", "fact"])
def test_kv_cache_steps_match_the_official_step_by_step_logits(golden, kind):
  model = _official(kind)
  tokens, labels = _inputs(golden, kind)
  model.setup_caches(2, 17)
  steps = []
  with torch.no_grad():
    for n in range(16):
      if kind == "ar":
        steps.append([model.prefill(labels) if n == 0 else model.decode_step(tokens[:, n - 1:n], n)])
      else:
        h = model.prefill(labels) if n == 0 else model.decode_step([t[:, n - 1:n] for t in tokens], n)
        steps.append([model.decode_subtoken(h, None, 0), model.decode_subtoken(h, tokens[0][:, n:n + 1], 1)])
  for g, want in enumerate(_heads(golden, kind, "kv_logits")):
    got = torch.stack([s[g] for s in steps], dim=1).numpy()
    np.testing.assert_allclose(got, want, atol=2e-5)
    np.testing.assert_allclose(got, _heads(golden, kind, "logits")[g], atol=2e-5)  # = teacher forcing
  assert not any(k.startswith(("freqs", "causal")) or "cache" in k for k in model.state_dict())


def test_rope_cache_equals_the_reference(golden):
  np.testing.assert_array_equal(torch_llamagen.rope_cache(4, 16).numpy(), golden["rope/freqs_cis"])
  np.testing.assert_allclose(torch_llamagen.rope_cache(16, 64).numpy(), golden["rope/freqs_cis_L"], atol=1e-6)


def test_llamagen_l_has_the_reference_parameters_and_state_dicts():
  variants = json.loads((GOLDEN / "llamagen_full_keys.json").read_text())["variants"]
  for name, variant in variants.items():
    kwargs = torch_llamagen.llamagen_kwargs("L", vocab_size=variant["kwargs"]["vocab_size"])
    assert {k: v for k, v in variant["kwargs"].items() if k != "use_checkpoint"}.items() <= kwargs.items(), name
    with torch.device("meta"):
      model = torch_llamagen.TorchLlamaGen(**kwargs)
    assert sum(p.numel() for p in model.parameters()) == variant["num_params"], name
    assert [(k, list(v.shape)) for k, v in model.state_dict().items()] == \
        [(e["key"], e["shape"]) for e in variant["state_dict"]], name  # the same keys in the same order


def _torch_and_jax(vocab, seed):
  """A torch LlamaGen with every parameter perturbed off its init, and the JAX model with the converted params."""
  torch.manual_seed(seed)
  model = torch_llamagen.TorchLlamaGen(vocab_size=vocab, **dict(SMALL, n_layer=3, encoder_depth=2)).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  fields = llamagen_config("S", vocab_sizes=tuple(vocab), **dict(JAX_SMALL, depth=3, encoder_depth=2))
  params = conv.to_params({k: v.numpy() for k, v in model.state_dict().items()}, fields)
  return model, LlamaGen(**fields), params


@pytest.mark.parametrize("vocab", [[50], [5, 7, 9]], ids=["single", "factorized3"])
def test_jax_model_with_converted_params_gives_the_torch_logits(vocab):
  model, module, params = _torch_and_jax(vocab, seed=len(vocab))
  rng = np.random.default_rng(0)
  tokens = np.stack([rng.integers(0, v, (3, 16)) for v in vocab], axis=-1)  # (B, N, G)
  labels = np.array([0, 7, 10])  # 10: the null class
  with torch.no_grad():
    want, zs = model([torch.tensor(tokens[..., g]) for g in range(len(vocab))] if len(vocab) > 1
                     else torch.tensor(tokens[..., 0]), torch.tensor(labels))
  got, z = jax.jit(lambda p, t, y: module.apply({"params": p}, t, y, return_repa=True))(
      params, tokens if len(vocab) > 1 else tokens[..., 0], labels)
  got, want = (got, want) if len(vocab) > 1 else ((got,), [want])
  for g, w in zip(got, want, strict=True):
    assert np.abs(w.numpy()).max() > 0.1  # not the zero heads of a fresh model
    np.testing.assert_allclose(np.asarray(g), w.numpy(), atol=2e-5)
  np.testing.assert_allclose(np.asarray(z), zs[0].numpy(), atol=2e-5)


def _jax_small(kind):
  g = np.load(GOLDEN / "llamagen_small.npz")
  fields = llamagen_config("S", vocab_sizes=tuple(VOCABS[kind]), **JAX_SMALL)
  return LlamaGen(**fields), conv.to_params({k[len(kind) + 4:]: g[k] for k in g.files
                                             if k.startswith(f"{kind}/sd/")}, fields)


@pytest.mark.parametrize("kind, cfg", [("ar", 2.0), ("fact", 2.0), ("ar", 1.0)])
def test_greedy_decoding_equals_jax_generate(kind, cfg):
  labels = np.array([3, 5, 9, 3])
  module, params = _jax_small(kind)
  tokens, logits = ar.generate(module, params, labels, jax.random.key(0), cfg_scale=cfg, top_k=1,
                               return_logits=True)
  for l in (logits if kind == "fact" else (logits,)):  # no near-ties: the argmax is the same in both frameworks
    top2 = np.sort(np.asarray(l), axis=-1)[..., -2:]
    assert (top2[..., 1] - top2[..., 0]).min() > 1e-4
  sampler = torch_llamagen.generate_group if kind == "fact" else torch_llamagen.generate
  got = sampler(_official(kind), torch.tensor(labels), cfg_scale=cfg, top_k=1)
  assert got.shape == np.asarray(tokens).shape and got.dtype == torch.int64
  np.testing.assert_array_equal(got.numpy(), np.asarray(tokens))
  assert len(np.unique(got.numpy())) > 4


def test_cfg_interval_guides_the_first_tokens_only():
  """Interval k: tokens 0..k+1 guided (JAX's (0, (k + 2) / N)); greedy with and without guidance differ."""
  module, params = _jax_small("ar")
  labels, k = np.array([3, 5]), 5
  model = _official("ar")
  guided = torch_llamagen.generate(model, torch.tensor(labels), cfg_scale=4.0, cfg_interval=k, top_k=1)
  plain = torch_llamagen.generate(model, torch.tensor(labels), top_k=1)
  assert not torch.equal(guided[:, :k + 2], plain[:, :k + 2])
  want = ar.generate(module, params, labels, jax.random.key(0), cfg_scale=4.0, cfg_interval=(0.0, (k + 2) / 16),
                     top_k=1)
  np.testing.assert_array_equal(guided.numpy(), np.asarray(want))


def test_filtering_equals_jax_and_sampling_stays_inside_it():
  logits = torch.randn(64, 300, generator=torch.Generator().manual_seed(0)) * 3
  for top_k, top_p in [(5, 1.0), (0, 0.5), (20, 0.8), (400, 1.0)]:
    kept = torch.isfinite(torch_llamagen.top_k_top_p_filtering(logits, top_k, top_p)).numpy()
    np.testing.assert_array_equal(kept, np.isfinite(np.asarray(ar.filter_logits(logits.numpy(), top_k=top_k,
                                                                                 top_p=top_p))))
    drawn = torch_llamagen.sample(logits.repeat(8, 1), top_k=top_k, top_p=top_p,
                                  generator=torch.Generator().manual_seed(1))
    assert drawn.shape == (512, 1) and np.take_along_axis(np.tile(kept, (8, 1)), drawn.numpy(), 1).all()
  assert kept.all()  # k beyond V keeps everything
  np.testing.assert_array_equal(torch_llamagen.sample(logits, top_k=1)[:, 0], logits.argmax(-1))  # greedy


def test_training_mode_drops_out_and_eval_mode_is_deterministic(golden):
  model = torch_llamagen.TorchLlamaGen(vocab_size=[289], **dict(SMALL, token_dropout_p=0.1, resid_dropout_p=0.1))
  model.load_state_dict(_official("ar").state_dict())
  tokens, labels = _inputs(golden, "ar")
  with torch.no_grad():
    model.train()
    a, b = model(tokens, labels)[0], model(tokens, labels)[0]
    model.eval()
    c = model(tokens, labels)[0]
  assert not torch.allclose(a, b)
  np.testing.assert_allclose(c.numpy(), golden["ar/logits"], atol=2e-5)


def test_presets_and_refusals():
  kwargs = torch_llamagen.llamagen_kwargs("B", z_dims=[])
  assert (kwargs["n_layer"], kwargs["dim"], kwargs["n_head"]) == (12, 768, 12)
  with pytest.raises(ValueError, match="size='M'"):
    torch_llamagen.llamagen_kwargs("M")
  with pytest.raises(ValueError, match="unknown TorchLlamaGen arguments \\['n_layers'\\]"):
    torch_llamagen.llamagen_kwargs("B", n_layers=3)
  for bad, match in [(dict(block_size=15), "block_size=15"), (dict(drop_path_rate=0.1), "drop_path_rate=0.1"),
                     (dict(encoder_depth=3), "encoder_depth=3"), (dict(n_head=5), "n_head=5")]:
    with pytest.raises(ValueError, match=match):
      torch_llamagen.TorchLlamaGen(**{**SMALL, **bad})


def test_bench_builds_the_same_model_in_both_frameworks_and_counts_its_flops():
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import llamagen_bench  # pylint: disable=g-import-not-at-top
  from ifsq_jax.models.llamagen import example_inputs, num_params  # pylint: disable=g-import-not-at-top

  for fields in (llamagen_bench.model_fields("B", 8, (83521,)), llamagen_bench.model_fields("L", 16, (289, 289))):
    module = LlamaGen(**fields)
    params = jax.eval_shape(module.init, jax.random.key(0), *example_inputs(module))["params"]
    with torch.device("meta"):
      model = torch_llamagen.TorchLlamaGen(**llamagen_bench.torch_kwargs(fields))
    assert sum(p.numel() for p in model.parameters()) == num_params(params)
  # The analytic count is XLA's count of the matmuls; XLA adds the elementwise work.
  for vocab in ((300,), (40, 50)):
    fields = llamagen_bench.model_fields("S", 4, vocab, depth=2, scan_layers=False)
    module = LlamaGen(**fields)
    inputs = example_inputs(module, batch=2)
    params = nn.meta.unbox(jax.eval_shape(module.init, jax.random.key(0), *inputs)["params"])
    cost = jax.jit(lambda p, m=module, x=inputs: m.apply({"params": p}, *x)).lower(params).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    assert 1.0 < cost["flops"] / (2 * llamagen_bench.forward_flops(fields)) < 1.05, vocab

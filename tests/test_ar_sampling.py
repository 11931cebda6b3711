"""LlamaGen sampling with the KV cache: greedy and drawn tokens against teacher forcing, guidance and its
interval, top-k and top-p, per-row randomness, 1 versus 8 devices, and one compiled loop over positions.

The models are the golden small LlamaGens (tests/golden/llamagen_small.npz, section 5 of its README):
a 4 x 4 grid (N = 16), 10 classes; "ar" has one 289-way vocabulary, "fact" two 17-way sub-token groups.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import GOLDEN
from ifsq_jax import parallel
from ifsq_jax.convert import llamagen as conv
from ifsq_jax.models.llamagen import LlamaGen, llamagen_config
from ifsq_jax.sampling import autoregressive as ar

SMALL = dict(grid_size=4, hidden_size=64, depth=2, num_heads=4, num_classes=10, z_dim=32, encoder_depth=1,
             projector_dim=64)
VOCABS = {"ar": (289,), "fact": (17, 17)}
N = 16
NULL = 10
LABELS = np.array([3, 3, 5, 9], np.int32)  # rows 0 and 1 share a label


def _fields(kind, **overrides):
  return llamagen_config("S", vocab_sizes=VOCABS[kind], **{**SMALL, **overrides})


@functools.cache
def _model(kind):
  g = np.load(GOLDEN / "llamagen_small.npz")
  sd = {k[len(kind) + 4:]: g[k] for k in g.files if k.startswith(f"{kind}/sd/")}
  fields = _fields(kind)
  return LlamaGen(**fields), conv.to_params(sd, fields)


@functools.cache
def _run(kind, seed=0, **options):
  """(tokens, logits per group) of a generate call, computed once per test session."""
  model, params = _model(kind)
  tokens, logits = ar.generate(model, params, LABELS, jax.random.key(seed), return_logits=True, **options)
  return np.asarray(tokens), tuple(np.asarray(l) for l in (logits if model.factorized else (logits,)))


@functools.partial(jax.jit, static_argnums=0)
def _forced(model, params, tokens, labels):
  """Teacher-forced logits per group (B, N, V_g)."""
  logits = model.apply({"params": params}, tokens, labels)
  return logits if model.factorized else (logits,)


def _groups(tokens):
  return tokens if tokens.ndim == 3 else tokens[..., None]


@pytest.mark.parametrize("kind", ["ar", "fact"])
def test_greedy_equals_the_argmax_of_teacher_forcing_on_the_growing_prefix(kind):
  model, params = _model(kind)
  tokens, _ = _run(kind, top_k=1)
  assert tokens.dtype == np.int32 and tokens.shape == (4, N) + ((2,) if kind == "fact" else ())
  # Rebuild the greedy sequence without the cache: rerun the whole teacher-forced model for each
  # (sub-)token; entries not drawn yet are zeros, which causality keeps out of the logits read.
  prefix = np.zeros((4, N, len(model.vocab_sizes)), np.int32)
  for n in range(N):
    for g in range(len(model.vocab_sizes)):
      logits = _forced(model, params, prefix if model.factorized else prefix[..., 0], LABELS)[g]
      prefix[:, n, g] = np.argmax(np.asarray(logits[:, n]), axis=-1)
  np.testing.assert_array_equal(_groups(tokens), prefix)
  assert len(np.unique(tokens)) > 4  # a real sequence, not a constant
  np.testing.assert_array_equal(tokens[0], tokens[1])  # greedy: the same label gives the same sequence


@pytest.mark.parametrize("kind", ["ar", "fact"])
def test_kv_cache_logits_equal_teacher_forced_logits_of_the_drawn_tokens(kind):
  model, params = _model(kind)
  tokens, logits = _run(kind)
  forced = _forced(model, params, tokens, LABELS)
  for got, want in zip(logits, forced, strict=True):
    assert got.shape == want.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, np.asarray(want), atol=2e-5)


@pytest.mark.parametrize("kind", ["ar", "fact"])
def test_rows_draw_their_own_randomness(kind):
  tokens, _ = _run(kind)
  assert not np.array_equal(tokens[0], tokens[1])  # the same label and key: different samples
  again, _ = _run(kind, seed=1)
  assert not np.array_equal(tokens, again)
  model, params = _model(kind)
  # Row r's sample depends on (key, r) only: the first two rows alone draw the same tokens.
  np.testing.assert_array_equal(np.asarray(ar.generate(model, params, LABELS[:2], jax.random.key(0))), tokens[:2])


def test_cfg_scale_one_equals_a_doubled_batch_that_is_never_guided():
  plain, plain_logits = _run("ar")
  doubled, doubled_logits = _run("ar", cfg_scale=3.0, cfg_interval=(0.0, 0.0))
  np.testing.assert_array_equal(plain, doubled)
  np.testing.assert_allclose(plain_logits[0], doubled_logits[0], atol=1e-5)


@pytest.mark.parametrize("kind", ["ar", "fact"])
def test_guidance_is_u_plus_s_times_c_minus_u_inside_the_interval_only(kind):
  model, params = _model(kind)
  scale, interval = 2.5, (0.25, 0.75)
  tokens, logits = _run(kind, cfg_scale=scale, cfg_interval=interval)
  # Teacher forcing on the drawn tokens, with the labels and with the null label: the unconditional half
  # matches only if it was fed the same tokens as the conditional one.
  cond = _forced(model, params, tokens, LABELS)
  uncond = _forced(model, params, tokens, np.full_like(LABELS, NULL))
  inside = np.arange(N)[(np.arange(N) >= 4) & (np.arange(N) < 12)]  # lo <= n / 16 < hi
  outside = np.setdiff1d(np.arange(N), inside)
  for got, c, u in zip(logits, cond, uncond, strict=True):
    c, u = np.asarray(c), np.asarray(u)
    np.testing.assert_allclose(got[:, inside], (u + scale * (c - u))[:, inside], atol=1e-4)
    np.testing.assert_allclose(got[:, outside], c[:, outside], atol=2e-5)
    assert np.abs(c - u)[:, inside].max() > 0.1  # the two predictions differ: the test can tell them apart


def test_guided_positions_reproduce_the_reference_integer_interval():
  for k in range(-1, N):
    hi = 1.0 if k == -1 else min(1.0, (k + 2) / N)  # the reference guides tokens 0..k+1 (-1: all)
    want = np.arange(N) <= (N if k == -1 else k + 1)
    np.testing.assert_array_equal(ar.guided_positions(N, (0.0, hi)), want)
  np.testing.assert_array_equal(ar.guided_positions(N, (0.5, 1.0)), np.arange(N) >= 8)
  assert not ar.guided_positions(N, (0.3, 0.3)).any()


def _ranks(logits, tokens):
  """Rank of each drawn token among its logits (0 = the largest)."""
  chosen = np.take_along_axis(logits, tokens[..., None], -1)
  return np.sum(logits > chosen, axis=-1)


def test_top_k_never_draws_outside_the_k_best():
  tokens, (logits,) = _run("ar", top_k=3, temperature=3.0)
  ranks = _ranks(logits, tokens)
  assert ranks.max() < 3
  assert (ranks > 0).mean() > 0.2  # it draws, it is not greedy


def test_top_p_draws_from_the_nucleus():
  temperature, p = 2.0, 0.3
  tokens, (logits,) = _run("ar", top_p=p, temperature=temperature)
  probs = np.asarray(jax.nn.softmax(logits.astype(np.float64) / temperature, axis=-1))
  chosen = np.take_along_axis(probs, tokens[..., None], -1)
  mass_before = np.sum(np.where(probs > chosen, probs, 0.0), axis=-1)  # of the tokens ranked above it
  assert mass_before.max() <= p + 1e-6
  assert (_ranks(logits, tokens) > 0).mean() > 0.2


def test_filter_logits_keeps_the_top_k_then_the_nucleus():
  probs = np.array([[0.05, 0.5, 0.15, 0.3]])
  logits = jnp.log(probs)
  kept = lambda **kw: np.flatnonzero(np.isfinite(np.asarray(ar.filter_logits(logits, **kw))[0])).tolist()
  assert kept(top_p=0.4) == [1]  # the first token always stays
  assert kept(top_p=0.7) == [1, 3]  # 0.5 <= 0.7: the next one, which crosses p, stays too
  assert kept(top_p=0.85) == [1, 2, 3]
  assert kept(top_k=2) == [1, 3] and kept(top_k=9) == [0, 1, 2, 3]  # k beyond V keeps everything
  assert kept(top_k=2, top_p=0.6) == [1]  # top-p on the top-k renormalised: 0.5 / 0.8 > 0.6
  assert kept(top_k=3, top_p=0.6) == [1, 3]  # 0.5 / 0.95 <= 0.6
  keys = jax.random.split(jax.random.key(0), 1000)
  drawn = np.asarray(ar.sample_logits(jnp.tile(logits, (1000, 1)), keys, top_k=3))
  counts = np.bincount(drawn, minlength=4) / 1000
  assert counts[0] == 0 and np.allclose(counts[[1, 2, 3]], np.array([0.5, 0.15, 0.3]) / 0.95, atol=0.05)


def test_eight_sharded_devices_give_the_one_device_samples():
  assert jax.device_count() == 8
  model, params = _model("ar")
  labels = np.arange(16, dtype=np.int32) % 10
  run = functools.partial(ar.generate, model, cfg_scale=2.0, cfg_interval=(0.0, 0.5), top_p=0.9)
  one = run(params, jax.device_put(labels, jax.devices()[0]), jax.random.key(5))
  mesh = parallel.make_mesh(data=-1)
  with parallel.sharding_context(mesh, parallel.DEFAULT_RULES):
    sharded = jax.device_put(labels, parallel.batch_sharding(mesh, 1))
    eight = jax.jit(run, out_shardings=parallel.batch_sharding(mesh, 2))(
        jax.device_put(params, parallel.replicated(mesh)), sharded, jax.random.key(5))
  assert len(eight.sharding.device_set) == 8
  np.testing.assert_array_equal(np.asarray(eight), np.asarray(one))


def _eqns(jaxpr):
  """Every equation of a jaxpr, nested ones (jit, loop bodies) included."""
  for eqn in jaxpr.eqns:
    yield eqn
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      yield from _eqns(sub)


@pytest.mark.parametrize("kind", ["ar", "fact"])
def test_decoding_is_one_loop_over_positions_with_the_step_traced_once(kind):
  # Scanned layers, as trained: decoding unrolls them (a scan would rewrite the stacked cache every step), so
  # the only loop left is the sampler's.
  model, params = _model(kind)
  jaxpr = jax.make_jaxpr(functools.partial(ar.generate, model, cfg_scale=2.0, top_k=5))(
      params, LABELS, jax.random.key(0))
  eqns = list(_eqns(jaxpr.jaxpr))
  loops = [e for e in eqns if e.primitive.name in ("scan", "while")]
  assert len(loops) == 1 and loops[0].params.get("length") == N - 1
  # The attention's qkv projection (output (..., 3, K, d)) appears once per block per traced trunk or
  # sub-token step: the prefill's and the loop body's, nothing unrolled over positions.
  qkv = [e for e in eqns if e.primitive.name == "dot_general" and e.outvars[0].aval.shape[-3:] == (3, 4, 16)]
  groups = len(VOCABS[kind])
  per_position = model.depth + (groups * model.factorized_depth if model.factorized else 0)
  assert len(qkv) == 2 * per_position


@pytest.mark.parametrize("kwargs, match", [
    (dict(cfg_scale=-1.0), "cfg_scale"),
    (dict(cfg_interval=(0.6, 0.4)), "cfg_interval"),
    (dict(temperature=-0.5), "temperature"),
    (dict(top_k=-1), "top_k"),
    (dict(top_k=2.5), "top_k"),
    (dict(top_p=1.5), "top_p"),
    (dict(null_label=11), "null_label"),
])
def test_bad_options_raise_value_errors(kwargs, match):
  model, params = _model("ar")
  with pytest.raises(ValueError, match=match):
    ar.generate(model, params, LABELS, jax.random.key(0), **kwargs)


def test_bad_labels_and_modules_are_named():
  model, params = _model("ar")
  with pytest.raises(ValueError, match="labels"):
    ar.generate(model, params, LABELS[:, None], jax.random.key(0))
  with pytest.raises(ValueError, match="labels"):
    ar.generate(model, params, LABELS.astype(np.float32), jax.random.key(0))
  with pytest.raises(ValueError, match="LlamaGen"):
    ar.generate(object(), params, LABELS, jax.random.key(0))

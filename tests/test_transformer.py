"""The shared transformer parts of ifsq_jax.models.transformer, on tiny shapes.

The dense layer's float32 accumulation, the scanned stack against the unscanned
one (REPA tap, remat policies, values and gradients), RoPE, the KV cache against a
full causal forward, QK-norm, SwiGLU's two layouts and the shared field checks.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ifsq_jax.models import dit, llamagen, transformer

WIDTH, HEADS = 16, 2


def _init(module, *args, **kwargs):
  return nn.meta.unbox(module.init(jax.random.key(0), *args, **kwargs))


# ------------------------------------------------------------------ Dense

def test_dense_accumulates_and_adds_its_bias_in_float32_under_bfloat16():
  # x @ k = 1 + 2^-10: exact in float32, 1 in bfloat16. With the bias -1 added in float32 the
  # result is 2^-10 (a bfloat16 number); rounding the product to bfloat16 first would give 0.
  x = jnp.array([[1.0, 2.0 ** -10]], jnp.bfloat16)
  params = {"params": {"kernel": jnp.ones((2, 1)), "bias": -jnp.ones((1,))}}
  out = transformer.Dense((1,), ("embed", "mlp"), dtype=jnp.bfloat16).apply(params, x)
  assert out.dtype == jnp.bfloat16 and float(out[0, 0]) == 2.0 ** -10
  out32 = transformer.Dense((1,), ("embed", "mlp"), dtype=jnp.bfloat16, out_dtype=jnp.float32).apply(params, x)
  assert out32.dtype == jnp.float32 and float(out32[0, 0]) == 2.0 ** -10
  jaxpr = jax.make_jaxpr(lambda p, x: transformer.Dense((1,), ("embed", "mlp"), dtype=jnp.bfloat16).apply(p, x))(
      params, x)
  dots = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"]
  assert [e.params["preferred_element_type"] for e in dots] == [jnp.float32]
  assert [tuple(v.aval.dtype for v in e.invars) for e in dots] == [(jnp.bfloat16, jnp.bfloat16)]


def test_dense_contracts_several_input_axes_and_inits_as_told():
  x = np.random.default_rng(0).normal(size=(3, 2, 4)).astype(np.float32)
  layer = transformer.Dense((5,), ("heads", "kv", "embed"), n_in=2)
  p = _init(layer, x)["params"]
  assert p["kernel"].shape == (2, 4, 5) and p["bias"].shape == (5,)
  bound = np.sqrt(6 / (8 + 5))  # xavier-uniform on the (8, 5) view
  assert np.abs(p["kernel"]).max() <= bound
  np.testing.assert_allclose(layer.apply({"params": p}, x), x.reshape(3, 8) @ p["kernel"].reshape(8, 5), atol=1e-5)
  assert not np.any(_init(transformer.Dense((5,), ("embed", "mlp"), zero_init=True), x)["params"]["kernel"])
  assert "bias" not in _init(transformer.Dense((5,), ("embed", "mlp"), use_bias=False), x)["params"]


# ------------------------------------------------------------------ the stack

class _Block(nn.Module):
  """A pre-norm attention + SwiGLU block with a broadcast array and a Python flag, as the models' blocks take."""

  causal: bool = False

  @nn.compact
  def __call__(self, x, rope, double: bool):
    h = transformer.Attention(HEADS, qk_norm="rmsnorm", causal=self.causal, name="attn")(
        transformer.norm("rmsnorm", jnp.float32, "norm1", eps=1e-6)(x), rope)
    x = x + (2 * h if double else h)
    return x + transformer.SwiGLU(24, name="mlp")(transformer.norm("rmsnorm", jnp.float32, "norm2", eps=1e-6)(x))


class _Stack(nn.Module):
  depth: int = 3
  scan: bool = True
  remat: str = "none"
  tap_layer: int | None = None

  def setup(self):
    self.blocks = transformer.block_stack(_Block, self.depth, scan_layers=self.scan, remat=self.remat,
                                          static_argnums=(3,))

  def __call__(self, x, double=False):
    angles = jnp.asarray(transformer.rope_angles(np.arange(x.shape[1]), WIDTH // HEADS))
    return transformer.run_stack(self.blocks, self.depth, x, (jnp.cos(angles), jnp.sin(angles)), double,
                                 tap_layer=self.tap_layer)


def _x(seed=0, n=5):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(2, n, WIDTH)).astype(np.float32))


def _stacked(params, depth):
  """Unscanned params (blocks_0, ...) in the scanned layout (blocks with a leading layer axis)."""
  return {"blocks": jax.tree.map(lambda *a: jnp.stack(a), *(params[f"blocks_{i}"] for i in range(depth)))}


@pytest.fixture(scope="module")
def unscanned():
  params = _init(_Stack(scan=False), _x())["params"]
  return jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(1), a.shape), params)  # non-trivial


def test_scanned_stack_has_stacked_params_named_by_the_layers_axis():
  boxed = _Stack().init(jax.random.key(0), _x())["params"]
  leaf = boxed["blocks"]["attn"]["qkv"]["kernel"]
  assert leaf.value.shape == (3, WIDTH, 3, HEADS, WIDTH // HEADS) and leaf.names[0] == "layers"
  assert set(_init(_Stack(scan=False), _x())["params"]) == {"blocks_0", "blocks_1", "blocks_2"}


@pytest.mark.parametrize("tap_layer", [0, 2, 3])
def test_scanned_stack_equals_the_unscanned_one_and_taps_the_chosen_depth(unscanned, tap_layer):
  x = _x()
  out, tap = _Stack(scan=False, tap_layer=tap_layer).apply({"params": unscanned}, x, True)
  out_s, tap_s = _Stack(tap_layer=tap_layer).apply({"params": _stacked(unscanned, 3)}, x, True)
  np.testing.assert_allclose(out_s, out, atol=1e-5)
  np.testing.assert_allclose(tap_s, tap, atol=1e-5)
  # The tap is the stream after block tap_layer: the output of a stack of that depth with the same first blocks.
  if tap_layer:
    first = {f"blocks_{i}": unscanned[f"blocks_{i}"] for i in range(tap_layer)}
    want, _ = _Stack(depth=tap_layer, scan=False).apply({"params": first}, x, True)
  else:
    want = x
  np.testing.assert_allclose(tap, want, atol=1e-5)
  assert _Stack(scan=False).apply({"params": unscanned}, x)[1] is None  # no tap asked


def test_python_arguments_reach_every_block_under_scan(unscanned):
  x = _x()
  once, _ = _Stack().apply({"params": _stacked(unscanned, 3)}, x, False)
  twice, _ = _Stack().apply({"params": _stacked(unscanned, 3)}, x, True)
  assert not np.allclose(once, twice)


@pytest.mark.parametrize("scan", [True, False])
def test_remat_policies_give_the_same_values_and_gradients(unscanned, scan):
  params = _stacked(unscanned, 3) if scan else unscanned
  x = _x()

  def loss(policy):
    def f(p):
      out, tap = _Stack(scan=scan, remat=policy, tap_layer=2).apply({"params": p}, x, True)
      return jnp.sum(out ** 2) + jnp.sum(jnp.sin(tap))
    return jax.jit(jax.value_and_grad(f))(params)

  want_value, want_grad = loss("none")
  for policy in ("full", "dots", "nothing_saveable"):
    value, grad = loss(policy)
    np.testing.assert_allclose(value, want_value, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), grad, want_grad)


def test_remat_wraps_each_block_in_a_checkpoint_with_its_policy():
  x = _x()
  params = _init(_Stack(scan=False), x)["params"]

  def checkpoints(policy):
    """The policies of the checkpoints in the forward program (remat2 in jax 0.10, checkpoint in later names)."""
    jaxpr = jax.make_jaxpr(lambda p: _Stack(scan=False, remat=policy).apply({"params": p}, x)[0])(params)
    return [e.params["policy"] for e in jaxpr.jaxpr.eqns if e.primitive.name in ("remat2", "checkpoint")]

  assert checkpoints("none") == []
  assert checkpoints("full") == [None] * 3
  assert checkpoints("dots") == [jax.checkpoint_policies.dots_saveable] * 3
  with pytest.raises(ValueError, match="remat_policy='some'"):
    transformer.block_stack(_Block, 2, scan_layers=True, remat="some")


# ------------------------------------------------------------------ RoPE

def test_rope_angles_follow_the_pair_frequencies_and_the_2d_split():
  angles = transformer.rope_angles(np.arange(3), 8)
  np.testing.assert_allclose(angles, np.outer(np.arange(3), 10000.0 ** (-np.arange(0, 8, 2) / 8)), rtol=1e-6)
  grid, d = 3, 8
  cells = transformer.rope_angles_2d(grid, d)
  axis = transformer.rope_angles(np.arange(grid), d // 2)
  assert cells.shape == (grid * grid, d // 2) and cells.dtype == np.float32
  for r in range(grid):
    for c in range(grid):
      np.testing.assert_array_equal(cells[r * grid + c], np.concatenate([axis[r], axis[c]]))
  with pytest.raises(ValueError, match="multiple of 4"):
    transformer.rope_angles_2d(2, 6)


def test_rope_keeps_norms_and_makes_scores_depend_on_the_offset_only():
  rng = np.random.default_rng(0)
  q, k = (jnp.asarray(np.broadcast_to(rng.normal(size=(1, 1, 1, 8)), (1, 12, 1, 8)), jnp.float32) for _ in range(2))
  angles = jnp.asarray(transformer.rope_angles(np.arange(12), 8))
  rq, rk = (transformer.apply_rope(a, jnp.cos(angles), jnp.sin(angles)) for a in (q, k))
  np.testing.assert_allclose(jnp.linalg.norm(rq, axis=-1), jnp.linalg.norm(q, axis=-1), rtol=1e-5)
  scores = np.asarray(jnp.einsum("bskd,btkd->st", rq, rk))
  for offset in (0, 1, 5):
    diagonal = np.diagonal(scores, offset)
    np.testing.assert_allclose(diagonal, diagonal[0], rtol=1e-4, atol=1e-5)


def test_the_models_rope_tables_are_the_shared_angles():
  d, grid = 16, 4
  angles = transformer.rope_angles_2d(grid, d)
  cos, sin = dit.rope_tables(d, grid)
  np.testing.assert_allclose(cos[:, ::2], np.cos(angles), atol=1e-6)
  np.testing.assert_allclose(sin[:, 1::2], np.sin(angles), atol=1e-6)
  table = llamagen.rope_table(grid, d)
  assert not np.any(table[0])  # LlamaGen's class position
  np.testing.assert_array_equal(table[1:], np.stack([np.cos(angles), np.sin(angles)], -1))


# ------------------------------------------------------------------ attention

def _attention(**fields):
  return transformer.Attention(HEADS, **fields)


@pytest.mark.parametrize("chunks", [(1, 1, 1, 1, 1, 1), (2, 3, 1)])
def test_kv_cache_decoding_equals_the_full_causal_forward(chunks):
  n = sum(chunks)
  x = _x(1, n)
  angles = jnp.asarray(transformer.rope_angles(np.arange(n), WIDTH // HEADS))
  rope = (jnp.cos(angles), jnp.sin(angles))
  module = _attention(qk_norm="rmsnorm", causal=True, cache_len=n)
  params = _init(module, x, rope)["params"]
  full = module.apply({"params": params}, x, rope)
  cache, start, got = None, 0, []
  for size in chunks:
    part = (rope[0][start:start + size], rope[1][start:start + size])
    variables = {"params": params, **({"cache": cache} if cache is not None else {})}
    out, state = module.apply(variables, x[:, start:start + size], part, jnp.int32(start), mutable=["cache"])
    cache, start = state["cache"], start + size
    got.append(out)
  assert cache["key"].shape == (2, HEADS, n, WIDTH // HEADS)
  np.testing.assert_allclose(jnp.concatenate(got, axis=1), full, atol=1e-5)


def test_kv_cache_misuse_is_named():
  x = _x(0, 2)
  with pytest.raises(ValueError, match="needs a KV cache"):
    _init(_attention(), x, None, jnp.int32(0))
  module = _attention(cache_len=4)
  variables = _init(module, x, None, jnp.int32(0))
  with pytest.raises(ValueError, match="holds 2 sequences, not 1"):
    module.apply(variables, x[:1], None, jnp.int32(2), mutable=["cache"])


def test_qk_norm_makes_attention_blind_to_the_scale_of_q_and_k():
  x = _x(2)
  for kind in transformer.NORMS:
    module = _attention(qk_norm=kind, use_bias=True)
    params = _init(module, x)["params"]
    scaled = jax.tree.map(lambda a: a, params)
    scaled["qkv"] = {name: a.at[..., :2, :, :].multiply(7.0) if name == "kernel" else a.at[:2].multiply(7.0)
                     for name, a in params["qkv"].items()}
    np.testing.assert_allclose(module.apply({"params": scaled}, x), module.apply({"params": params}, x), atol=1e-4)
    assert set(params) == {"qkv", "proj", "q_norm", "k_norm"}
  plain = _init(_attention(names=("wqkv", "wo")), x)["params"]
  assert set(plain) == {"wqkv", "wo"} and "bias" not in plain["wqkv"]


# ------------------------------------------------------------------ MLP, projector, norms

def test_swiglu_fused_and_separate_layouts_compute_the_same():
  x = _x(3)
  fused = transformer.SwiGLU(24, ("w12", "w3"))
  p = _init(fused, x)["params"]
  separate = {"w1": {"kernel": p["w12"]["kernel"][:, 0], "bias": p["w12"]["bias"][0]},
              "w3": {"kernel": p["w12"]["kernel"][:, 1], "bias": p["w12"]["bias"][1]}, "w2": p["w3"]}
  np.testing.assert_allclose(transformer.SwiGLU(24, ("w1", "w3", "w2")).apply({"params": separate}, x),
                             fused.apply({"params": p}, x), atol=1e-6)
  gate = x @ p["w12"]["kernel"][:, 0] + p["w12"]["bias"][0]
  up = x @ p["w12"]["kernel"][:, 1] + p["w12"]["bias"][1]
  want = (jax.nn.silu(gate) * up) @ p["w3"]["kernel"] + p["w3"]["bias"]
  np.testing.assert_allclose(fused.apply({"params": p}, x), want, atol=1e-5)


def test_projector_and_norms_have_the_reference_names():
  p = _init(transformer.Projector(8, 4), _x())["params"]
  assert {k: v["kernel"].shape for k, v in p.items()} == {"linear_0": (16, 8), "linear_1": (8, 8), "linear_2": (8, 4)}
  assert set(_init(transformer.norm("layernorm", jnp.float32, "n", eps=1e-6, affine=False), _x())) == set()
  assert set(_init(transformer.norm("rmsnorm", jnp.float32, "n", eps=1e-6, affine=False), _x())["params"]) == {"scale"}
  with pytest.raises(ValueError, match="'batchnorm' is not valid"):
    transformer.norm("batchnorm", jnp.float32, "n", eps=1e-6)


# ------------------------------------------------------------------ fields

@pytest.mark.parametrize("field, value, match", [
    ("attention_impl", "flash", "attention_impl='flash'.*'xla', 'cudnn'"),
    ("remat_policy", "some", "remat_policy='some'"),
    ("num_heads", 3, "hidden_size=64 is not divisible by num_heads=3"),
    ("encoder_depth", 9, r"encoder_depth=9 must be in \[0, depth=8\]"),
    ("class_dropout_prob", 1.0, r"class_dropout_prob=1.0 must be in \[0, 1\)"),
])
def test_shared_field_checks_name_the_bad_value(field, value, match):
  module = transformer.Generator(**{"hidden_size": 64, "depth": 8, "num_heads": 4, field: value})
  with pytest.raises(ValueError, match=match):
    module._check_shared()  # pylint: disable=protected-access
  transformer.Generator(hidden_size=64, depth=8, num_heads=4)._check_shared()  # pylint: disable=protected-access


def test_sized_config_fills_defaults_and_names_unknown_fields():
  cfg = transformer.sized_config(llamagen.LlamaGen, llamagen.LLAMAGEN_SIZES, "B", z_dim=0)
  assert (cfg["depth"], cfg["hidden_size"], cfg["num_heads"], cfg["z_dim"]) == (12, 768, 12, 0)
  assert "dtype" not in cfg and cfg["grid_size"] == llamagen.LlamaGen.grid_size
  with pytest.raises(ValueError, match=r"DiT has no fields \['depht'\]"):
    transformer.sized_config(dit.DiT, dit.DIT_SIZES, "S", depht=3)
  with pytest.raises(ValueError, match="size='M' is not valid"):
    transformer.sized_config(dit.DiT, dit.DIT_SIZES, "M")

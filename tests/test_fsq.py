"""FSQ / iFSQ behaviour: formulas, index round trips, gradients, dtypes, errors, statistics."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ifsq_jax import FSQ, round_ste


def _numpy_ifsq_codes(z, levels, alpha=1.6):
  """The iFSQ bound written independently in numpy float64 (our even-L rule included)."""
  lv = np.asarray(levels, np.float64)
  act = 2.0 / (1.0 + np.exp(-alpha * z.astype(np.float64))) - 1.0
  bounded = act * (lv - 1) / 2 - np.where(lv % 2 == 0, 0.5, 0.0)
  return bounded, np.round(bounded) / (lv // 2)


def _numpy_tanh_codes(z, levels, eps=1e-3):
  lv = np.asarray(levels, np.float64)
  half_l = (lv - 1) * (1 + eps) / 2
  offset = np.where(lv % 2 == 0, 0.5, 0.0)
  bounded = np.tanh(z.astype(np.float64) + np.arctanh(offset / half_l)) * half_l - offset
  return bounded, np.round(bounded) / (lv // 2)


def _tie_free(rng, shape, bound_fn, margin=1e-4):
  z = rng.standard_normal(shape) * 2.0
  bounded, _ = bound_fn(z)
  keep = np.all(np.abs(np.abs(bounded - np.floor(bounded)) - 0.5) > margin, axis=-1)
  return z[keep].astype(np.float32)


@pytest.mark.parametrize("levels", [(17, 17, 17, 17), (5, 9, 33), (8, 8, 8), (4, 6, 2), (7, 5, 3)])
@pytest.mark.parametrize("alpha", [1.6, 1.0, 2.5])
def test_ifsq_matches_numpy_formula_for_odd_and_even_levels(levels, alpha):
  rng = np.random.default_rng(0)
  fn = lambda z: _numpy_ifsq_codes(z, levels, alpha)
  z = _tie_free(rng, (4000, len(levels)), fn)
  bounded, codes = fn(z)
  fsq = FSQ(levels, bound="ifsq", alpha=alpha)
  np.testing.assert_allclose(np.asarray(fsq.bounded(z)), bounded, rtol=0, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(fsq.quantize(z)), codes.astype(np.float32))


@pytest.mark.parametrize("levels", [(8, 5, 5, 5), (4, 6, 2), (7, 9)])
def test_tanh_bound_matches_numpy_formula(levels):
  rng = np.random.default_rng(1)
  fn = lambda z: _numpy_tanh_codes(z, levels)
  z = _tie_free(rng, (4000, len(levels)), fn)
  bounded, codes = fn(z)
  fsq = FSQ(levels, bound="tanh")
  np.testing.assert_allclose(np.asarray(fsq.bounded(z)), bounded, rtol=0, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(fsq.quantize(z)), codes.astype(np.float32))


def test_even_levels_use_every_level_symmetrically():
  fsq = FSQ((8,), bound="ifsq")
  z = np.linspace(-12, 12, 200001, dtype=np.float32)[:, None]
  digits = np.asarray(fsq.codes_to_digits(fsq.quantize(z)))[:, 0]
  assert set(np.unique(digits)) == set(range(8))
  # Bin edges are symmetric about z = 0: level k for z and level 7 - k for -z (off ties).
  np.testing.assert_array_equal(digits[:100000], 7 - digits[-1:-100001:-1])
  assert float(fsq.quantize(np.zeros((1, 1), np.float32))[0, 0]) == 0.0


def test_activation_by_name_callable_and_alpha_are_consistent():
  z = np.random.default_rng(2).standard_normal((1000, 3)).astype(np.float32)
  levels = (9, 9, 9)
  by_alpha = FSQ(levels, alpha=2.0).bounded(z)
  by_name = FSQ(levels, activation="scale_sigmoid_20").bounded(z)
  by_callable = FSQ(levels, activation=lambda x: 2.0 * jax.nn.sigmoid(2.0 * x) - 1.0).bounded(z)
  np.testing.assert_array_equal(np.asarray(by_alpha), np.asarray(by_name))
  np.testing.assert_array_equal(np.asarray(by_alpha), np.asarray(by_callable))
  # alpha = 2 is tanh (to float rounding), and alpha 1.6 is the default.
  np.testing.assert_allclose(np.asarray(FSQ(levels, activation="tanh").bounded(z)), np.asarray(by_alpha), atol=5e-6)
  np.testing.assert_array_equal(np.asarray(FSQ(levels).bounded(z)),
                                np.asarray(FSQ(levels, activation="scale_sigmoid_16").bounded(z)))


def test_round_ste_rounds_half_to_even_with_identity_gradient():
  x = jnp.array([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 0.49, 0.51])
  np.testing.assert_array_equal(np.asarray(round_ste(x)), [-2, -2, -0, 0, 2, 2, 0, 1])
  np.testing.assert_array_equal(np.asarray(jax.grad(lambda x: jnp.sum(round_ste(x) * 3.0))(x)), np.full(8, 3.0))


@pytest.mark.parametrize("levels", [(8, 5, 5, 5), (7, 5, 3), (2, 3, 4), (17, 17)])
@pytest.mark.parametrize("bound", ["ifsq", "tanh"])
def test_indices_roundtrip_over_whole_codebook(levels, bound):
  fsq = FSQ(levels, bound=bound)
  idx = np.arange(fsq.codebook_size)
  codes = fsq.indices_to_codes(idx)
  np.testing.assert_array_equal(np.asarray(fsq.codes_to_indices(codes)), idx)
  # Every code is distinct, in [-1, 1], and a fixed point of quantization of itself in level units.
  assert len(np.unique(np.asarray(codes), axis=0)) == fsq.codebook_size
  assert float(jnp.max(jnp.abs(codes))) <= 1.0
  digits = np.asarray(fsq.indices_to_digits(idx))
  expected = np.array(list(itertools.product(*[range(l) for l in reversed(levels)])))[:, ::-1]
  np.testing.assert_array_equal(digits, expected)  # channel 0 is least significant


@pytest.mark.parametrize("group_sizes", [(2, 2), (1, 3), (2, 1, 1), (4,)])
def test_factorized_and_global_indices_agree(group_sizes):
  levels = (5, 4, 3, 7)
  single = FSQ(levels)
  grouped = FSQ(levels, group_sizes=group_sizes)
  idx = np.arange(single.codebook_size)
  codes = single.indices_to_codes(idx)
  g_idx = grouped.codes_to_indices(codes)
  assert g_idx.shape == ((single.codebook_size, len(group_sizes)) if len(group_sizes) > 1 else (single.codebook_size,))
  if len(group_sizes) > 1:
    np.testing.assert_array_equal(np.asarray(grouped.group_to_global(g_idx)), idx)
    np.testing.assert_array_equal(np.asarray(grouped.global_to_group(idx)), np.asarray(g_idx))
    assert np.asarray(g_idx).max(0).tolist() == [s - 1 for s in grouped.group_codebook_sizes]
  np.testing.assert_array_equal(np.asarray(grouped.indices_to_codes(g_idx)), np.asarray(codes))


def test_several_codebooks_quantize_independently():
  fsq = FSQ((5, 3), num_codebooks=3, group_sizes=(1, 1))
  one = FSQ((5, 3), group_sizes=(1, 1))
  z = np.random.default_rng(3).standard_normal((2, 7, 6)).astype(np.float32)
  codes = fsq.quantize(z)
  idx = fsq.codes_to_indices(codes)
  assert codes.shape == (2, 7, 6) and idx.shape == (2, 7, 3, 2) and fsq.index_shape == (3, 2)
  for c in range(3):
    part = z[..., 2 * c:2 * c + 2]
    np.testing.assert_array_equal(np.asarray(codes[..., 2 * c:2 * c + 2]), np.asarray(one.quantize(part)))
    np.testing.assert_array_equal(np.asarray(idx[..., c, :]), np.asarray(one.codes_to_indices(one.quantize(part))))
  np.testing.assert_array_equal(np.asarray(fsq.indices_to_codes(idx)), np.asarray(codes))


@pytest.mark.parametrize("bound,levels", [("ifsq", (17, 17, 17, 17)), ("ifsq", (8, 6)), ("tanh", (8, 5, 7))])
def test_straight_through_gradient_equals_gradient_of_the_bound(bound, levels):
  fsq = FSQ(levels, bound=bound)
  rng = np.random.default_rng(4)
  z = rng.standard_normal((64, len(levels))).astype(np.float32) * 2
  w = rng.standard_normal(z.shape).astype(np.float32)
  half_width = np.asarray([l // 2 for l in levels], np.float32)
  g_ste = jax.grad(lambda z: jnp.sum(w * fsq.quantize(z)))(z)
  g_bound = jax.grad(lambda z: jnp.sum(w * fsq.bounded(z) / half_width))(z)
  np.testing.assert_allclose(np.asarray(g_ste), np.asarray(g_bound), rtol=1e-6, atol=1e-7)
  assert float(jnp.min(jnp.abs(g_ste))) >= 0.0 and float(jnp.max(jnp.abs(g_ste))) > 0.0


def test_bfloat16_input_gives_the_indices_of_its_float32_cast():
  fsq = FSQ((17, 17, 17, 17))
  z16 = jax.random.normal(jax.random.key(0), (4096, 4), jnp.bfloat16) * 2
  codes16 = fsq.quantize(z16)
  codes32 = fsq.quantize(z16.astype(jnp.float32))
  assert codes16.dtype == jnp.bfloat16 and codes32.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(fsq.codes_to_indices(codes16)), np.asarray(fsq.codes_to_indices(codes32)))
  np.testing.assert_array_equal(np.asarray(codes16.astype(jnp.float32)), np.asarray(codes32))
  # Quantizing in bfloat16 itself would have moved codes: the float32 path matters.
  naive = jnp.round((2 * jax.nn.sigmoid(1.6 * z16) - 1) * 8) / 8
  assert int(jnp.sum(naive.astype(jnp.float32) != codes32)) > 0


def test_jit_does_not_retrace_for_the_same_shapes():
  traces = []

  def step(fsq, z):
    traces.append(1)
    codes = fsq.quantize(z)
    return codes, fsq.codes_to_indices(codes)

  f = jax.jit(step)
  z = np.zeros((8, 4), np.float32)
  f(FSQ((17, 17, 17, 17)), z)
  f(FSQ((17, 17, 17, 17)), z + 1)  # an equal quantizer, new data: no retrace
  assert len(traces) == 1
  f(FSQ((17, 17, 17, 9)), z)
  assert len(traces) == 2
  f(FSQ((17, 17, 17, 17)), np.zeros((9, 4), np.float32))  # a new shape does retrace
  assert len(traces) == 3


def test_fsq_is_hashable_value_object():
  a, b = FSQ([17, 17, 17, 17], group_sizes=[2, 2]), FSQ((17, 17, 17, 17), group_sizes=(2, 2))
  assert a == b and hash(a) == hash(b) and a.levels == (17, 17, 17, 17)
  assert jax.tree_util.tree_leaves(a) == []
  assert a != FSQ((17, 17, 17, 17), bound="tanh")


@pytest.mark.parametrize("kwargs,match", [
    (dict(levels=(17, 1, 17)), "integer >= 2"),
    (dict(levels=()), "empty"),
    (dict(levels=(5, 2.5)), "integer >= 2"),
    (dict(levels=(5, 5), bound="sigmoid"), "bound='sigmoid'"),
    (dict(levels=(5, 5), activation="relu"), "activation='relu'"),
    (dict(levels=(5, 5, 5), group_sizes=(2, 2)), r"group_sizes=\(2, 2\)"),
    (dict(levels=(5, 5, 5), group_sizes=(3, 0)), "group_sizes"),
    (dict(levels=(5, 5), num_codebooks=0), "num_codebooks=0"),
    (dict(levels=(5, 5), alpha=-1.0), "alpha=-1.0"),
])
def test_invalid_construction_raises_clear_value_error(kwargs, match):
  with pytest.raises(ValueError, match=match):
    FSQ(**kwargs)


def test_invalid_inputs_raise_clear_value_errors():
  fsq = FSQ((17, 17, 17, 17), group_sizes=(2, 2))
  with pytest.raises(ValueError, match=r"shape \(3, 5\).*= 4"):
    fsq.quantize(np.zeros((3, 5), np.float32))
  with pytest.raises(ValueError, match="index 289 is out of range for group 1.*0 .. 288"):
    fsq.indices_to_codes(np.array([[0, 0], [3, 289]]))
  with pytest.raises(ValueError, match="index -1 is out of range"):
    fsq.indices_to_codes(np.array([[-1, 0]]))
  with pytest.raises(ValueError, match=r"trailing shape must be \(2,\)"):
    fsq.indices_to_codes(np.array([0, 1, 2]))
  with pytest.raises(ValueError, match="must be integers"):
    fsq.indices_to_codes(np.array([[0.0, 1.0]]))


def test_huge_codebook_needs_groups_or_64_bit_and_never_builds_the_codebook():
  fsq = FSQ((17,) * 8)
  assert fsq.codebook_size == 17**8 > 2**32
  z = np.random.default_rng(5).standard_normal((4096, 8)).astype(np.float32) * 2
  codes = fsq.quantize(z)
  with pytest.raises(ValueError, match=r"6975757441 codes.*group_sizes.*jax_enable_x64"):
    fsq.codes_to_indices(codes)
  # Groups of 17^4 fit in int32 without 64-bit mode.
  grouped = FSQ((17,) * 8, group_sizes=(4, 4))
  g_idx = grouped.codes_to_indices(codes)
  assert g_idx.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(grouped.indices_to_codes(g_idx)), np.asarray(codes))
  digits = np.asarray(fsq.codes_to_digits(codes)).astype(np.int64)
  expected = sum(digits[:, c] * 17**c for c in range(8))
  with jax.enable_x64(True):
    idx = fsq.codes_to_indices(codes)
    assert idx.dtype == jnp.int64
    np.testing.assert_array_equal(np.asarray(idx), expected)
    np.testing.assert_array_equal(np.asarray(grouped.group_to_global(g_idx)), expected)
    np.testing.assert_array_equal(np.asarray(fsq.indices_to_codes(idx)), np.asarray(codes))
    compiled = jax.jit(lambda c: fsq.codes_to_indices(c)).lower(codes).compile()
    mem = compiled.memory_analysis()
    if mem is not None:  # a 17^8 codebook would be 220 GB; the working set is a few arrays of the input
      assert mem.temp_size_in_bytes < 64 * codes.nbytes


def test_codebook_stats_match_numpy():
  fsq = FSQ((5, 3, 4), group_sizes=(1, 2))
  z = np.random.default_rng(6).standard_normal((3, 50, 3)).astype(np.float32)
  codes = fsq.quantize(z)
  s = fsq.codebook_stats(codes)
  digits = np.asarray(fsq.codes_to_digits(codes)).reshape(-1, 3)
  for c, level in enumerate(fsq.levels):
    hist = np.bincount(digits[:, c], minlength=5)
    np.testing.assert_array_equal(np.asarray(s["channel_histogram"][c]), hist)
    p = hist[hist > 0] / hist.sum()
    np.testing.assert_allclose(float(s["channel_entropy_bits"][c]), -(p * np.log2(p)).sum(), rtol=1e-5)
  idx = np.asarray(FSQ((5, 3, 4)).codes_to_indices(codes)).reshape(-1)
  _, counts = np.unique(idx, return_counts=True)
  p = counts / counts.sum()
  assert int(s["codes_used"][0]) == len(counts)
  np.testing.assert_allclose(float(s["usage"][0]), len(counts) / 60, rtol=1e-6)
  np.testing.assert_allclose(float(s["entropy_bits"][0]), -(p * np.log2(p)).sum(), rtol=1e-5)
  np.testing.assert_allclose(float(s["perplexity"][0]), 2 ** -(p * np.log2(p)).sum(), rtol=1e-5)
  g1 = np.asarray(fsq.codes_to_indices(codes))[..., 1].reshape(-1)
  assert int(s["group_codes_used"][0, 1]) == len(np.unique(g1))


def test_codebook_stats_for_huge_codebook_under_jit():
  fsq = FSQ((17,) * 8)
  z = np.random.default_rng(7).standard_normal((1000, 8)).astype(np.float32)
  s = jax.jit(fsq.codebook_stats)(fsq.quantize(z))
  assert int(s["codes_used"][0]) == len(np.unique(np.asarray(fsq.codes_to_digits(fsq.quantize(z))), axis=0))
  assert float(s["entropy_bits"][0]) <= math.log2(1000) + 1e-4
  assert s["channel_histogram"].shape == (8, 17)

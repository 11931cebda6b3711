"""Property tests (hypothesis) of shapes and ranges of the quantizer."""

import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from ifsq_jax import FSQ

levels_st = st.lists(st.integers(2, 20), min_size=1, max_size=5).map(tuple)


@st.composite
def fsq_and_latent(draw):
  levels = draw(levels_st)
  bound = draw(st.sampled_from(["ifsq", "tanh"]))
  cuts = draw(st.lists(st.integers(1, len(levels) - 1), unique=True, max_size=len(levels) - 1)) if len(levels) > 1 else []
  edges = [0] + sorted(cuts) + [len(levels)]
  groups = tuple(b - a for a, b in zip(edges, edges[1:]))
  num_codebooks = draw(st.integers(1, 2))
  fsq = FSQ(levels, bound=bound, group_sizes=groups if len(groups) > 1 else None, num_codebooks=num_codebooks)
  lead = draw(hnp.array_shapes(min_dims=0, max_dims=3, max_side=5))
  z = draw(hnp.arrays(np.float32, lead + (fsq.dim,),
                      elements=st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False, width=32)))
  return fsq, z


@settings(max_examples=25, deadline=None)
@given(fsq_and_latent())
def test_codes_keep_shape_stay_in_range_and_roundtrip(case):
  fsq, z = case
  codes = np.asarray(fsq.quantize(z))
  assert codes.shape == z.shape and codes.dtype == np.float32
  assert np.all(np.abs(codes) <= 1.0)
  digits = np.asarray(fsq.codes_to_digits(codes))
  levels = np.asarray(fsq.levels * fsq.num_codebooks)
  assert np.all((digits >= 0) & (digits < levels))
  half = levels // 2
  np.testing.assert_array_equal(codes, ((digits - half) / half).astype(np.float32))
  idx = fsq.codes_to_indices(codes)
  assert idx.shape == z.shape[:-1] + fsq.index_shape and idx.dtype == jnp.int32
  ix = np.asarray(idx).reshape(-1, fsq.num_groups)
  assert np.all((ix >= 0) & (ix < np.asarray(fsq.group_codebook_sizes)))
  np.testing.assert_array_equal(np.asarray(fsq.indices_to_codes(idx)), codes)


@settings(max_examples=20, deadline=None)
@given(levels_st, st.floats(0.1, 4.0))
def test_quantization_is_monotone_in_each_channel(levels, alpha):
  fsq = FSQ(levels, alpha=alpha)
  z = np.repeat(np.linspace(-8, 8, 257, dtype=np.float32)[:, None], len(levels), axis=1)
  codes = np.asarray(fsq.quantize(z))
  assert np.all(np.diff(codes, axis=0) >= 0)
  # The extreme inputs reach the extreme levels.
  np.testing.assert_array_equal(np.asarray(fsq.codes_to_digits(fsq.quantize(np.full((1, len(levels)), 1e4, np.float32))))[0],
                                np.asarray(levels) - 1)

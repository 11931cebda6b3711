"""One way to draw samples (sampling/draw.py), one meaning of cfg_interval (sampling/guidance.py) for both generators.

cfg_interval = (lo, hi) guides an evaluation at sampling progress p iff lo <= p < hi (DiT: flow time t;
LlamaGen: token n / N); -1 means always; other scalars are refused naming the valid forms.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ifsq_jax import parallel
from ifsq_jax.models import dit as dit_lib
from ifsq_jax.models import llamagen as llamagen_lib
from ifsq_jax.sampling import autoregressive as ar
from ifsq_jax.sampling import draw, flow, guidance

LABELS8 = jnp.arange(8, dtype=jnp.int32)


def _label_velocity(x, t, y):
  """v = y + 1 everywhere: constant in x and t, so a sample is the sum of the steps' velocities."""
  return (y.astype(jnp.float32) + 1)[:, None, None, None] + 0 * x + 0 * t[:, None, None, None]


@pytest.fixture(scope="module")
def dit_model():
  fields = dit_lib.dit_config("S", 1, depth=1, hidden_size=32, num_heads=2, input_size=4, in_channels=4,
                              num_classes=5, z_dim=0)
  fields["dtype"] = jnp.float32
  module = dit_lib.DiT(**fields)
  params = nn.meta.unbox(module.init(jax.random.key(0), *dit_lib.example_inputs(module))["params"])
  params = jax.tree.map(lambda p: p + 0.02, params)  # the zero-initialised output layer would give v = 0
  return module, params


@pytest.fixture(scope="module")
def ar_model():
  fields = llamagen_lib.llamagen_config("S", depth=1, hidden_size=32, num_heads=2, grid_size=4, num_classes=5,
                                        vocab_sizes=(17,), z_dim=0)
  module = llamagen_lib.LlamaGen(**fields)
  params = nn.meta.unbox(module.init(jax.random.key(1), *llamagen_lib.example_inputs(module))["params"])
  return module, params


def test_interval_forms_minus_one_is_always_and_other_scalars_are_refused():
  assert guidance.interval(-1) == guidance.interval((-1.0,)) == guidance.interval([0, 1]) == (0.0, 1.0)
  assert guidance.interval((0.25, 0.5)) == (0.25, 0.5)
  assert guidance.always(-1) and guidance.always((0.0, 1.0)) and not guidance.always((0.0, 0.99))
  for bad in (3, 0.5, (0.6, 0.4), (0.0, 1.5), (0.1, 0.2, 0.3), "0,1", None, True):
    with pytest.raises(ValueError, match=r"cfg_interval=.*\(lo, hi\) with 0 <= lo <= hi <= 1.*-1 for always"):
      guidance.interval(bad)
  with pytest.raises(ValueError, match=r"\(0, \(k \+ 2\) / N\)"):  # the reference LlamaGen's k: how to write it
    guidance.interval(5)


def test_one_inclusivity_rule_lo_included_hi_excluded_for_both_samplers():
  # DiT: grid 0, .25, .5, .75 (4 Euler steps of 0.25): (0.25, 0.5) guides the step at t = 0.25 only.
  x0 = np.zeros((8, 2, 2, 1), np.float32)
  s, null = 3.0, 10
  v_c = (np.arange(8) + 1.0)[:, None, None, None]
  v_g = (null + 1) + s * (v_c - (null + 1))
  out = flow.sample(_label_velocity, x0, LABELS8, num_steps=4, cfg_scale=s, null_label=null,
                    cfg_interval=(0.25, 0.5))
  np.testing.assert_allclose(out, 0.75 * v_c + 0.25 * v_g + 0 * x0, rtol=1e-6)
  # LlamaGen: N = 16 tokens, (0.25, 0.5) guides tokens 4..7 (n / 16 = 0.25 in, 0.5 out).
  np.testing.assert_array_equal(ar.guided_positions(16, (0.25, 0.5)), (np.arange(16) >= 4) & (np.arange(16) < 8))
  # Both go through the one rule.
  assert list(guidance.guided(np.array([0.2, 0.25, 0.49, 0.5]), (0.25, 0.5))) == [False, True, True, False]


def test_minus_one_samples_as_the_default_interval_in_both_samplers(dit_model, ar_model):
  x0 = np.random.default_rng(0).standard_normal((8, 2, 2, 1)).astype(np.float32)
  kwargs = dict(num_steps=3, cfg_scale=2.0, null_label=10)
  np.testing.assert_array_equal(flow.sample(_label_velocity, x0, LABELS8, cfg_interval=-1, **kwargs),
                                flow.sample(_label_velocity, x0, LABELS8, **kwargs))
  module, params = ar_model
  labels, key = np.array([0, 1, 2, 3], np.int32), jax.random.key(3)
  np.testing.assert_array_equal(ar.generate(module, params, labels, key, cfg_scale=2.0, cfg_interval=-1),
                                ar.generate(module, params, labels, key, cfg_scale=2.0))
  with pytest.raises(ValueError, match="-1 for always"):
    ar.generate(module, params, labels, key, cfg_scale=2.0, cfg_interval=3)
  with pytest.raises(ValueError, match="-1 for always"):
    draw.options(dit_model[0], {"cfg_interval": (0.5, 0.2)})


def test_options_fill_defaults_and_refuse_names_of_the_other_sampler(dit_model, ar_model):
  assert draw.options(dit_model[0], {"num_steps": 8}) == {**draw.FLOW_OPTIONS, "num_steps": 8}
  assert draw.options(ar_model[0], {"cfg_interval": -1})["cfg_interval"] == (0.0, 1.0)
  with pytest.raises(ValueError, match=r"no options \['temperature'\].*'num_steps'"):
    draw.options(dit_model[0], {"temperature": 1.0})
  with pytest.raises(ValueError, match="cfg_channels=5 must be an integer in \\[0, 4\\]"):
    draw.options(dit_model[0], {"cfg_channels": 5})
  with pytest.raises(ValueError, match="top_p=1.5"):
    draw.options(ar_model[0], {"top_p": 1.5})


def test_dit_draw_is_the_flow_sampler_on_noise_of_seed_and_index(dit_model):
  module, params = dit_model
  mesh = parallel.make_mesh(devices=jax.devices()[:1])
  options = {"num_steps": 3, "cfg_scale": 2.0, "mode": "sde"}
  indices, labels = np.arange(4, 8), np.array([0, 1, 2, 3])
  got = draw.draw(module, params, indices, labels, 7, options, mesh=mesh)["latents"]
  noise = np.stack([np.random.default_rng([7, i]).standard_normal((4, 4, 4), np.float32) for i in indices])
  velocity = lambda x, t, y: module.apply({"params": params}, x, t, y)
  want = jax.jit(lambda n, y, k: flow.sample(velocity, n, y, num_steps=3, cfg_scale=2.0, mode="sde",
                                             null_label=5, key=k))(noise, labels, jax.random.fold_in(
                                                 jax.random.key(7), 4))
  np.testing.assert_allclose(got, want, atol=1e-5)
  # ODE samples depend on (seed, index) alone: the same in any batch layout.
  ode = {"num_steps": 3}
  whole = draw.draw_range(module, params, np.arange(8) % 5, 0, 8, 7, ode, batch=8, mesh=mesh)["latents"]
  part = draw.draw(module, params, indices, (np.arange(8) % 5)[4:], 7, ode, mesh=mesh)["latents"]
  np.testing.assert_allclose(whole[4:], part, atol=1e-5)


def test_llamagen_draw_range_is_generate_with_the_key_of_each_calls_first_index(ar_model):
  module, params = ar_model
  mesh = parallel.make_mesh(devices=jax.devices()[:1])
  labels = np.array([4, 3, 2, 1, 0, 1, 2], np.int32)  # 7 samples in calls of 4: the last call padded
  got = draw.draw_range(module, params, labels, 0, 7, 11, {"cfg_scale": 2.0, "top_k": 5}, batch=4, mesh=mesh)
  assert set(got) == {"tokens"} and got["tokens"].shape == (7, 16)
  for first in (0, 4):
    idx = np.minimum(np.arange(first, first + 4), 6)
    want = ar.generate(module, params, labels[idx], jax.random.fold_in(jax.random.key(11), first), cfg_scale=2.0,
                       top_k=5)
    np.testing.assert_array_equal(got["tokens"][first:first + 4], np.asarray(want)[:7 - first])


def test_draw_needs_a_batch_that_divides_over_the_devices_and_a_dit_latent_scale(dit_model):
  module, params = dit_model
  mesh = parallel.make_mesh()
  if parallel.batch_devices(mesh) > 1:
    with pytest.raises(ValueError, match="multiple of the"):
      draw.draw(module, params, np.arange(3), np.zeros(3, np.int32), 0, {"num_steps": 1}, mesh=mesh)
  one = parallel.make_mesh(devices=jax.devices()[:1])
  with pytest.raises(ValueError, match="latent scale"):
    draw.draw(module, params, np.arange(2), np.zeros(2, np.int32), 0, {"num_steps": 1}, mesh=one,
              decoder=draw.Decoder(nn.Dense(1), {}))

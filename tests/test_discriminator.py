"""The PatchGAN discriminator against the official NLayerDiscriminator2D (tests/golden/discriminator.npz)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from conftest import GOLDEN
from ifsq_jax.models.discriminator import PatchDiscriminator, convert_state_dict


def test_train_mode_output_and_batchnorm_statistics_match_the_reference():
  g = np.load(GOLDEN / "discriminator.npz")
  variables = convert_state_dict({k[3:]: g[k] for k in g.files if k.startswith("sd/")})
  model = PatchDiscriminator(ndf=16, n_layers=3)
  x = np.transpose(g["x"], (0, 2, 3, 1))
  out, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
  assert out.shape == (2, 6, 6, 1)
  np.testing.assert_allclose(np.asarray(out), np.transpose(g["out_train"], (0, 2, 3, 1)), atol=2e-5)
  for i in (3, 6, 9):
    s = updates["batch_stats"][f"main_{i}"]
    np.testing.assert_allclose(np.asarray(s["mean"]), g[f"after/main.{i}.running_mean"], atol=1e-7)
    np.testing.assert_allclose(np.asarray(s["var"]), g[f"after/main.{i}.running_var"], atol=1e-7)
    # The variance convention, tested where it is visible: unbiased batch variance in the running average.
    np.testing.assert_allclose((np.asarray(s["var"]) - 0.9) / 0.1, g[f"batch_var_unbiased/main.{i}"], atol=1e-5)
  after = {"params": variables["params"], "batch_stats": updates["batch_stats"]}
  np.testing.assert_allclose(np.asarray(model.apply(after, x, train=False)),
                             np.transpose(g["out_eval_after"], (0, 2, 3, 1)), atol=2e-5)


def test_init_follows_the_reference_weights_init():
  model = PatchDiscriminator()  # ndf 64, n_layers 4 as the tokenizer's loss
  v = nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((2, 64, 64, 3)), train=True))
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(v["params"]))
  # NLayerDiscriminator2D(3, 64, n_layers=4): 3*64*16+64, then (64->128, 128->256, 256->512) stride 2 and
  # 512->512 stride 1 without bias plus BN scale/bias, then 512*16+1.
  expected = 3136 + (131072 + 256) + (524288 + 512) + (2097152 + 1024) + (4194304 + 1024) + 8193
  assert count == expected == 6_960_961
  k = np.asarray(v["params"]["main_5"]["kernel"])
  assert abs(k.std() - 0.02) < 0.002 and "bias" not in v["params"]["main_5"]
  np.testing.assert_allclose(np.asarray(v["params"]["main_3"]["scale"]).mean(), 1.0, atol=0.01)
  assert not np.asarray(v["params"]["main_3"]["bias"]).any()
  # Conv biases: PyTorch's default, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (fan_in = 4 * 4 * C_in).
  for name, fan_in in (("main_0", 4 * 4 * 3), ("main_14", 4 * 4 * 512)):
    b = np.asarray(v["params"][name]["bias"])
    assert b.any() and np.abs(b).max() <= 1 / np.sqrt(fan_in)
  assert np.abs(np.asarray(v["params"]["main_0"]["bias"])).max() > 0.5 / np.sqrt(48)  # 64 draws over the range


def test_every_parameter_and_statistic_has_logical_axis_names():
  boxed = jax.eval_shape(lambda: PatchDiscriminator(ndf=16, n_layers=3).init(
      jax.random.key(0), jnp.zeros((2, 32, 32, 3)), train=True))
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
  assert all(len(x.names) == len(x.value.shape) for x in leaves)
  assert set(boxed) == {"params", "batch_stats"}

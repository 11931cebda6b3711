"""The tokenizer's convolution: nn.Conv's outputs and XLA's gradients with each impl, PyTorch's initialisation,
logical axis names."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ifsq_jax import parallel
from ifsq_jax.kernels.cpu import onednn
from ifsq_jax.models import conv

LECUN = dict(kernel_init=nn.initializers.lecun_normal(), bias_init=nn.initializers.zeros_init())  # nn.Conv's


@pytest.mark.parametrize("impl", ["xla", "onednn"])
@pytest.mark.parametrize("size,channels,kernel,stride,padding", [
    (64, 32, 3, 1, "SAME"),        # per-tap kernel gradient
    (64, 32, 4, 1, "SAME"),        # even kernel: XLA's uneven SAME split
    (24, 32, 2, 1, "SAME"),
    (8, 16, 3, 1, "SAME"),         # small map: one im2col matmul
    (40, 32, 1, 1, "SAME"),        # 1x1
    (65, 32, 3, 2, "VALID"),       # the tokenizer's downsampling, per tap
    (17, 32, 3, 2, "VALID"),       # ... and im2col
    (32, 16, 4, 2, ((1, 1), (1, 1))),  # the discriminator's convolutions
    (33, 16, 3, 2, "SAME"),
])
def test_conv_matches_nn_conv_in_init_output_and_gradients(size, channels, kernel, stride, padding, impl):
  x = jax.random.normal(jax.random.key(0), (2, size, size, 8))
  ours = conv.Conv(channels, kernel, stride, padding, impl=impl, **LECUN)
  ref = nn.Conv(channels, (kernel, kernel), strides=stride, padding=padding)
  if impl == "onednn" and not onednn.load():  # where oneDNN cannot load, asking for it is an error saying why
    with pytest.raises(RuntimeError, match="oneDNN convolutions are not available"):
      ours.init(jax.random.key(1), x)
    return
  p, q = nn.meta.unbox(ours.init(jax.random.key(1), x)), ref.init(jax.random.key(1), x)
  assert jax.tree.structure(p) == jax.tree.structure(q)
  for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(q)):
    np.testing.assert_array_equal(a, b)
  p = jax.tree.map(lambda v: v + 0.01 * jax.random.normal(jax.random.key(2), v.shape), p)  # a non-zero bias
  np.testing.assert_allclose(ours.apply(p, x), ref.apply(p, x), rtol=1e-5, atol=1e-5)
  loss = lambda m: jax.grad(lambda p, x: jnp.sum(jnp.sin(m.apply(p, x))), argnums=(0, 1))
  (gp, gx), (rp, rx) = loss(ours)(p, x), loss(ref)(p, x)
  np.testing.assert_allclose(gx, rx, rtol=1e-4, atol=1e-4)
  for a, b in zip(jax.tree.leaves(gp), jax.tree.leaves(rp)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(b))))


def _kernel_grad_jaxpr(size, in_channels, kernel=3, stride=1, padding="SAME"):
  return str(jax.make_jaxpr(jax.grad(lambda k, x: jnp.sum(conv.conv2d(x, k, stride, padding))))(
      jnp.zeros((kernel, kernel, in_channels, 32)), jnp.zeros((1, size, size, in_channels))))


def test_kernel_gradient_takes_one_matmul_per_tap_on_large_outputs_and_one_in_all_on_small():
  def matmuls(jaxpr):
    return jaxpr.count("dot_general")
  assert matmuls(_kernel_grad_jaxpr(64, 16)) == 9           # 64x64 outputs, 16 channels: per tap
  assert matmuls(_kernel_grad_jaxpr(65, 16, stride=2, padding="VALID")) == 9  # 32x32 outputs
  assert matmuls(_kernel_grad_jaxpr(16, 16)) == 1           # 16x16 outputs: im2col
  assert matmuls(_kernel_grad_jaxpr(64, 3)) == 1            # RGB input: im2col
  assert matmuls(_kernel_grad_jaxpr(64, 16, kernel=1)) == 1  # 1x1: one matmul
  assert "conv_general_dilated" in _kernel_grad_jaxpr(64, 16)  # forward and input gradient: XLA's


def test_bf16_gradient_accumulates_in_float32():
  x = jax.random.normal(jax.random.key(0), (2, 64, 64, 8))
  m = conv.Conv(32, dtype=jnp.bfloat16)
  p = nn.meta.unbox(m.init(jax.random.key(1), x))
  g = jax.grad(lambda p: jnp.sum(m.apply(p, x).astype(jnp.float32) ** 2))(p)
  r = jax.grad(lambda p: jnp.sum(nn.Conv(32, (3, 3), dtype=jnp.bfloat16).apply(p, x).astype(jnp.float32) ** 2))(p)
  assert g["params"]["kernel"].dtype == jnp.float32
  np.testing.assert_allclose(g["params"]["kernel"], r["params"]["kernel"], rtol=0.05,
                             atol=0.02 * float(jnp.max(jnp.abs(r["params"]["kernel"]))))


def test_bad_padding_names_the_value_and_what_is_valid():
  x, k = jnp.zeros((1, 8, 8, 4)), jnp.zeros((3, 3, 4, 8))
  with pytest.raises(ValueError, match="padding='same'.*'SAME', 'VALID'"):
    conv.conv2d(x, k, padding="same")
  with pytest.raises(ValueError, match=r"padding=\(\(1, 1\),\).*\(\(top, bottom\), \(left, right\)\)"):
    conv.conv2d(x, k, padding=((1, 1),))


def test_no_bias_and_kernel_init_as_nn_conv():
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 8))
  init = nn.initializers.normal(0.02)
  ours = conv.Conv(16, 4, 2, ((1, 1), (1, 1)), use_bias=False, kernel_init=init)
  ref = nn.Conv(16, (4, 4), strides=2, padding=((1, 1), (1, 1)), use_bias=False, kernel_init=init)
  p, q = nn.meta.unbox(ours.init(jax.random.key(1), x)), ref.init(jax.random.key(1), x)
  assert set(p["params"]) == set(q["params"]) == {"kernel"}
  np.testing.assert_array_equal(p["params"]["kernel"], q["params"]["kernel"])
  np.testing.assert_allclose(ours.apply(p, x), ref.apply(p, x), rtol=1e-5, atol=1e-5)
  gp = jax.grad(lambda p: jnp.sum(ours.apply(p, x) ** 2))(p)
  gq = jax.grad(lambda p: jnp.sum(ref.apply(p, x) ** 2))(p)
  np.testing.assert_allclose(gp["params"]["kernel"], gq["params"]["kernel"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kernel,in_channels,out_channels", [(3, 128, 256), (1, 512, 4), (4, 3, 64), (3, 4, 512)])
def test_default_init_is_pytorch_conv2d_default(kernel, in_channels, out_channels):
  """kaiming_uniform(a=sqrt(5)) weights and uniform biases: both U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  import torch  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  ref = torch.nn.Conv2d(in_channels, out_channels, kernel)
  x = jnp.zeros((1, 8, 8, in_channels))
  p = nn.meta.unbox(conv.Conv(out_channels, kernel).init(jax.random.key(0), x))["params"]
  bound = 1.0 / np.sqrt(kernel * kernel * in_channels)
  for ours, theirs in ((p["kernel"], ref.weight), (p["bias"], ref.bias)):
    ours, theirs = np.asarray(ours), theirs.detach().numpy()
    assert ours.size == theirs.size
    # The same support: the largest magnitude just below the bound (many draws: within a few percent of it).
    assert np.abs(ours).max() <= bound and np.abs(theirs).max() <= bound
    near = 0.9 if ours.size >= 64 else 0.5
    assert np.abs(ours).max() > near * bound and np.abs(theirs).max() > near * bound
    if ours.size >= 4096:  # the std of U(-b, b) is b / sqrt(3); both within a few percent of it
      for a in (ours, theirs):
        np.testing.assert_allclose(a.std(), bound / np.sqrt(3), rtol=0.03)
        assert abs(a.mean()) < 0.02 * bound


def test_params_carry_logical_axis_names():
  x = jnp.zeros((1, 8, 8, 4))
  boxed = conv.Conv(16, 3).init(jax.random.key(0), x)["params"]
  assert isinstance(boxed["kernel"], nn.LogicallyPartitioned) and isinstance(boxed["bias"], nn.LogicallyPartitioned)
  assert boxed["kernel"].names == (parallel.KERNEL_H, parallel.KERNEL_W, parallel.CONV_IN, parallel.CONV_OUT)
  assert boxed["bias"].names == (parallel.CONV_OUT,)
  assert nn.meta.unbox(boxed)["kernel"].shape == (3, 3, 4, 16)

"""The PatchGAN discriminator of the tokenizer's GAN loss (the reference's ``NLayerDiscriminator2D``).

Conv 4x4 stride 2 + LeakyReLU(0.2); ``n_layers - 1`` blocks of Conv 4x4 stride 2
(no bias) + BatchNorm + LeakyReLU with widths ``ndf * min(2^n, 8)``; one more at
stride 1; a final 4x4 stride-1 conv to one logit per patch. All convs pad 1.
Initialisation as the reference's ``weights_init``: conv weights N(0, 0.02), conv
biases PyTorch's default U(-1/sqrt(fan_in), 1/sqrt(fan_in)), BN scale N(1, 0.02),
BN bias 0. Parameters and BN statistics carry logical axis names (conv kernels
``KERNEL_H, KERNEL_W, CONV_IN, CONV_OUT``, biases ``CONV_OUT``, BN ``NORM``); the
convolution is chosen by ``conv_impl`` (:mod:`ifsq_jax.models.conv`).

BatchNorm in training uses the statistics of the batch it sees, with the biased
variance for normalising and the unbiased one for the running average (momentum
0.1), as PyTorch. Under ``jax.jit`` with a batch sharded over devices the
statistics are those of the *global* batch (the reference uses each GPU's own
batch). Evaluation mode uses the running statistics.

Layer names follow the PyTorch ``main.<index>`` so checkpoints convert by renaming.
B batch, H W size.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ifsq_jax.models.conv import Conv
from ifsq_jax.parallel import NORM


class BatchNorm(nn.Module):
  """BatchNorm over (B, H, W) with PyTorch's running-variance convention."""

  eps: float = 1e-5
  momentum: float = 0.1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    c = x.shape[-1]
    norm = lambda init: nn.with_logical_partitioning(init, (NORM,))
    scale = self.param("scale", norm(lambda k, s: 1.0 + 0.02 * jax.random.normal(k, s)), (c,))
    bias = self.param("bias", norm(nn.initializers.zeros), (c,))
    mean_ra = self.variable("batch_stats", "mean", norm(jnp.zeros), (c,))
    var_ra = self.variable("batch_stats", "var", norm(jnp.ones), (c,))
    x32 = x.astype(jnp.float32)
    if train:
      mean = jnp.mean(x32, axis=(0, 1, 2))
      var = jnp.mean(jnp.square(x32 - mean), axis=(0, 1, 2))
      n = x.shape[0] * x.shape[1] * x.shape[2]
      if not self.is_initializing():
        mean_ra.value = (1 - self.momentum) * mean_ra.value + self.momentum * mean
        var_ra.value = (1 - self.momentum) * var_ra.value + self.momentum * var * n / max(n - 1, 1)
    else:
      mean, var = mean_ra.value, var_ra.value
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * scale + bias
    return y.astype(x.dtype)


class PatchDiscriminator(nn.Module):
  """(B, H, W, 3) images in [-1, 1] -> (B, h, w, 1) patch logits.

  Attributes:
    ndf: Width of the first layer.
    n_layers: Stride-2 layers (the last of them at stride 1).
    dtype: Compute dtype of the convolutions.
    conv_impl: The convolutions: ``"auto"``, ``"xla"`` or ``"onednn"`` (:mod:`ifsq_jax.models.conv`).
  """

  ndf: int = 64
  n_layers: int = 4
  dtype: Any = jnp.float32
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
    init = nn.initializers.normal(0.02)

    def conv(features, stride, index, bias):
      return Conv(features, 4, stride, ((1, 1), (1, 1)), use_bias=bias, impl=self.conv_impl, kernel_init=init,
                  dtype=self.dtype, name=f"main_{index}")

    h = nn.leaky_relu(conv(self.ndf, 2, 0, True)(x.astype(self.dtype)), 0.2)
    index = 2
    for n in range(1, self.n_layers + 1):
      width = self.ndf * min(2 ** n, 8)
      h = conv(width, 2 if n < self.n_layers else 1, index, False)(h)
      h = nn.leaky_relu(BatchNorm(name=f"main_{index + 1}")(h, train), 0.2)
      index += 3
    return conv(1, 1, index, True)(h).astype(jnp.float32)


def convert_state_dict(sd: dict[str, Any]) -> dict[str, Any]:
  """PyTorch ``NLayerDiscriminator2D`` state dict -> {"params", "batch_stats"}."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  params: dict[str, Any] = {}
  stats: dict[str, Any] = {}
  for key, value in sd.items():
    _, index, leaf = key.split(".")
    name, value = f"main_{index}", np.asarray(value, np.float32)
    if leaf == "num_batches_tracked":
      continue
    if leaf == "running_mean":
      stats.setdefault(name, {})["mean"] = value
    elif leaf == "running_var":
      stats.setdefault(name, {})["var"] = value
    elif leaf == "weight" and value.ndim == 4:
      params.setdefault(name, {})["kernel"] = value.transpose(2, 3, 1, 0)
    elif leaf == "weight":
      params.setdefault(name, {})["scale"] = value
    else:
      params.setdefault(name, {})["bias"] = value
  return {"params": params, "batch_stats": stats}

"""Inception-v3 for FID, the pytorch-fid variant, as a frozen Linen module.

pytorch-fid's ``InceptionV3([3])`` with ``use_fid_inception=True``: torchvision's
Inception-v3 with the FID-patched blocks of the TF graph (average pools that do
not count padding in FIDInceptionA/C/E_1, a max pool in FIDInceptionE_2),
BatchNorm eps 1e-3 with the stored statistics, inputs in [0, 1] resized to
299 x 299 (bilinear, half-pixel centres, no antialias) and mapped to [-1, 1],
and the 2048-d average-pooled features. Module and parameter names follow the
PyTorch ones so the converter is a plain rename.

The features of ADM's evaluator (FID, sFID, Inception Score, precision / recall;
``ifsq_jax.eval.generative``) come from the same network, whose weights were
ported from the TF graph ADM runs (``classify_image_graph_def.pb``,
2015-12-05), through ``outputs``:

* ``pool``: ``pool_3`` (B, 2048).
* ``logits`` / ``logits_unbiased``: the 1008-way classifier ``fc`` (TF
  ``softmax/weights``, ``softmax/biases``) with and without its bias. ADM's
  Inception Score, like the original improved-gan code, applies the softmax to
  ``pool_3 @ W`` (the input of ``softmax/logits/MatMul``) without the bias, so
  ``logits_unbiased`` reproduces it.
* ``spatial``: ADM's sFID features ``mixed_6/conv:0[..., :7]`` flattened in
  (H, W, C) order, (B, 17 * 17 * 7 = 2023) at 299 x 299. The TF graph names its
  blocks ``mixed`` .. ``mixed_10`` in order, so ``mixed_6`` is the seventh:
  Mixed_5b/c/d are ``mixed``/``mixed_1``/``mixed_2``, Mixed_6a is ``mixed_3``,
  Mixed_6b/c/d/e are ``mixed_4``..``mixed_7`` -- ``mixed_6`` is **Mixed_6d**
  (17 x 17 x 768; pytorch-fid's and torch-fidelity's weight ports map
  ``mixed_6/conv/conv2d_params`` and ``mixed_6/conv/batchnorm`` to
  ``Mixed_6d.branch1x1.conv`` / ``.bn``). In that graph a layer ``X`` is the ops
  ``X/Conv2D``, ``X/batchnorm`` (BatchNormWithGlobalNormalization) and then the
  ReLU named ``X`` itself, so ``mixed_6/conv:0`` is the output *after* BN and
  ReLU of ``Mixed_6d.branch1x1`` (192 channels). That branch is the first in the
  block's concatenation, so its first 7 channels are Mixed_6d's output channels
  0..6, which is what is taken. Remaining uncertainty: the ReLU-naming
  convention is read from the graph's op names as other ports use them, not
  checked against the graph itself (not available offline). A check with
  published statistics: every entry of ``mu_s`` in ADM's reference files must be
  >= 0 (a ReLU output), and ``python -m ifsq_jax.tools.fid`` reports the
  Frechet distance between the reference images' statistics computed here and
  the published ones (``ref_check_sfid``).

``preprocess`` selects the input pipeline: ``"pytorch_fid"`` (above) or
``"adm"``, that of the TF graph ADM feeds (float pixels at ``ExpandDims:0``):
TF1's legacy ``ResizeBilinear`` (``align_corners=False``,
``half_pixel_centers=False``: source coordinate ``i * in / out``, no half-pixel
shift) to 299 x 299, then ``(x - 128) / 128``. Inputs are [0, 1] in both modes.

Weights: ``pt_inception-2015-12-05-6726825d.pth`` (pytorch-fid's release),
converted with ``python -m ifsq_jax.convert inception``.

B batch, H W size, C channels, K classes (1008).
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

FEATURES = 2048
CLASSES = 1008  # the TF graph's classifier: 1000 ImageNet classes and 8 unused
SPATIAL_CHANNELS = 7  # ADM's sFID: mixed_6/conv[..., :7]
OUTPUTS = ("pool", "spatial", "logits", "logits_unbiased")
PREPROCESS = ("pytorch_fid", "adm")
SIZE = 299


class BasicConv(nn.Module):
  """Conv (no bias) + BatchNorm (eps 1e-3, stored statistics) + ReLU."""

  features: int
  kernel: Sequence[int]
  stride: int = 1
  padding: Sequence[int] = (0, 0)

  @nn.compact
  def __call__(self, x):
    pad = ((self.padding[0], self.padding[0]), (self.padding[1], self.padding[1]))
    x = nn.Conv(self.features, tuple(self.kernel), strides=self.stride, padding=pad, use_bias=False, name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
    return nn.relu(x)


def _avg3(x):  # FID blocks: 3x3 average that does not count the padding
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max3s2(x):
  return nn.max_pool(x, (3, 3), strides=(2, 2))


class InceptionA(nn.Module):
  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv(64, (1, 1), name="branch1x1")(x)
    b5 = BasicConv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(BasicConv(48, (1, 1), name="branch5x5_1")(x))
    b3 = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
    b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
    b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
    bp = BasicConv(self.pool_features, (1, 1), name="branch_pool")(_avg3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):

  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(384, (3, 3), stride=2, name="branch3x3")(x)
    bd = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
    bd = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = BasicConv(96, (3, 3), stride=2, name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max3s2(x)], axis=-1)


class InceptionC(nn.Module):
  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c = self.channels_7x7
    b1 = BasicConv(192, (1, 1), name="branch1x1")(x)
    b7 = BasicConv(c, (1, 1), name="branch7x7_1")(x)
    b7 = BasicConv(c, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
    bd = BasicConv(c, (1, 1), name="branch7x7dbl_1")(x)
    bd = BasicConv(c, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
    bd = BasicConv(c, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
    bd = BasicConv(c, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
    bd = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
    bp = BasicConv(192, (1, 1), name="branch_pool")(_avg3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):

  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(320, (3, 3), stride=2, name="branch3x3_2")(BasicConv(192, (1, 1), name="branch3x3_1")(x))
    b7 = BasicConv(192, (1, 1), name="branch7x7x3_1")(x)
    b7 = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = BasicConv(192, (3, 3), stride=2, name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max3s2(x)], axis=-1)


class InceptionE(nn.Module):
  max_pool: bool  # FIDInceptionE_2 pools with a max, FIDInceptionE_1 with an average

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv(320, (1, 1), name="branch1x1")(x)
    b3 = BasicConv(384, (1, 1), name="branch3x3_1")(x)
    b3 = jnp.concatenate([BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                          BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], axis=-1)
    bd = BasicConv(448, (1, 1), name="branch3x3dbl_1")(x)
    bd = BasicConv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate([BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                          BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], axis=-1)
    pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1))) if self.max_pool else _avg3(x)
    bp = BasicConv(192, (1, 1), name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


def resize_tf_legacy(x: jax.Array, size: int) -> jax.Array:
  """(B, H, W, C) -> (B, size, size, C) as TF1's ``ResizeBilinear`` with ``align_corners=False``.

  The legacy (``half_pixel_centers=False``) mapping of the 2015 Inception graph:
  output pixel i reads source ``i * (in / out)`` (float32), between rows
  ``floor`` and ``min(ceil, in - 1)``; interpolated along W, then H, in TF's
  order of operations.
  """
  for axis in (2, 1):
    n_in = x.shape[axis]
    src = np.arange(size, dtype=np.float32) * (np.float32(n_in) / np.float32(size))
    lo = np.floor(src)
    hi = np.minimum(np.ceil(src), n_in - 1)
    frac = (src - lo).reshape([size if a == axis else 1 for a in range(x.ndim)])
    a, b = jnp.take(x, lo.astype(np.int32), axis=axis), jnp.take(x, hi.astype(np.int32), axis=axis)
    x = a + (b - a) * frac
  return x


class Classifier(nn.Module):
  """The ``fc`` layer: (B, 2048) pool features -> (logits, logits without the bias), each (B, K)."""

  @nn.compact
  def __call__(self, pool):
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (FEATURES, CLASSES))
    bias = self.param("bias", nn.initializers.zeros, (CLASSES,))
    unbiased = pool @ kernel
    return unbiased + bias, unbiased


class InceptionV3FID(nn.Module):
  """(B, H, W, 3) images in [0, 1] -> (B, 2048) pool features, or the ``outputs`` named.

  Attributes:
    resize: Resize to 299 x 299 first (as both pipelines do).
    preprocess: ``"pytorch_fid"`` or ``"adm"`` (the TF graph's resize and scaling).
  """

  resize: bool = True
  preprocess: str = "pytorch_fid"

  def _prepare(self, x):
    if self.preprocess not in PREPROCESS:
      raise ValueError(f"preprocess={self.preprocess!r}; valid: {PREPROCESS}.")
    x = jnp.asarray(x, jnp.float32)
    needs_resize = self.resize and x.shape[1:3] != (SIZE, SIZE)
    if self.preprocess == "adm":
      x = 255.0 * x  # the graph's input is float pixels in [0, 255]
      if needs_resize:
        x = resize_tf_legacy(x, SIZE)
      return (x - 128.0) * (1.0 / 128.0)
    if needs_resize:
      x = jax.image.resize(x, (x.shape[0], SIZE, SIZE, x.shape[3]), "bilinear", antialias=False)
    return 2.0 * x - 1.0

  @nn.compact
  def __call__(self, x: jax.Array, outputs: str | Sequence[str] = "pool"):
    """Features of (B, H, W, 3) images in [0, 1].

    Args:
      x: Images.
      outputs: One name of ``OUTPUTS`` (its array is returned) or a sequence of
        them (a dict is returned). The ``fc`` parameters exist only where a
        logits output is asked for, so weights converted without the classifier
        serve ``pool`` and ``spatial``.

    Returns:
      ``pool`` (B, 2048), ``spatial`` (B, h * w * 7), ``logits`` and
      ``logits_unbiased`` (B, K), as named.
    """
    names = (outputs,) if isinstance(outputs, str) else tuple(outputs)
    unknown = [n for n in names if n not in OUTPUTS]
    if unknown or not names:
      raise ValueError(f"outputs={outputs!r}; valid: names among {OUTPUTS}.")
    x = self._prepare(x)
    x = BasicConv(32, (3, 3), stride=2, name="Conv2d_1a_3x3")(x)
    x = BasicConv(32, (3, 3), name="Conv2d_2a_3x3")(x)
    x = BasicConv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
    x = _max3s2(x)
    x = BasicConv(80, (1, 1), name="Conv2d_3b_1x1")(x)
    x = BasicConv(192, (3, 3), name="Conv2d_4a_3x3")(x)
    x = _max3s2(x)
    x = InceptionA(32, name="Mixed_5b")(x)
    x = InceptionA(64, name="Mixed_5c")(x)
    x = InceptionA(64, name="Mixed_5d")(x)
    x = InceptionB(name="Mixed_6a")(x)
    spatial = None
    for name, c in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
      x = InceptionC(c, name=name)(x)
      if name == "Mixed_6d":  # TF mixed_6; its branch1x1 (TF mixed_6/conv) leads the concatenation
        spatial = x[..., :SPATIAL_CHANNELS].reshape(x.shape[0], -1)  # (B, 17 * 17 * 7), (H, W, C) order
    x = InceptionD(name="Mixed_7a")(x)
    x = InceptionE(False, name="Mixed_7b")(x)
    x = InceptionE(True, name="Mixed_7c")(x)
    out = {"pool": jnp.mean(x, axis=(1, 2)), "spatial": spatial}
    if "logits" in names or "logits_unbiased" in names:
      out["logits"], out["logits_unbiased"] = Classifier(name="fc")(out["pool"])
    if isinstance(outputs, str):
      return out[outputs]
    return {n: out[n] for n in names}


def has_classifier(variables: dict) -> bool:
  """Whether converted variables hold ``fc`` (the logits outputs need it; older conversions lack it)."""
  return "fc" in variables["params"]

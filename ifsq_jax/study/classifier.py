"""The metric's network: a small CNN trained on Fashion-MNIST, whose penultimate features the study's FDs use.

Its Fréchet distance is named ``fd_fmnist`` ("Fréchet distance in a Fashion-MNIST
classifier's features"): the role FID's Inception plays on ImageNet, with a
network trained on the data the generators model. It is not FID and its values
are not comparable with FID's.

One classifier serves the whole study (trained once, with a fixed seed): it is
the yardstick, so the seeds' spread measures the chains, not the ruler. It
sees grey images (the mean of the RGB channels) in [-1, 1], 32 x 32 (the IDX
source pads 28 x 28 with black), as the tokenizers and generators see them.

B batch, H W image size (32), F feature width.
"""

from __future__ import annotations

import json
import time

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath

from ifsq_jax import paths
from ifsq_jax.data import sources
from ifsq_jax.models.conv import Conv

NUM_CLASSES = 10
FEATURES = 128  # F: the penultimate width the FDs use
SEED = 0  # one classifier for every seed of the study
PARAMS_FILE = "params.msgpack"
RESULT_FILE = "result.json"


class Classifier(nn.Module):
  """Two conv stages (2 convs + 2x2 max-pool each), a dense feature layer, a linear head.

  Attributes:
    width: Channels of the first stage (the second has twice as many).
  """

  width: int = 16

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Grey images (B, 32, 32, 1) in [-1, 1] -> (logits (B, 10), features (B, F))."""
    for mult in (1, 2):
      for _ in range(2):
        # The project's convolution (oneDNN on CPU where it is faster): half the step time of nn.Conv here.
        x = nn.relu(Conv(self.width * mult, 3)(x))
      x = nn.max_pool(x, (2, 2), (2, 2))
    features = nn.relu(nn.Dense(FEATURES)(x.reshape(x.shape[0], -1)))
    return nn.Dense(NUM_CLASSES)(features), features


def to_grey(images: np.ndarray) -> np.ndarray:
  """RGB (B, H, W, 3) in [-1, 1] (or uint8) -> grey (B, H, W, 1) float32 in [-1, 1], clipped."""
  x = np.asarray(images)
  if x.dtype == np.uint8:
    x = x.astype(np.float32) / 127.5 - 1.0
  return np.clip(x.astype(np.float32).mean(-1, keepdims=True), -1.0, 1.0)


def load_split(data_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  """(grey images (N, 32, 32, 1) in [-1, 1], labels (N,) int32) of an IDX split."""
  images, labels = sources.idx_split(data_dir, split)
  return to_grey(images[..., None]), np.asarray(labels, np.int32)


class Trained:
  """A trained classifier: features and predictions of images, jitted once."""

  def __init__(self, params, width: int, batch: int = 500):
    self.params = params
    self.model = Classifier(width)
    self.batch = batch
    self._apply = jax.jit(lambda p, x: self.model.apply({"params": p}, x))

  def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, H, W, 3) in [-1, 1] or grey (N, H, W, 1) -> (logits (N, 10), features (N, F)), float32."""
    x = to_grey(images) if images.shape[-1] == 3 else np.asarray(images, np.float32)
    logits, feats = [], []
    for i in range(0, len(x), self.batch):
      part = x[i:i + self.batch]
      pad = self.batch - len(part)  # one compiled shape
      out = self._apply(self.params, np.concatenate([part, np.zeros((pad,) + part.shape[1:], np.float32)]))
      logits.append(np.asarray(out[0])[:len(part)])
      feats.append(np.asarray(out[1])[:len(part)])
    return np.concatenate(logits), np.concatenate(feats)


def train(data_dir: str, workdir: epath.PathLike, steps: int, batch: int, width: int,
          log=print) -> tuple[Trained, dict]:
  """Trains the classifier (or loads it from ``workdir``) and reports its test accuracy.

  Adam 1e-3 with cosine decay, no augmentation (the study trains nothing on
  flipped images); ``SEED`` fixes the initialisation and the batches.

  Returns:
    (the classifier, ``{"test_accuracy", "train_steps", "seconds", ...}``).
  """
  workdir = epath.Path(workdir)
  result_path = workdir / RESULT_FILE
  model = Classifier(width)
  template = model.init(jax.random.key(SEED), jnp.zeros((1, 32, 32, 1)))["params"]
  if result_path.exists():
    params = flax.serialization.from_bytes(template, (workdir / PARAMS_FILE).read_bytes())
    return Trained(params, width), json.loads(result_path.read_text())
  start = time.time()
  x, y = load_split(data_dir, "train")
  tx = optax.adam(optax.cosine_decay_schedule(1e-3, steps))
  params, opt = template, tx.init(template)

  @jax.jit
  def step(params, opt, xb, yb):
    def loss_fn(p):
      logits, _ = model.apply({"params": p}, xb)
      return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt, loss

  rng = np.random.default_rng(SEED)
  order = rng.permutation(len(x))
  pos = 0
  for i in range(steps):
    if pos + batch > len(order):
      order, pos = rng.permutation(len(x)), 0
    idx = order[pos:pos + batch]
    pos += batch
    params, opt, loss = step(params, opt, x[idx], y[idx])
    if (i + 1) % max(1, steps // 5) == 0:
      log(f"classifier step {i + 1}/{steps} loss {float(loss):.4f}")
  trained = Trained(params, width)
  xt, yt = load_split(data_dir, "test")
  logits, _ = trained(xt)
  accuracy = float(np.mean(np.argmax(logits, -1) == yt))
  result = {"test_accuracy": accuracy, "test_images": len(yt), "train_steps": steps, "batch": batch,
            "width": width, "features": FEATURES, "seed": SEED, "seconds": time.time() - start}
  workdir.mkdir(parents=True, exist_ok=True)
  paths.write_bytes(workdir / PARAMS_FILE, flax.serialization.to_bytes(params))  # atomic, then the result
  paths.write_text(result_path, json.dumps(result, indent=2))
  return trained, result


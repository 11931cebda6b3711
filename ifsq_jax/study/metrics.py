"""The study's metrics: ``fd_fmnist`` and precision / recall in the classifier's features, and reconstruction.

``fd_fmnist`` is the Fréchet distance of Gaussians fitted to the penultimate
features of the study's Fashion-MNIST classifier
(:mod:`ifsq_jax.study.classifier`); precision / recall are ADM's k = 3
manifold estimates in the same features. Both come from
:mod:`ifsq_jax.eval.generative`. A generator's samples also get the
classifier's accuracy on them (``label_accuracy``: how often a sample is
recognised as the class it was drawn for).

N images, F feature width, D latent channels, L levels.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ifsq_jax.eval import generative
from ifsq_jax.eval.image_metrics import psnr, ssim


def stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(mean (F,), covariance (F, F)) of (N, F) features, float64."""
  f = np.asarray(features, np.float64)
  return f.mean(0), np.cov(f, rowvar=False)


def fd(real: np.ndarray, fake: np.ndarray) -> float:
  """Fréchet distance of the Gaussians of two (N, F) feature sets (``fd_fmnist`` in the classifier's features)."""
  return generative.frechet_distance(*stats(real), *stats(fake))


def feature_metrics(real: np.ndarray, fake: np.ndarray, fake_logits: np.ndarray | None = None,
                    labels: np.ndarray | None = None, pr_real: np.ndarray | None = None) -> dict[str, float]:
  """``fd_fmnist``, ``precision``, ``recall`` (and ``label_accuracy`` given logits and labels) of fake vs real.

  Args:
    real: (N1, F) reference features.
    fake: (N2, F) features of generated or reconstructed images.
    fake_logits: (N2, 10) the classifier's logits of the fake images, optional.
    labels: (N2,) the classes the fake images were drawn for, optional.
    pr_real: (N3, F) reference features for precision / recall (default ``real``).
  """
  p, r = generative.precision_recall(real if pr_real is None else pr_real, fake)
  out = {"fd_fmnist": fd(real, fake), "precision": p, "recall": r}
  if fake_logits is not None and labels is not None:
    out["label_accuracy"] = float(np.mean(np.argmax(fake_logits, -1) == labels))
  return out


def _entropy_bits(counts: np.ndarray) -> float:
  p = counts[counts > 0].astype(np.float64)
  p /= p.sum()
  return float(-(p * np.log2(p)).sum())


def reconstruction(tokenizer: Any, images: np.ndarray, featurize, batch: int = 250) -> dict[str, Any]:
  """Reconstruction metrics of a loaded tokenizer on (N, H, W, 3) uint8 images.

  Returns PSNR and SSIM on [0, 1] (means over images; reconstructions clipped to
  [-1, 1], as the classifier sees them), ``fd_fmnist`` of the reconstructions
  against the originals, and for quantizers the code usage (distinct codes /
  codebook size, over all N * h * w tokens), the code entropy, and for FSQ each
  channel's level entropy in bits and its ratio to log2 L.

  Args:
    tokenizer: A :class:`~ifsq_jax.models.pretrained.LoadedTokenizer`.
    images: (N, H, W, 3) uint8.
    featurize: Images (N, H, W, 3) in [-1, 1] -> (logits, features).
    batch: Images per call (the last is padded: one compiled shape).
  """
  cfg = tokenizer.config
  fsq = cfg.fsq if cfg.bottleneck in ("ifsq", "fsq") else None
  model = tokenizer.model

  @jax.jit
  def run(variables, x):
    enc = model.apply(variables, x, method=lambda m, v: m.encode(v))
    recon = model.apply(variables, enc.codes, method=lambda m, c: m.decode(c))
    recon = jnp.clip(recon.astype(jnp.float32), -1, 1)
    a, b = (x + 1) / 2, (recon + 1) / 2
    return recon, psnr(a, b), ssim(a, b), enc.codes, enc.indices

  n = len(images)
  recons, scores, codes, indices = [], {"psnr": [], "ssim": []}, [], []
  for i in range(0, n, batch):
    part = images[i:i + batch].astype(np.float32) / 127.5 - 1.0
    k = len(part)
    part = np.concatenate([part, np.zeros((batch - k,) + part.shape[1:], np.float32)])
    recon, p, s, c, idx = run(tokenizer.variables, part)
    recons.append(np.asarray(recon)[:k])
    scores["psnr"].append(np.asarray(p)[:k])
    scores["ssim"].append(np.asarray(s)[:k])
    if fsq is not None:
      codes.append(np.asarray(c)[:k])
    if idx is not None:
      indices.append(np.asarray(idx)[:k])
  recon = np.concatenate(recons)
  _, real = featurize(images.astype(np.float32) / 127.5 - 1.0)
  _, fake = featurize(recon)
  out: dict[str, Any] = {"images": n, "psnr": float(np.mean(np.concatenate(scores["psnr"]))),
                         "ssim": float(np.mean(np.concatenate(scores["ssim"]))), "fd_fmnist": fd(real, fake)}
  if indices:
    idx = np.concatenate(indices).reshape(-1)  # one index per token (these tokenizers have no index groups)
    size = int(math.prod(cfg.index_sizes))
    _, counts = np.unique(idx, return_counts=True)
    out.update(code_usage=len(counts) / size, codes_used=int(len(counts)), codebook_size=size,
               code_entropy_bits=_entropy_bits(counts), tokens=int(idx.size))
  if codes:
    digits = np.asarray(fsq.codes_to_digits(np.concatenate(codes))).reshape(-1, fsq.dim)
    ent = [_entropy_bits(np.bincount(digits[:, ch], minlength=l)) for ch, l in enumerate(fsq.levels)]
    out["channel_entropy_bits"] = ent
    out["channel_entropy_ratio"] = float(np.mean([e / math.log2(l) for e, l in zip(ent, fsq.levels)]))
  return out

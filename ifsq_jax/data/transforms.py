"""Image transforms of the reference, on uint8 HWC arrays, returning float32 in [-1, 1].

* ``resize_crop_flip`` (tokenizer training): shorter side resized to the target,
  random crop, horizontal flip with probability 1/2 (torchvision's
  ``Resize + RandomCrop + RandomHorizontalFlip``, bilinear with antialias).
* ``adm_random_crop`` (DiT and AR training): ADM's ``random_crop_arr``: the
  shorter side is drawn in [size, size / 0.8], reached by BOX halving then a
  BICUBIC resize, then a random crop; AR also flips.
* ``center_crop`` (evaluation): ADM's ``center_crop_arr``.

H W image size, C = 3 channels.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
from PIL import Image

Transform = Callable[[np.ndarray, int, np.random.Generator], np.ndarray]


def to_float(image: np.ndarray) -> np.ndarray:
  """uint8 (H, W, 3) -> float32 in [-1, 1]."""
  return image.astype(np.float32) / 127.5 - 1.0


def _pil(image: np.ndarray) -> Image.Image:
  return Image.fromarray(image)


def _resize_shorter(pil: Image.Image, size: int, resample) -> Image.Image:
  w, h = pil.size
  scale = size / min(w, h)
  return pil.resize((max(size, round(w * scale)), max(size, round(h * scale))), resample=resample)


def _crop(arr: np.ndarray, size: int, top: int, left: int) -> np.ndarray:
  return arr[top:top + size, left:left + size]


def resize_crop_flip(image: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
  """Tokenizer training transform: (H, W, 3) uint8 -> (size, size, 3) float32."""
  arr = np.asarray(_resize_shorter(_pil(image), size, Image.BILINEAR))
  top = int(rng.integers(0, arr.shape[0] - size + 1))
  left = int(rng.integers(0, arr.shape[1] - size + 1))
  arr = _crop(arr, size, top, left)
  if rng.random() < 0.5:
    arr = arr[:, ::-1]
  return to_float(arr)


def _adm_resize(pil: Image.Image, smaller: int) -> np.ndarray:
  while min(*pil.size) >= 2 * smaller:
    pil = pil.resize(tuple(x // 2 for x in pil.size), resample=Image.BOX)
  scale = smaller / min(*pil.size)
  pil = pil.resize(tuple(round(x * scale) for x in pil.size), resample=Image.BICUBIC)
  return np.asarray(pil)


def adm_random_crop(image: np.ndarray, size: int, rng: np.random.Generator, flip: bool = False,
                    min_crop_frac: float = 0.8, max_crop_frac: float = 1.0) -> np.ndarray:
  """ADM ``random_crop_arr``: (H, W, 3) uint8 -> (size, size, 3) float32."""
  lo, hi = math.ceil(size / max_crop_frac), math.ceil(size / min_crop_frac)
  arr = _adm_resize(_pil(image), int(rng.integers(lo, hi + 1)))
  top = int(rng.integers(0, arr.shape[0] - size + 1))
  left = int(rng.integers(0, arr.shape[1] - size + 1))
  arr = _crop(arr, size, top, left)
  if flip and rng.random() < 0.5:
    arr = arr[:, ::-1]
  return to_float(arr)


def adm_random_crop_flip(image: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
  """ADM random crop with a horizontal flip (the AR trainer's transform)."""
  return adm_random_crop(image, size, rng, flip=True)


def center_crop(image: np.ndarray, size: int, rng: np.random.Generator | None = None) -> np.ndarray:
  """ADM ``center_crop_arr``: (H, W, 3) uint8 -> (size, size, 3) float32."""
  del rng
  arr = _adm_resize(_pil(image), size)
  top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
  return to_float(_crop(arr, size, top, left))


TRANSFORMS: dict[str, Transform] = {
    "resize_crop_flip": resize_crop_flip,
    "adm_random_crop": adm_random_crop,
    "adm_random_crop_flip": adm_random_crop_flip,
    "center_crop": center_crop,
}

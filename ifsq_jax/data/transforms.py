"""Image transforms of the reference: an image in, a (size, size, 3) uint8 crop out.

* ``resize_crop_flip`` (tokenizer training): shorter side resized to the target,
  random crop, horizontal flip with probability 1/2 (torchvision's
  ``Resize + RandomCrop + RandomHorizontalFlip``, bilinear with antialias).
* ``adm_random_crop`` (DiT and AR training): ADM's ``random_crop_arr``: the
  shorter side is drawn in [size, size / 0.8], reached by BOX halving then a
  BICUBIC resize, then a random crop; AR also flips.
* ``center_crop`` (evaluation, FID reference crops): ADM's ``center_crop_arr``,
  exactly: the whole image decoded, halved and resized, then cropped.

The input is a uint8 (H, W, 3) array or a PIL image that is opened but not yet
decoded (``Source.open``). The training transforms then take two shortcuts that
keep their meaning:

* A JPEG is decoded at a reduced scale (libjpeg's DCT scaling, 1/2, 1/4 or 1/8:
  Pillow's ``draft``) when the transform would shrink it that far anyway: for
  ADM's crops, by the BOX halvings ADM does (at most one pixel of difference in
  the halved size); for ``resize_crop_flip``, down to no less than the target.
* Only the part of the image that ends up in the crop is resampled (Pillow's
  ``resize(box=...)`` with the same filter, scale and sample positions as the
  whole resize; pixels differ from resize-then-crop by at most one level of
  rounding).

Images go to the devices as uint8 and become float32 in [-1, 1] inside the step
(:func:`to_float`), a quarter of the bytes of float32 batches.

H W image size, C = 3 channels.
"""

from __future__ import annotations

import math
from typing import Callable, Union

import numpy as np
from PIL import Image

from ifsq_jax.data.sources import DecodeError

ImageLike = Union[np.ndarray, Image.Image]
Transform = Callable[[ImageLike, int, np.random.Generator], np.ndarray]


def to_float(image: np.ndarray) -> np.ndarray:
  """uint8 (..., H, W, 3) -> float32 in [-1, 1] (numpy or jax arrays)."""
  return image.astype(np.float32) / 127.5 - 1.0


def load(image: ImageLike, reduce_to: tuple[int, int] | None = None) -> Image.Image:
  """A decoded RGB PIL image; a JPEG not smaller than ``reduce_to`` (w, h) is decoded at a reduced scale.

  Raises:
    DecodeError: The file cannot be decoded (truncated, corrupt).
  """
  if isinstance(image, np.ndarray):
    if image.ndim == 2:
      image = np.repeat(image[..., None], 3, axis=-1)
    return Image.fromarray(np.ascontiguousarray(image[..., :3]).astype(np.uint8, copy=False))
  try:
    if reduce_to is not None and image.format == "JPEG":
      image.draft("RGB", reduce_to)  # the largest DCT scaling that keeps both sides >= reduce_to
    return image.convert("RGB") if image.mode != "RGB" else _loaded(image)
  except Exception as e:  # pylint: disable=broad-except
    raise DecodeError(f"{getattr(image, 'filename', '') or 'image'}: {type(e).__name__}: {e}") from e


def _loaded(image: Image.Image) -> Image.Image:
  image.load()
  return image


def _crop_resized(pil: Image.Image, resized: tuple[int, int], size: int, top: int, left: int,
                  resample) -> np.ndarray:
  """The (size, size) window at (top, left) of ``pil`` resized to ``resized`` (w, h), resampling only the window."""
  sx, sy = pil.size[0] / resized[0], pil.size[1] / resized[1]
  w, h = pil.size
  box = (left * sx, top * sy, min((left + size) * sx, w), min((top + size) * sy, h))  # min: float rounding
  return np.asarray(pil.resize((size, size), resample=resample, box=box))


def _flip(arr: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  return np.ascontiguousarray(arr[:, ::-1]) if rng.random() < 0.5 else arr


def _shorter_to(wh: tuple[int, int], size: int) -> tuple[int, int]:
  w, h = wh
  scale = size / min(w, h)
  return max(size, round(w * scale)), max(size, round(h * scale))


def resize_crop_flip(image: ImageLike, size: int, rng: np.random.Generator) -> np.ndarray:
  """Tokenizer training transform: an image -> (size, size, 3) uint8."""
  # A JPEG is decoded no smaller than the resized image.
  pil = load(image, _shorter_to(image.size, size) if isinstance(image, Image.Image) else None)
  resized = _shorter_to(pil.size, size)
  top = int(rng.integers(0, resized[1] - size + 1))
  left = int(rng.integers(0, resized[0] - size + 1))
  return _flip(_crop_resized(pil, resized, size, top, left, Image.BILINEAR), rng)


def _halvings(wh: tuple[int, int], smaller: int) -> int:
  """How many times ADM's loop halves an image of size ``wh`` (w, h) before resizing to ``smaller``."""
  k, (w, h) = 0, wh
  while min(w, h) >= 2 * smaller:
    w, h, k = w // 2, h // 2, k + 1
  return k


def _adm_halve(pil: Image.Image, smaller: int) -> Image.Image:
  while min(*pil.size) >= 2 * smaller:
    pil = pil.resize(tuple(x // 2 for x in pil.size), resample=Image.BOX)
  return pil


def _adm_size(wh: tuple[int, int], smaller: int) -> tuple[int, int]:
  scale = smaller / min(*wh)
  return tuple(round(x * scale) for x in wh)


def adm_random_crop(image: ImageLike, size: int, rng: np.random.Generator, flip: bool = False,
                    min_crop_frac: float = 0.8, max_crop_frac: float = 1.0) -> np.ndarray:
  """ADM ``random_crop_arr``: an image -> (size, size, 3) uint8."""
  lo, hi = math.ceil(size / max_crop_frac), math.ceil(size / min_crop_frac)
  smaller = int(rng.integers(lo, hi + 1))
  reduce_to = None
  if isinstance(image, Image.Image):  # libjpeg does (up to three of) ADM's halvings while decoding
    k = min(_halvings(image.size, smaller), 3)
    reduce_to = tuple(-(-x // 2**k) for x in image.size) if k else None
  pil = _adm_halve(load(image, reduce_to), smaller)
  resized = _adm_size(pil.size, smaller)
  top = int(rng.integers(0, resized[1] - size + 1))
  left = int(rng.integers(0, resized[0] - size + 1))
  arr = _crop_resized(pil, resized, size, top, left, Image.BICUBIC)
  return _flip(arr, rng) if flip else arr


def adm_random_crop_flip(image: ImageLike, size: int, rng: np.random.Generator) -> np.ndarray:
  """ADM random crop with a horizontal flip (the AR trainer's transform)."""
  return adm_random_crop(image, size, rng, flip=True)


def center_crop(image: ImageLike, size: int, rng: np.random.Generator | None = None) -> np.ndarray:
  """ADM ``center_crop_arr`` exactly: an image -> (size, size, 3) uint8."""
  del rng
  pil = _adm_halve(load(image), size)
  arr = np.asarray(pil.resize(_adm_size(pil.size, size), resample=Image.BICUBIC))
  top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
  return arr[top:top + size, left:left + size]


TRANSFORMS: dict[str, Transform] = {  # the names config_lib.TRANSFORM_NAMES accepts (a test checks they agree)
    "resize_crop_flip": resize_crop_flip,
    "adm_random_crop": adm_random_crop,
    "adm_random_crop_flip": adm_random_crop_flip,
    "center_crop": center_crop,
}

"""Random-access image sources: ``len(source)`` and ``source[i] -> (uint8 HWC image, int label)``.

* :class:`EmbeddedSource`: crops of the colour photos that ship inside
  scikit-image, labelled by source photo; needs no download. Each photo is
  resized to a shorter side of 256; crops from its top three quarters are the
  ``train`` split, crops from the bottom quarter the ``validation`` split, so the
  splits share no pixels.
* :class:`ImageFolderSource`: ``root/<class>/<image>`` (or
  ``root/<split>/<class>/<image>`` when such split folders exist).
* :class:`TfdsSource`: any tensorflow-datasets image dataset prepared in the
  ``array_record`` format (random access), e.g. ``imagenet2012`` from a
  ``data_dir`` or built from the tar files in a ``manual_dir``.

An undecodable file raises :class:`DecodeError`; the pipeline skips it.
"""

from __future__ import annotations

import functools
import os
import pathlib
from typing import Protocol

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


class DataError(ValueError):
  """A dataset that cannot be used: missing path, unknown name, empty split."""


class DecodeError(Exception):
  """One example could not be decoded."""


class Source(Protocol):
  name: str
  num_classes: int

  def __len__(self) -> int:
    ...

  def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
    ...


def _rgb(image: np.ndarray) -> np.ndarray:
  if image.ndim == 2:
    image = np.repeat(image[..., None], 3, axis=-1)
  return np.ascontiguousarray(image[..., :3]).astype(np.uint8)


# ------------------------------------------------------------------ embedded

EMBEDDED_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field",
                   "retina", "motorcycle_left", "motorcycle_right")


def _photo(name: str) -> np.ndarray:
  from skimage import data as skdata  # pylint: disable=g-import-not-at-top
  if name.startswith("motorcycle_"):
    left, right, _ = skdata.stereo_motorcycle()
    return left if name.endswith("left") else right
  return getattr(skdata, name)()


@functools.lru_cache(maxsize=4)
def embedded_crops(split: str, crop: int = 64, stride: int = 32, short_side: int = 256):
  """(images (N, crop, crop, 3) uint8, labels (N,) int32) of the embedded dataset."""
  images, labels = [], []
  for label, name in enumerate(EMBEDDED_PHOTOS):
    pil = Image.fromarray(_rgb(_photo(name)))
    w, h = pil.size
    s = short_side / min(w, h)
    arr = np.asarray(pil.resize((round(w * s), round(h * s)), resample=Image.BICUBIC))
    cut = arr.shape[0] * 3 // 4
    region = arr[:cut] if split == "train" else arr[cut:]
    for top in range(0, region.shape[0] - crop + 1, stride):
      for left in range(0, region.shape[1] - crop + 1, stride):
        images.append(region[top:top + crop, left:left + crop])
        labels.append(label)
  return np.stack(images), np.asarray(labels, np.int32)


class EmbeddedSource:
  """Crops of the photos bundled with scikit-image (no download)."""

  num_classes = len(EMBEDDED_PHOTOS)

  def __init__(self, split: str = "train"):
    if split not in ("train", "validation"):
      raise DataError(f"embedded dataset split {split!r} is not valid; use 'train' or 'validation'.")
    self.name = f"embedded:{split}"
    self.images, self.labels = embedded_crops(split)

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
    return self.images[index], int(self.labels[index])


# ------------------------------------------------------------------ folder

class ImageFolderSource:
  """``root/<class>/<file>``; with ``root/<split>/`` folders present, the split's folder.

  Without split folders, every 20th file (sorted order) is the ``validation``
  split and the rest ``train``.
  """

  def __init__(self, root: str, split: str = "train"):
    root_path = pathlib.Path(root)
    if not root or not root_path.is_dir():
      raise DataError(f"image folder {root!r} does not exist or is not a directory (config.data.path).")
    split_dir = root_path / split
    holdout = not split_dir.is_dir()
    base = root_path if holdout else split_dir
    classes = sorted(p.name for p in base.iterdir() if p.is_dir() and p.name not in ("train", "validation", "val"))
    files = []
    for label, cls in enumerate(classes):
      for dirpath, _, names in sorted(os.walk(base / cls)):
        files.extend((os.path.join(dirpath, n), label) for n in sorted(names)
                     if n.lower().endswith(IMAGE_EXTENSIONS))
    if holdout:
      files = [f for i, f in enumerate(files) if (i % 20 == 0) == (split != "train")]
    if not files:
      raise DataError(f"image folder {base} has no images for split {split!r}: expected <class>/<image> files "
                      f"with extensions {IMAGE_EXTENSIONS}.")
    self.name = f"folder:{root}:{split}"
    self.files = files
    self.classes = classes
    self.num_classes = len(classes)

  def __len__(self) -> int:
    return len(self.files)

  def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
    path, label = self.files[index]
    try:
      with Image.open(path) as im:
        im.load()
        return _rgb(np.asarray(im.convert("RGB"))), label
    except Exception as e:  # pylint: disable=broad-except
      raise DecodeError(f"{path}: {type(e).__name__}: {e}") from e


# ------------------------------------------------------------------ tfds

class TfdsSource:
  """A tensorflow-datasets image dataset through its random-access data source."""

  def __init__(self, name: str, split: str = "train", data_dir: str = "", manual_dir: str = ""):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    try:
      builder = tfds.builder(name, data_dir=data_dir or None, file_format="array_record")
    except tfds.core.registered.DatasetNotFoundError as e:
      raise DataError(f"tfds dataset {name!r} is not known to tensorflow-datasets (config.data.tfds_name): "
                      f"{str(e).splitlines()[0]}") from None
    if not builder.is_prepared():
      if not manual_dir:
        raise DataError(
            f"tfds dataset {name!r} is not prepared in {builder.data_dir} (config.data.data_dir). Prepare it in the "
            "array_record format (`tfds build NAME --file_format=array_record`), or set config.data.manual_dir to "
            "the folder with its downloaded files (for imagenet2012: ILSVRC2012_img_train.tar and _val.tar).")
      if not pathlib.Path(manual_dir).is_dir():
        raise DataError(f"config.data.manual_dir={manual_dir!r} does not exist.")
      builder.download_and_prepare(
          file_format="array_record", download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    if split not in builder.info.splits:
      raise DataError(f"tfds dataset {name!r} has no split {split!r}; it has {sorted(builder.info.splits)}.")
    self._source = builder.as_data_source(split=split)
    self.name = f"tfds:{name}:{split}"
    features = builder.info.features
    self.num_classes = getattr(features["label"], "num_classes", 0) if "label" in features.keys() else 0

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
    try:
      ex = self._source[index]
      return _rgb(np.asarray(ex["image"])), int(ex.get("label", 0))
    except Exception as e:  # pylint: disable=broad-except
      raise DecodeError(f"{self.name}[{index}]: {type(e).__name__}: {e}") from e

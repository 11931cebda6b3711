"""Random-access image sources: ``len(source)`` and ``source[i] -> (uint8 HWC image, int label)``.

``source.open(i) -> (image, label)`` is the training pipeline's read: the image
opened but not decoded (a PIL image whose header is read), so that the transform
can decode a JPEG at a reduced scale (:mod:`ifsq_jax.data.transforms`).

* :class:`EmbeddedSource`: crops of the colour photos that ship inside
  scikit-image, labelled by source photo; needs no download. Each photo is
  resized to a shorter side of 256; crops from its top three quarters are the
  ``train`` split, crops from the bottom quarter the ``validation`` split, so the
  splits share no pixels.
* :class:`ImageFolderSource`: ``root/<class>/<image>`` (or
  ``root/<split>/<class>/<image>`` when such split folders exist).
* :class:`IdxSource`: the four IDX files of MNIST or Fashion-MNIST
  (``train-images-idx3-ubyte.gz`` etc., gzipped or not) in one directory;
  ``train`` reads the training files, ``validation``/``test`` the ``t10k`` ones.
  The 28 x 28 grey images are padded to 32 x 32 with black and repeated to RGB.
* :class:`TfdsSource`: any tensorflow-datasets image dataset prepared in the
  ``array_record`` format (random access), e.g. ``imagenet2012`` from a
  ``data_dir`` or built from the tar files in a ``manual_dir`` (by process 0;
  the other processes wait for it). Images are decoded with PIL, as ADM does.

An undecodable file raises :class:`DecodeError`; the pipeline skips it.
"""

from __future__ import annotations

import functools
import gzip
import io
import os
from typing import Any, Protocol

import numpy as np
from etils import epath
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

  def open(self, index: int) -> tuple[Any, int]:
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

  open = __getitem__


# ------------------------------------------------------------------ IDX (MNIST, Fashion-MNIST)

IDX_PREFIXES = {"train": "train", "validation": "t10k", "test": "t10k"}
_IDX_PAD = 2  # 28 + 2 * 2 = 32: a size the tokenizers' downsampling divides


def read_idx(path: epath.PathLike) -> np.ndarray:
  """One IDX file (gzipped when its name ends in .gz) as an array of its dtype and shape."""
  path = epath.Path(path)
  raw = path.read_bytes()
  if path.name.endswith(".gz"):
    raw = gzip.decompress(raw)
  dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in dtypes:
    raise DataError(f"{path} is not an IDX file (its first bytes are {raw[:4]!r}, expected 00 00 <type> <ndim>).")
  ndim = raw[3]
  shape = tuple(int(n) for n in np.frombuffer(raw, ">u4", ndim, 4))
  dtype = np.dtype(dtypes[raw[2]])
  if len(raw) != 4 + 4 * ndim + int(np.prod(shape)) * dtype.itemsize:
    raise DataError(f"{path} holds {len(raw) - 4 - 4 * ndim} bytes of data; its header {shape} {dtype} says "
                    f"{int(np.prod(shape)) * dtype.itemsize}.")
  return np.frombuffer(raw, dtype, offset=4 + 4 * ndim).reshape(shape)


def _idx_file(root: epath.Path, name: str) -> epath.Path:
  for candidate in (root / f"{name}.gz", root / name):
    if candidate.exists():
      return candidate
  raise DataError(f"{root} has no {name}.gz (or {name}); config.data.name='idx' reads the four IDX files of MNIST or "
                  "Fashion-MNIST from config.data.path (Debian/Ubuntu: apt-get install dataset-fashion-mnist puts "
                  "them in /usr/share/datasets/fashion-mnist).")


@functools.lru_cache(maxsize=4)
def idx_split(root: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  """(images (N, 32, 32) uint8 padded with black, labels (N,) int32) of one split of an IDX directory."""
  if split not in IDX_PREFIXES:
    raise DataError(f"IDX split {split!r} is not valid; use one of {sorted(IDX_PREFIXES)}.")
  folder = epath.Path(root)
  if not folder.is_dir():
    raise DataError(f"config.data.path={root!r} is not a directory (config.data.name='idx' reads IDX files there).")
  prefix = IDX_PREFIXES[split]
  images = read_idx(_idx_file(folder, f"{prefix}-images-idx3-ubyte"))
  labels = read_idx(_idx_file(folder, f"{prefix}-labels-idx1-ubyte"))
  if images.ndim != 3 or images.dtype != np.uint8 or labels.shape != images.shape[:1]:
    raise DataError(f"{root} ({split}): images {images.shape} {images.dtype} and labels {labels.shape} do not make "
                    "a dataset (expected uint8 (N, H, W) images and N labels).")
  padded = np.pad(images, ((0, 0), (_IDX_PAD, _IDX_PAD), (_IDX_PAD, _IDX_PAD)))
  return padded, labels.astype(np.int32)


class IdxSource:
  """MNIST-style IDX files: 32 x 32 RGB (grey repeated) uint8 images and their labels."""

  def __init__(self, root: str, split: str = "train"):
    self.root, self.split = str(root), split
    self.name = f"idx:{self.root}:{split}"
    images, labels = idx_split(self.root, split)
    self.num_classes = int(labels.max()) + 1 if len(labels) else 0
    self._len = len(labels)

  def __getstate__(self):  # worker processes read the files again rather than receive the arrays
    return {"root": self.root, "split": self.split, "name": self.name, "num_classes": self.num_classes,
            "_len": self._len}

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
    images, labels = idx_split(self.root, self.split)
    return _rgb(images[index]), int(labels[index])

  open = __getitem__


def _open(read, name: str) -> Image.Image:
  """An image opened (header read, pixels not decoded) from ``read("rb")``, a binary file object."""
  try:
    with read("rb") as f:
      data = f.read()
    image = Image.open(io.BytesIO(data))
    image.filename = name  # named in decode errors
    return image
  except Exception as e:  # pylint: disable=broad-except
    raise DecodeError(f"{name}: {type(e).__name__}: {e}") from e


def _decode(read, name: str) -> np.ndarray:
  """A whole image decoded to uint8 (H, W, 3)."""
  image = _open(read, name)
  try:
    return _rgb(np.asarray(image.convert("RGB")))
  except Exception as e:  # pylint: disable=broad-except
    raise DecodeError(f"{name}: {type(e).__name__}: {e}") from e


# ------------------------------------------------------------------ folder

class ImageFolderSource:
  """``root/<class>/<file>``; with ``root/<split>/`` folders present, the split's folder.

  Without split folders, every 20th file (sorted order) is the ``validation``
  split and the rest ``train``. ``root`` may be a ``gs://`` path.
  """

  def __init__(self, root: str, split: str = "train"):
    root_path = epath.Path(root) if root else None
    if root_path is None or not root_path.is_dir():
      raise DataError(f"image folder {root!r} does not exist or is not a directory (config.data.path).")
    split_dir = root_path / split
    holdout = not split_dir.is_dir()
    base = root_path if holdout else split_dir
    classes = sorted(p.name for p in base.iterdir() if p.is_dir() and p.name not in ("train", "validation", "val"))
    files = []
    for label, cls in enumerate(classes):
      files.extend((str(f), label) for f in _image_files(base / cls))
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
    return _decode(epath.Path(path).open, path), label

  def open(self, index: int) -> tuple[Image.Image, int]:
    path, label = self.files[index]
    return _open(epath.Path(path).open, path), label


def _image_files(folder: epath.Path) -> list[epath.Path]:
  """Image files under ``folder``: its own in sorted order, then each sub-folder's (sorted), recursively."""
  entries = sorted(folder.iterdir(), key=lambda p: p.name)
  dirs = [p for p in entries if p.is_dir()]
  out = [p for p in entries if p not in dirs and p.name.lower().endswith(IMAGE_EXTENSIONS)]
  for d in dirs:
    out.extend(_image_files(d))
  return out


# ------------------------------------------------------------------ tfds

class TfdsSource:
  """A tensorflow-datasets image dataset through its random-access (``array_record``) data source.

  Without a prepared dataset in ``data_dir`` and with a ``manual_dir``, process 0
  prepares it and the other processes wait. The random-access reader opens local
  files only: a ``gs://`` ``data_dir`` is refused with the ways that work.
  """

  def __init__(self, name: str, split: str = "train", data_dir: str = "", manual_dir: str = ""):
    if str(data_dir).startswith("gs://"):
      raise DataError(
          f"config.data.data_dir={data_dir!r}: tfds's random-access array_record reader cannot open gs:// objects. "
          "Mount the bucket with gcsfuse (launch/tpu/tpu.sh setup --mount=BUCKET:/mnt/DIR) and set "
          "config.data.data_dir to the mounted folder, or copy the prepared dataset to a local disk; image folders "
          "(config.data.name='image_folder', config.data.path='gs://...') are read from gs:// directly.")
    self._args = (name, split, data_dir, manual_dir)
    builder = self._builder()
    if manual_dir:
      self._prepare(builder)
      builder = self._builder()
    if not builder.is_prepared():
      raise DataError(
          f"tfds dataset {name!r} is not prepared in {builder.data_dir} (config.data.data_dir). Prepare it in the "
          "array_record format (`tfds build NAME --file_format=array_record`), or set config.data.manual_dir to "
          "the folder with its downloaded files (for imagenet2012: ILSVRC2012_img_train.tar and _val.tar).")
    if split not in builder.info.splits:
      raise DataError(f"tfds dataset {name!r} has no split {split!r}; it has {sorted(builder.info.splits)}.")
    self.name = f"tfds:{name}:{split}"
    features = builder.info.features
    self.num_classes = getattr(features["label"], "num_classes", 0) if "label" in features.keys() else 0
    self._length = builder.info.splits[split].num_examples
    self._source = None

  def _builder(self):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    name, _, data_dir, _ = self._args
    try:
      return tfds.builder(name, data_dir=data_dir or None, file_format="array_record")
    except tfds.core.registered.DatasetNotFoundError as e:
      raise DataError(f"tfds dataset {name!r} is not known to tensorflow-datasets (config.data.tfds_name): "
                      f"{str(e).splitlines()[0]}") from None

  def _prepare(self, builder) -> None:
    """Process 0 prepares the dataset from ``manual_dir``; every process then meets at a barrier."""
    import jax  # pylint: disable=g-import-not-at-top
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    from ifsq_jax import multihost  # pylint: disable=g-import-not-at-top
    name, _, _, manual_dir = self._args
    if jax.process_index() == 0 and not builder.is_prepared():
      if not epath.Path(manual_dir).is_dir():
        raise DataError(f"config.data.manual_dir={manual_dir!r} does not exist.")
      builder.download_and_prepare(
          file_format="array_record", download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    # Every process passes here (the same config on each): preparing ImageNet takes hours.
    multihost.barrier(f"ifsq_jax/tfds_prepare/{name}/{self._args[1]}", timeout_s=48 * 3600)

  def _data_source(self):
    if self._source is None:  # opened on first read: in each worker process of its own
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
      # Images stay encoded: PIL decodes them (as ADM's loader does), at a reduced scale where a transform allows.
      self._source = self._builder().as_data_source(
          split=self._args[1], decoders={"image": tfds.decode.SkipDecoding()})
    return self._source

  def __getstate__(self):  # picklable for worker processes: the reader is opened again there
    return {**self.__dict__, "_source": None}

  def __len__(self) -> int:
    return self._length

  def _read(self, index: int) -> tuple[bytes, int]:
    try:
      ex = self._data_source()[index]
      return ex["image"], int(ex.get("label", 0))
    except Exception as e:  # pylint: disable=broad-except
      raise DecodeError(f"{self.name}[{index}]: {type(e).__name__}: {e}") from e

  def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
    data, label = self._read(index)
    return _decode(lambda mode: io.BytesIO(data), f"{self.name}[{index}]"), label

  def open(self, index: int) -> tuple[Image.Image, int]:
    data, label = self._read(index)
    return _open(lambda mode: io.BytesIO(data), f"{self.name}[{index}]"), label

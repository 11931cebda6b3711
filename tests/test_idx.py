"""IDX files (MNIST, Fashion-MNIST) as a data source: config.data.name='idx', config.data.path=DIR."""

import gzip
import pickle
import struct

import numpy as np
import pytest

from conftest import toy_config
from ifsq_jax import config_lib
from ifsq_jax.data import pipeline, sources


def _idx_bytes(array: np.ndarray) -> bytes:
  return struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + \
      array.astype(np.uint8).tobytes()


def write_idx_dir(root, n_train=40, n_test=12, gz=True, seed=0):
  """Writes the four IDX files of a small MNIST-like dataset; returns {split: (images, labels)}."""
  rng = np.random.default_rng(seed)
  root.mkdir(parents=True, exist_ok=True)
  out = {}
  for prefix, n in (("train", n_train), ("t10k", n_test)):
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    for kind, arr in (("images-idx3", images), ("labels-idx1", labels)):
      name = f"{prefix}-{kind}-ubyte"
      data = _idx_bytes(arr)
      if gz:
        (root / f"{name}.gz").write_bytes(gzip.compress(data))
      else:
        (root / name).write_bytes(data)
    out[prefix] = (images, labels)
  return out


@pytest.mark.parametrize("gz", [True, False])
def test_idx_images_are_padded_to_32_rgb_with_their_labels(tmp_path, gz):
  written = write_idx_dir(tmp_path / "fm", gz=gz)
  train = sources.IdxSource(str(tmp_path / "fm"), "train")
  test = sources.IdxSource(str(tmp_path / "fm"), "test")
  assert len(train) == 40 and len(test) == 12 and train.num_classes == 10
  image, label = train[7]
  assert image.shape == (32, 32, 3) and image.dtype == np.uint8 and label == 7
  np.testing.assert_array_equal(image[2:30, 2:30, 0], written["train"][0][7])
  np.testing.assert_array_equal(image[..., 0], image[..., 2])
  assert not image[:2].any() and not image[:, 30:].any()  # black padding
  np.testing.assert_array_equal(sources.IdxSource(str(tmp_path / "fm"), "validation")[3][0], test[3][0])


def test_an_idx_source_pickles_without_its_arrays_and_reads_the_same(tmp_path):
  write_idx_dir(tmp_path / "fm", n_train=400)
  src = sources.IdxSource(str(tmp_path / "fm"), "train")
  blob = pickle.dumps(src)
  assert len(blob) < 1000
  np.testing.assert_array_equal(pickle.loads(blob)[123][0], src[123][0])


def test_a_training_pipeline_over_idx_is_the_same_with_worker_processes(tmp_path):
  write_idx_dir(tmp_path / "fm", n_train=64)
  config = toy_config(**{"data.name": "idx", "data.path": str(tmp_path / "fm"), "data.image_size": 32})
  config_lib.validate_image_data(config)
  batches = []
  for workers in (0, 1):
    config.data.workers = workers
    p = pipeline.build_pipeline(config, "train", train=True)
    batches.append(next(iter(p)))
    p.close()
  assert batches[0]["image"].shape == (16, 32, 32, 3)
  np.testing.assert_array_equal(batches[0]["image"], batches[1]["image"])
  np.testing.assert_array_equal(batches[0]["label"], batches[1]["label"])


def test_bad_idx_directories_are_clear_errors(tmp_path):
  with pytest.raises(config_lib.ConfigError, match="config.data.path"):
    config_lib.validate_image_data(toy_config(**{"data.name": "idx"}))
  with pytest.raises(sources.DataError, match="not a directory"):
    sources.IdxSource(str(tmp_path / "nowhere"), "train")
  (tmp_path / "empty").mkdir()
  with pytest.raises(sources.DataError, match="train-images-idx3-ubyte.gz.*dataset-fashion-mnist"):
    sources.IdxSource(str(tmp_path / "empty"), "train")
  write_idx_dir(tmp_path / "bad", gz=False)
  with pytest.raises(sources.DataError, match="split 'val'"):
    sources.IdxSource(str(tmp_path / "bad"), "val")
  (tmp_path / "bad" / "train-images-idx3-ubyte").write_bytes(b"PK\x03\x04" + bytes(100))
  with pytest.raises(sources.DataError, match="not an IDX file"):
    sources.IdxSource(str(tmp_path / "bad"), "train")
  good = _idx_bytes(np.zeros((40, 28, 28), np.uint8))
  (tmp_path / "bad" / "train-images-idx3-ubyte").write_bytes(good[:-5])
  with pytest.raises(sources.DataError, match="header"):
    sources.IdxSource(str(tmp_path / "bad"), "train")

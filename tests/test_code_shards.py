"""CodeShardSource over the shards tools.extract writes: random access, skipped images, clear errors."""

import json
import os
import pickle
import shutil

import numpy as np
import pytest
from PIL import Image

import ifsq_jax
from ifsq_jax import config_lib
from ifsq_jax.data import sources, transforms
from ifsq_jax.data.code_shards import CodeShardSource
from ifsq_jax.tools import extract
from test_extract import _tokenizer_dir


def image_folder(root, per_class=(6, 6), broken="b/03_broken.jpg", size=24):
  """``root/train/<class>/*.png`` of random images, plus one truncated JPEG."""
  rng = np.random.default_rng(0)
  for cls, n in zip("ab", per_class):
    os.makedirs(root / "train" / cls, exist_ok=True)
    for i in range(n):
      Image.fromarray(rng.integers(0, 255, (size, size + 4, 3), np.uint8)).save(root / "train" / cls / f"{i:02d}.png")
  if broken:
    path = root / "train" / broken
    Image.fromarray(rng.integers(0, 255, (size, size, 3), np.uint8)).save(path, quality=90)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 3])  # truncated
  return root


def _data_config(root):
  data = config_lib.base_config().data
  if "path" not in data:  # the image fields are added by the image tasks
    data = config_lib.add_image_data(config_lib.base_config()).data
  data.name, data.path = "image_folder", str(root)
  return data


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("codes")
  tok_dir = _tokenizer_dir(tmp / "tok")
  root = image_folder(tmp / "images")
  out = tmp / "codes"
  written = extract.extract(tok_dir, str(out), _data_config(root), "train", image_size=16, shard_size=4, batch=3)
  return tok_dir, root, out, written


def test_source_gives_each_decodable_image_its_codes_indices_flips_and_label(extracted):
  tok_dir, root, out, written = extracted
  images = sources.ImageFolderSource(str(root), "train")
  assert len(images) == 13 and len(written) == 4  # 6 + 7 files, one of them undecodable; shards of 4
  assert extract.skipped_images(written) == 1
  side = json.loads((out / "shard-00002-of-00004.skipped.json").read_text())
  assert side["rows"] == 3 and side["skipped"][0]["index"] == 10 and "03_broken.jpg" in side["skipped"][0]["error"]
  src = CodeShardSource(str(out))
  assert len(src) == 12 and src.name == f"codes:{out}" and src.num_classes == 2
  assert src.codes_shape == (8, 8, 4) and src.index_shape == (8, 8) and src.index_sizes == (625,)
  assert src.image_size == 16 and src.skipped_positions == [10]
  tok = ifsq_jax.load_tokenizer(tok_dir)
  positions = [p for p in range(13) if p != 10]
  x = np.stack([transforms.center_crop(images[p][0], 16) for p in positions])
  codes, idx = np.asarray(tok.encode(x)), np.asarray(tok.encode_to_indices(x))
  idx_flip = np.asarray(tok.encode_to_indices(x[:, :, ::-1]))
  for i in (0, 5, 11, 10, 3, -1):  # out of order, across shards and past the skipped image
    ex = src[i]
    assert sorted(ex) == ["codes", "codes_flip", "indices", "indices_flip", "label"]
    np.testing.assert_array_equal(ex["codes"].astype(np.float32), codes[i])
    np.testing.assert_array_equal(ex["indices"], idx[i])
    np.testing.assert_array_equal(ex["indices_flip"], idx_flip[i])
    assert ex["label"].dtype == np.int32 and ex["label"].shape == () and ex["label"] == images[positions[i]][1]
  with pytest.raises(IndexError):
    src[12]
  again = pickle.loads(pickle.dumps(src))  # for worker processes
  np.testing.assert_array_equal(again[7]["codes"], src[7]["codes"])


def test_shards_without_meta_json_still_load(extracted, tmp_path):
  _, _, out, _ = extracted
  old = tmp_path / "old"
  shutil.copytree(out, old)
  os.remove(old / "meta.json")
  src, ref = CodeShardSource(str(old)), CodeShardSource(str(out))
  assert len(src) == len(ref) and src.num_classes == 2 and src.index_sizes is None
  for i in range(len(src)):
    np.testing.assert_array_equal(src[i]["indices"], ref[i]["indices"])


def test_a_shard_missing_in_the_middle_is_an_error_naming_it(extracted, tmp_path):
  _, _, out, _ = extracted
  broken = tmp_path / "incomplete"
  shutil.copytree(out, broken)
  os.remove(broken / "shard-00001-of-00004.npz")
  with pytest.raises(sources.DataError, match="incomplete extraction.*shard-00001-of-00004.npz"):
    CodeShardSource(str(broken))


def test_inconsistent_shards_are_an_error(extracted, tmp_path):
  _, _, out, _ = extracted
  mixed = tmp_path / "mixed"
  shutil.copytree(out, mixed)
  shutil.copy(mixed / "shard-00003-of-00004.npz", mixed / "shard-00001-of-00004.npz")  # 1 row where 4 belong
  src = CodeShardSource(str(mixed))
  src[0]
  with pytest.raises(sources.DataError, match="shard-00001-of-00004.npz holds 1 rows.*inconsistent"):
    src[4]
  shutil.copy(out / "shard-00000-of-00004.npz", mixed / "shard-00000-of-00009.npz")
  with pytest.raises(sources.DataError, match="different extractions"):
    CodeShardSource(str(mixed))


def test_missing_or_empty_directory_is_a_clear_error(tmp_path):
  with pytest.raises(sources.DataError, match="does not exist"):
    CodeShardSource(str(tmp_path / "nowhere"))
  with pytest.raises(sources.DataError, match="holds no shard-.*tools.extract"):
    CodeShardSource(str(tmp_path))


def test_extracting_into_a_directory_of_another_extraction_is_refused(extracted):
  tok_dir, root, out, _ = extracted
  with pytest.raises(ValueError, match="another extraction.*shard_size"):
    extract.extract(tok_dir, str(out), _data_config(root), "train", image_size=16, shard_size=5)

"""CodeShardSource over the shards tools.extract writes: random access, skipped images, clear errors, conversion."""

import concurrent.futures
import json
import os
import pickle
import shutil

import numpy as np
import pytest
from PIL import Image

import ifsq_jax
from ifsq_jax import config_lib
from ifsq_jax.data import code_shards, sources, transforms
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
  x = np.stack([transforms.to_float(transforms.center_crop(images[p][0], 16)) for p in positions])
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
  assert sorted(p for p in os.listdir(out) if p.startswith("shard-")) == [
      "shard-00000-of-00004.npy", "shard-00001-of-00004.npy", "shard-00002-of-00004.npy",
      "shard-00002-of-00004.skipped.json", "shard-00003-of-00004.npy"]  # no temporary files left
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
  os.remove(broken / "shard-00001-of-00004.npy")
  with pytest.raises(sources.DataError, match="incomplete extraction.*shard-00001-of-00004.npy"):
    CodeShardSource(str(broken))


def test_inconsistent_shards_are_an_error(extracted, tmp_path):
  _, _, out, _ = extracted
  mixed = tmp_path / "mixed"
  shutil.copytree(out, mixed)
  shutil.copy(mixed / "shard-00003-of-00004.npy", mixed / "shard-00001-of-00004.npy")  # 1 row where 4 belong
  src = CodeShardSource(str(mixed))
  src[0]
  with pytest.raises(sources.DataError, match="shard-00001-of-00004.npy holds 1 rows.*inconsistent"):
    src[4]
  shutil.copy(out / "shard-00000-of-00004.npy", mixed / "shard-00000-of-00009.npy")
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


# ------------------------------------------------------------ the .npy layout on synthetic shards


def _arrays(rng, n, start, groups=2, flip=True):
  """One shard's arrays as tools.extract makes them, with factorized index groups."""
  codes = rng.integers(-8, 9, (n, 3, 3, 4)).astype(np.float16) / np.float16(8)
  indices = rng.integers(0, 17, (n, 3, 3, groups)).astype(np.int32)
  out = {"codes": codes, "indices": indices, "labels": rng.integers(0, 7, (n,)).astype(np.int32),
         "index": np.arange(start, start + n, dtype=np.int64)}
  if flip:
    out["codes_flip"], out["indices_flip"] = codes[:, :, ::-1], indices[:, :, ::-1]
  return out


def _write(root, rows=(5, 5, 5, 5, 2), shard_size=5, skipped=None, meta=True, **kw):
  """Shards of ``rows`` rows through code_shards.write_shard; ``skipped``: {shard: dataset positions left out}."""
  root.mkdir()
  rng = np.random.default_rng(1)
  skipped = skipped or {}
  shards, start = [], 0
  for s, n in enumerate(rows):
    a = _arrays(rng, n, start, **kw)
    shards.append(a)
    if s in skipped:
      (root / code_shards.skipped_name(s, len(rows))).write_text(json.dumps(
          {"rows": n, "skipped": [{"index": i, "error": "broken"} for i in skipped[s]]}))
    code_shards.write_shard(root, s, len(rows), a)
    start += n
  if meta:
    (root / "meta.json").write_text(json.dumps({
        "shard_size": shard_size, "examples": shard_size * (len(rows) - 1) + rows[-1], "shards": len(rows),
        "num_classes": 9, "index_sizes": [17, 17], "image_size": 48}))
  want = {k: np.concatenate([a[k] for a in shards]) for k in shards[0]}
  return root, want


def _assert_reads(src, want, order):
  for i in order:
    ex = src[int(i)]
    assert sorted(ex) == sorted(src.keys + ("label",))
    for k in src.keys:
      assert ex[k].dtype == want[k].dtype and ex[k].flags.writeable and ex[k].flags.c_contiguous
      np.testing.assert_array_equal(ex[k], want[k][i])
    assert ex["label"].dtype == np.int32 and ex["label"] == want["labels"][i]


@pytest.mark.parametrize("local", [True, False], ids=["memmap", "seek"])
def test_random_reads_equal_the_written_arrays_with_skips_flips_and_index_groups(tmp_path, monkeypatch, local):
  if not local:  # the path taken for gs:// and other non-local file systems, here on local files
    monkeypatch.setattr(code_shards, "is_local", lambda path: False)
  root, want = _write(tmp_path / "codes", rows=(5, 5, 3, 5, 2), skipped={2: [11, 13]})
  (root / (code_shards.shard_name(1, 5) + ".tmp")).write_bytes(b"half a shard")  # of a killed writer: ignored
  src = CodeShardSource(root, cache_shards=2)  # fewer open shards than shards: evictions on the way
  assert len(src) == 20 and src.examples == 22 and src.skipped_positions == [11, 13]
  assert src.keys == code_shards.ARRAY_KEYS and src.codes_shape == (3, 3, 4) and src.index_shape == (3, 3, 2)
  assert src.index_sizes == (17, 17) and src.num_classes == 9 and src.image_size == 48
  np.testing.assert_array_equal(want["index"][10:13], [10, 11, 12])  # the positions as written (skips are the meta's)
  order = np.random.default_rng(0).permutation(len(src))
  _assert_reads(src, want, order)
  _assert_reads(src, want, [-1, -20])
  assert len(src._open_shards) == 2
  with concurrent.futures.ThreadPoolExecutor(4) as pool:  # threads share the open shards
    list(pool.map(lambda i: _assert_reads(src, want, [i]), np.tile(order, 3)))
  with pytest.raises(IndexError):
    src[20]


def test_the_source_pickles_small_without_open_shards_and_reads_the_same_rows(tmp_path):
  root, want = _write(tmp_path / "codes")
  src = CodeShardSource(str(root))
  _assert_reads(src, want, range(len(src)))  # every shard open
  data = pickle.dumps(src)
  assert len(data) < 4096 and b"memmap" not in data
  again = pickle.loads(data)
  assert not again._open_shards and len(again) == len(src)
  _assert_reads(again, want, np.random.default_rng(2).permutation(len(src)))
  src._lock.acquire()  # as a parent's reader thread may hold it when the process forks
  src._pid = -1  # what a forked child sees: another process id
  _assert_reads(src, want, [3, 17])  # the child starts over with its own lock and shards
  assert src._pid == os.getpid() and len(src._open_shards) == 2


@pytest.mark.parametrize("local", [True, False], ids=["memmap", "seek"])
def test_shards_without_flips_or_meta_json(tmp_path, monkeypatch, local):
  if not local:
    monkeypatch.setattr(code_shards, "is_local", lambda path: False)
  root, want = _write(tmp_path / "codes", rows=(4, 4, 1), meta=False, flip=False, groups=1)
  src = CodeShardSource(root)
  assert len(src) == 9 and src.keys == ("codes", "indices") and src.index_sizes is None
  assert src.num_classes == want["labels"].max() + 1
  _assert_reads(src, want, range(9))


def test_a_shard_that_is_not_a_code_shard_or_unreadable_or_of_other_arrays_is_an_error_naming_it(tmp_path):
  root, _ = _write(tmp_path / "codes")
  np.save(root / "shard-00001-of-00005.npy", np.zeros((5, 3), np.float32))
  src = CodeShardSource(root)
  with pytest.raises(sources.DataError, match="shard-00001-of-00005.npy has no codes/labels arrays"):
    src[5]
  (root / "shard-00001-of-00005.npy").write_bytes(b"not an array")
  with pytest.raises(sources.DataError, match="shard-00001-of-00005.npy cannot be read.*rerun the extraction"):
    src[6]
  a = _arrays(np.random.default_rng(0), 5, 5, groups=3)  # index groups of another tokenizer
  code_shards.write_shard(root, 1, 5, a)
  with pytest.raises(sources.DataError, match="shard-00001-of-00005.npy holds records.*inconsistent"):
    src[7]
  with pytest.raises(ValueError, match="differ in length"):
    code_shards.write_shard(root, 1, 5, {**a, "labels": a["labels"][:2]})


# ------------------------------------------------------------ shards of the older .npz layout


def _as_npz(src_dir, dst):
  """An extraction's directory as older versions wrote it: one .npz per shard, side files as they are."""
  dst.mkdir()
  for p in sorted(src_dir.iterdir()):
    if p.suffix == ".npy":
      rec = np.load(p)
      np.savez(dst / (p.stem + ".npz"), **{k: rec[k] for k in rec.dtype.names})
    else:
      shutil.copy(p, dst / p.name)
  return dst


def test_npz_shards_are_refused_with_the_command_that_converts_them(extracted, tmp_path):
  _, _, out, _ = extracted
  old = _as_npz(out, tmp_path / "old")
  with pytest.raises(sources.DataError, match=r"older \.npz layout \(shard-00000-of-00004\.npz and 3 more\).*"
                     rf"convert them once, in place, with: python -m ifsq_jax\.tools\.extract --convert {old} "):
    CodeShardSource(str(old))


def test_converting_npz_shards_in_place_gives_the_same_examples_and_resumes_after_an_interruption(
    extracted, tmp_path, monkeypatch, capsys):
  _, _, out, _ = extracted
  ref = CodeShardSource(str(out))
  old = _as_npz(out, tmp_path / "old")
  write, calls = code_shards._write_npy, []

  def interrupted(path, array):  # the third shard's write dies half way, as a killed process would
    calls.append(path.name)
    if len(calls) == 3:
      (path.parent / (path.name + ".tmp")).write_bytes(b"half a shard")
      raise KeyboardInterrupt
    write(path, array)

  monkeypatch.setattr(code_shards, "_write_npy", interrupted)
  with pytest.raises(KeyboardInterrupt):
    code_shards.convert_npz(old)
  monkeypatch.setattr(code_shards, "_write_npy", write)
  names = sorted(os.listdir(old))
  assert "shard-00000-of-00004.npy" in names and "shard-00000-of-00004.npz" not in names
  assert "shard-00002-of-00004.npz" in names and "shard-00002-of-00004.npy" not in names  # kept: its .npy is not whole
  assert "shard-00003-of-00004.npz" in names
  with pytest.raises(sources.DataError, match="shard-00002-of-00004.npz and 1 more.*--convert"):
    CodeShardSource(str(old))
  # A crash between the rename and the removal: the .npy is whole, the .npz is dropped on the next run.
  np.savez(old / "shard-00000-of-00004.npz", labels=np.zeros(1))  # whatever it holds: the .npy is the shard
  stamp = os.path.getmtime(old / "shard-00000-of-00004.npy")
  assert extract.main(["--convert", str(old)]) == 0
  assert "Converted 2 shards" in capsys.readouterr().out
  assert os.path.getmtime(old / "shard-00000-of-00004.npy") == stamp
  assert sorted(os.listdir(old)) == sorted(os.listdir(out))  # the half-written temporary file was written over
  src = CodeShardSource(str(old))
  assert len(src) == len(ref) == 12 and src.skipped_positions == [10] and src.num_classes == 2
  for i in range(len(src)):
    a, b = src[i], ref[i]
    assert sorted(a) == sorted(b)
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  for name in os.listdir(out):
    if name.endswith(".npy"):
      np.testing.assert_array_equal(np.load(old / name), np.load(out / name))
  assert extract.main(["--convert", str(old)]) == 0 and "Converted 0 shards" in capsys.readouterr().out


def test_converting_a_broken_npz_shard_is_an_error_naming_it(tmp_path, capsys):
  (tmp_path / "shard-00000-of-00001.npz").write_bytes(b"truncated")
  assert extract.main(["--convert", str(tmp_path)]) == 1
  err = capsys.readouterr().err
  assert "shard-00000-of-00001.npz cannot be read" in err and (tmp_path / "shard-00000-of-00001.npz").exists()
  assert extract.main(["--convert", str(tmp_path / "nowhere")]) == 1


def test_extraction_resumed_into_npz_shards_converts_them_and_writes_the_missing_ones(extracted, tmp_path):
  tok_dir, root, out, _ = extracted
  old = _as_npz(out, tmp_path / "old")
  os.remove(old / "shard-00001-of-00004.npz")
  written = extract.extract(tok_dir, str(old), _data_config(root), "train", image_size=16, shard_size=4, batch=3)
  assert [os.path.basename(p) for p in written] == ["shard-00001-of-00004.npy"]
  assert not [p for p in os.listdir(old) if p.endswith(".npz")]
  for name in os.listdir(out):
    if name.endswith(".npy"):
      np.testing.assert_array_equal(np.load(old / name), np.load(out / name))

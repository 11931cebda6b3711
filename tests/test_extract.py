"""Extraction: .npy record shards equal the tokenizer's encode on the same images, flips included, and resume."""

import dataclasses
import json
import os
import socket
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np

import ifsq_jax
from ifsq_jax.convert import torch_io
from ifsq_jax.data import sources, transforms
from ifsq_jax.models.tokenizer import Tokenizer, TokenizerConfig


def _tokenizer_dir(path):
  cfg = TokenizerConfig(hidden_size=32, hidden_size_mult=(1, 1), num_res_blocks=1, downsample=(True, False),
                        upsample=(False, True), resolution=16, levels=(5, 5, 5, 5))
  params = Tokenizer(cfg).init(jax.random.key(0), np.zeros((1, 16, 16, 3), np.float32))["params"]
  params = nn.meta.unbox(params)  # plain arrays (init gives them logical axis names)
  params = jax.tree.map(lambda p: np.asarray(p) * 3.0, params)  # spread the latent over the levels
  torch_io.save_converted(str(path), params, {"kind": "tokenizer", "model": dataclasses.asdict(cfg)})
  return str(path)


def test_extract_matches_encode_with_flips_and_resumes(tmp_path):
  tok_dir = _tokenizer_dir(tmp_path / "tok")
  out = tmp_path / "codes"
  cmd = [sys.executable, "-m", "ifsq_jax.tools.extract", "--tokenizer", tok_dir, "--out", str(out),
         "--split", "validation", "--image_size", "16", "--shard_size", "40", "--batch", "16"]
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  src = sources.EmbeddedSource("validation")
  shards = sorted(p for p in os.listdir(out) if p.startswith("shard-"))
  assert len(shards) == -(-len(src) // 40) and (out / "meta.json").exists()
  assert all(s.endswith(".npy") for s in shards)  # plain .npy record arrays: a row is one contiguous read
  tok = ifsq_jax.load_tokenizer(tok_dir)
  first = np.load(out / shards[0], mmap_mode="r")
  assert first.dtype.names == ("codes", "codes_flip", "indices", "indices_flip", "labels", "index")
  assert first.dtype["codes"] == np.dtype((np.float16, (8, 8, 4))) and first.shape == (40,)
  x = np.stack([transforms.to_float(transforms.center_crop(src[i][0], 16)) for i in range(40)])
  np.testing.assert_array_equal(first["index"], np.arange(40))
  np.testing.assert_array_equal(first["labels"], src.labels[:40])
  np.testing.assert_array_equal(first["codes"].astype(np.float32), np.asarray(tok.encode(x)))
  np.testing.assert_array_equal(first["indices"], np.asarray(tok.encode_to_indices(x)))
  np.testing.assert_array_equal(first["indices_flip"], np.asarray(tok.encode_to_indices(x[:, :, ::-1])))
  assert len(np.unique(first["indices"])) > 10
  # Resume: only the missing shard is written again.
  stamp = {s: os.path.getmtime(out / s) for s in shards}
  os.remove(out / shards[1])
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0 and "Wrote 1 shards" in proc.stdout
  for s in shards:
    if s != shards[1]:
      assert os.path.getmtime(out / s) == stamp[s]
  np.testing.assert_array_equal(np.load(out / shards[1])["index"], np.arange(40, 80))


def test_two_processes_split_the_shards_and_write_what_one_process_writes(tmp_path):
  tok_dir = _tokenizer_dir(tmp_path / "tok")
  base = [sys.executable, "-m", "ifsq_jax.tools.extract", "--tokenizer", tok_dir, "--split", "validation",
          "--image_size", "16", "--shard_size", "20", "--batch", "20", "--no_flip"]
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  procs = [subprocess.Popen(base + ["--out", str(tmp_path / "two"), f"--coordinator_address=127.0.0.1:{port}",
                                    "--num_processes=2", f"--process_id={i}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = []
  for p in procs:
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    outs.append(out)
  assert "Wrote 3 shards" in outs[0] and "Wrote 2 shards" in outs[1]  # 82 images: shards 0, 2, 4 and 1, 3
  proc = subprocess.run(base + ["--out", str(tmp_path / "one")], capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  names = sorted(p for p in os.listdir(tmp_path / "one") if p.startswith("shard-"))
  assert names == sorted(p for p in os.listdir(tmp_path / "two") if p.startswith("shard-")) and len(names) == 5
  for name in names:
    one, two = np.load(tmp_path / "one" / name), np.load(tmp_path / "two" / name)
    assert one.dtype == two.dtype and one.dtype.names == ("codes", "indices", "labels", "index")  # --no_flip
    np.testing.assert_array_equal(one, two)


def test_extract_skips_an_undecodable_image_and_reports_it(tmp_path):
  from test_code_shards import image_folder  # pylint: disable=g-import-not-at-top
  tok_dir = _tokenizer_dir(tmp_path / "tok")
  root = image_folder(tmp_path / "images")
  out = tmp_path / "codes"
  proc = subprocess.run([sys.executable, "-m", "ifsq_jax.tools.extract", "--tokenizer", tok_dir, "--out", str(out),
                         "--data", "image_folder", "--path", str(root), "--image_size", "16", "--shard_size", "8"],
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Wrote 2 shards" in proc.stdout and "skipped 1 undecodable images" in proc.stdout
  assert "03_broken.jpg" in proc.stderr
  first, second = np.load(out / "shard-00000-of-00002.npy"), np.load(out / "shard-00001-of-00002.npy")
  assert len(first["labels"]) == 8 and list(second["index"]) == [8, 9, 11, 12]
  meta = json.loads((out / "meta.json").read_text())
  assert meta["num_classes"] == 2 and meta["index_sizes"] == [625] and meta["codes_shape"] == [8, 8, 4]

"""``python -m ifsq_jax.tools.sample``: shards, resume, two processes, packing for ADM's evaluator."""

import dataclasses
import os
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest
from conftest import REPO, subprocess_env

from ifsq_jax.convert import torch_io
from ifsq_jax.models import dit as dit_lib
from ifsq_jax.models import llamagen as llamagen_lib
from ifsq_jax.models.tokenizer import Tokenizer, TokenizerConfig
from ifsq_jax.tools import sample


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
  """Converted tokenizer (32 px -> 8 x 8 x 4, levels 17, 17, 5, 5), factorized LlamaGen and DiT on it."""
  root = tmp_path_factory.mktemp("models")
  cfg = TokenizerConfig(hidden_size=32, hidden_size_mult=(1, 1, 1), num_res_blocks=1, downsample=(True, True, False),
                        upsample=(False, True, True), resolution=32, levels=(17, 17, 5, 5))
  params = nn.meta.unbox(Tokenizer(cfg).init(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32))["params"])
  torch_io.save_converted(str(root / "tok"), jax.tree.map(lambda p: np.asarray(p) * 2, params),
                          {"kind": "tokenizer", "model": dataclasses.asdict(cfg)})
  fields = llamagen_lib.llamagen_config("S", depth=2, hidden_size=32, num_heads=2, grid_size=8, num_classes=5,
                                        vocab_sizes=(289, 25), z_dim=0)
  module = llamagen_lib.LlamaGen(**fields)
  params = nn.meta.unbox(module.init(jax.random.key(1), *llamagen_lib.example_inputs(module))["params"])
  params = jax.tree.map(lambda p: np.asarray(p) + 0.05 * np.random.default_rng(0).standard_normal(p.shape), params)
  torch_io.save_converted(str(root / "llamagen"), params, {"kind": "llamagen", "model": fields, "weights": "ema"})
  fields = dit_lib.dit_config("S", 1, depth=1, hidden_size=32, num_heads=2, input_size=8, num_classes=5, z_dim=0)
  fields.pop("dtype", None)
  module = dit_lib.DiT(**fields)
  x = np.zeros((1, 8, 8, 4), np.float32)
  params = nn.meta.unbox(module.init(jax.random.key(2), x, np.zeros((1,)), np.zeros((1,), np.int32))["params"])
  params = jax.tree.map(lambda p: np.asarray(p) + 0.02, params)
  torch_io.save_converted(str(root / "dit"), params, {"kind": "dit", "model": fields, "weights": "ema"})
  return root


def _args(model, out, tok, *extra):
  return ["--model", str(model), "--out", str(out), "--tokenizer", str(tok), "--num", "20", "--shard_size", "8",
          "--batch", "4", *extra]


def _packed(out):
  with np.load(out / "samples_20x32x32x3.npz") as d:
    return d["arr_0"], d["arr_1"]


def test_llamagen_resume_after_a_kill_writes_what_one_run_writes(dirs, tmp_path):
  args = ("--group_sizes", "2,2", "--top_k", "50")
  assert sample.main(_args(dirs / "llamagen", tmp_path / "full", dirs / "tok", *args)) == 0
  images, labels = _packed(tmp_path / "full")
  assert images.shape == (20, 32, 32, 3) and images.dtype == np.uint8
  np.testing.assert_array_equal(np.bincount(labels, minlength=5), [4] * 5)  # class-balanced
  assert len({im.tobytes() for im in images}) == 20  # no two samples alike
  # Killed after one shard; the finished shard is not rewritten on resume.
  part = tmp_path / "part"
  assert sample.main(_args(dirs / "llamagen", part, dirs / "tok", *args, "--max_shards", "1")) == 0
  assert sorted(p for p in os.listdir(part) if p.startswith("shard")) == ["shard-00000-of-00003.npz"]
  first = part / "shard-00000-of-00003.npz"
  os.utime(first, (1, 1))
  assert sample.main(_args(dirs / "llamagen", part, dirs / "tok", *args)) == 0
  assert os.stat(first).st_mtime == 1
  for name in ("samples_20x32x32x3.npz", "shard-00001-of-00003.npz", "shard-00002-of-00003.npz"):
    assert (part / name).read_bytes() == (tmp_path / "full" / name).read_bytes(), name
  # Other settings into the same directory are refused.
  with pytest.raises(SystemExit):
    sample.main(_args(dirs / "llamagen", part, dirs / "tok", "--group_sizes", "2,2", "--top_k", "10"))


def test_two_processes_split_the_shards_and_match_one(dirs, tmp_path):
  args = _args(dirs / "dit", tmp_path / "two", dirs / "tok", "--latent_scale", "1.5", "--steps", "3", "--mode", "sde")
  env = {**subprocess_env(8), "PYTHONPATH": str(REPO)}  # the batch layout of this process's 8 devices
  procs = [subprocess.Popen([sys.executable, "-m", "ifsq_jax.tools.sample", *args, "--num_processes", "2",
                             "--process_id", str(p)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
           for p in (1, 0)]
  for p in procs:
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out.decode()[-3000:]
  two, labels_two = _packed(tmp_path / "two")
  assert sample.main(_args(dirs / "dit", tmp_path / "one", dirs / "tok", "--latent_scale", "1.5", "--steps", "3",
                           "--mode", "sde")) == 0
  one, labels_one = _packed(tmp_path / "one")
  np.testing.assert_array_equal(labels_two, labels_one)
  np.testing.assert_array_equal(two, one)
  assert len({im.tobytes() for im in two}) == 20


def test_bad_input_is_refused_with_the_reason(dirs, tmp_path, capsys):
  with pytest.raises(SystemExit):
    sample.main(_args(dirs / "dit", tmp_path / "a", dirs / "tok"))
  assert "--latent_scale" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    sample.main(_args(dirs / "llamagen", tmp_path / "b", dirs / "tok"))
  assert "--group_sizes" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    sample.main(_args(dirs / "llamagen", tmp_path / "c", dirs / "tok", "--process_id", "2", "--num_processes", "2"))
  assert "--process_id=2 must be in [0, 2)" in capsys.readouterr().err
  assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "c")


def test_labels():
  b = sample.make_labels(1000, 10, 3)
  np.testing.assert_array_equal(np.bincount(b), [100] * 10)
  assert not np.array_equal(b, sample.make_labels(1000, 10, 4))
  u = sample.make_labels(1000, 10, 3, "uniform")
  assert u.min() >= 0 and u.max() < 10 and not np.array_equal(np.bincount(u), [100] * 10)

"""Every path may be ``gs://``: training, loading, the sampling / FID / evaluation tools and converted weights.

Against a local GCS emulator (``gcs_emulator.py``); each test writes into its own bucket. TensorBoard event files
are not written under the emulator (TensorFlow's GCS filesystem does not honour ``STORAGE_EMULATOR_HOST``).
"""
# pylint: disable=redefined-outer-name  (pytest fixtures)

import dataclasses
import io
import json
import pathlib
import signal
import subprocess
import sys
import time

import flax.linen as nn
import jax
import numpy as np
import pytest
import torch
from PIL import Image
from etils import epath
from safetensors.torch import save as save_safetensors
from transformers import Dinov2Config, Dinov2Model

from conftest import REPO, subprocess_env
from gcs_emulator import create_bucket, gcs_bucket, gcs_emulator  # noqa: F401  pylint: disable=unused-import

import ifsq_jax
from ifsq_jax import paths, shapes_only
from ifsq_jax.convert import __main__ as convert_cli
from ifsq_jax.convert import dinov2 as dinov2_convert
from ifsq_jax.convert import torch_io
from ifsq_jax.eval import fid as fid_lib
from ifsq_jax.models import dit as dit_lib
from ifsq_jax.models.tokenizer import Tokenizer, TokenizerConfig
from ifsq_jax.nets import repa
from ifsq_jax.tools import evaluate, fid, sample

QUICKSTART = REPO / "configs" / "quickstart.py"
# The quickstart at toy size: 16 px, one down / up level, L1 only, no GAN; a checkpoint every 2 steps.
TINY_QUICKSTART = [
    "--config.data.image_size=16", "--config.data.eval_examples=8", "--config.train.global_batch_size=8",
    "--config.train.num_steps=4", "--config.train.log_every=1", "--config.checkpoint.every=2",
    "--config.model.hidden_size=32", "--config.model.hidden_size_mult=(1,1)", "--config.model.num_res_blocks=1",
    "--config.model.downsample=(True,False)", "--config.model.upsample=(False,True)",
    "--config.model.levels=(5,5,5,5)", "--config.loss.disc_start=1000",
]


def _train_command(workdir):
  return [sys.executable, "-m", "ifsq_jax.main", f"--config={QUICKSTART}", f"--workdir={workdir}", *TINY_QUICKSTART]


def _metrics(workdir):
  """metrics.jsonl (local or gs://) as {step: record} for the training records."""
  records = [json.loads(line) for line in (epath.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: r for r in records if "loss" in r}


def _without_timings(record):
  return {k: v for k, v in record.items() if not k.startswith("perf/") and not k.endswith("_per_sec")}


def _finalized_steps(workdir):
  """Checkpoint steps whose save completed: in a bucket Orbax writes commit_success.txt into a step last."""
  d = epath.Path(workdir) / "checkpoints"
  if not d.exists():
    return []
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit() and (p / "commit_success.txt").exists())


@pytest.fixture(scope="module")
def tokenizer_runs(gcs_emulator, tmp_path_factory):
  """A tiny quickstart run in a bucket, SIGKILLed after its first checkpoint and resumed; an uninterrupted local run.

  Returns:
    (gs:// work dir, local reference work dir, the step the killed run had saved last, the resumed run's log).
  """
  create_bucket(gcs_emulator, "tokenizer-runs")
  work = "gs://tokenizer-runs/quickstart"
  ref = tmp_path_factory.mktemp("reference")
  logs = tmp_path_factory.mktemp("logs")
  env = subprocess_env()

  procs = []

  def start(workdir, name):  # output to a file: a pipe read only at the end could fill and stall the run
    with open(logs / name, "w") as log:
      procs.append(subprocess.Popen(_train_command(workdir), env=env, stdout=log, stderr=subprocess.STDOUT))
    return procs[-1]

  def finish(proc, name):
    proc.wait(timeout=300)
    text = (logs / name).read_text()
    assert proc.returncode == 0, text[-3000:]
    return text

  try:
    # The uninterrupted run goes alongside the others: their start-up (imports, compiling) overlaps.
    reference, killed = start(ref, "reference.log"), start(work, "killed.log")
    begin = time.time()
    while not _finalized_steps(work):
      if killed.poll() is not None:
        raise AssertionError(f"the run ended (rc {killed.returncode}) before its first checkpoint:\n"
                             f"{(logs / 'killed.log').read_text()[-3000:]}")
      assert time.time() - begin < 240, "no checkpoint within 240 s"
      time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    killed_at = max(_finalized_steps(work))
    resumed = start(work, "resumed.log")
    finish(reference, "reference.log")
    return work, ref, killed_at, finish(resumed, "resumed.log")
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_a_run_in_a_bucket_killed_after_a_checkpoint_resumes_with_identical_losses(tokenizer_runs):
  work, ref, killed_at, log = tokenizer_runs
  assert killed_at < 4, "the run finished before it was killed"
  assert f"Resumed from step {killed_at}" in log
  assert "No TensorBoard event files" in log  # under the emulator, and said so
  a, b = _metrics(ref), _metrics(work)
  assert sorted(a) == sorted(b) == list(range(1, 5))
  for step in range(1, 5):  # bitwise on CPU (timings aside), before the kill and after the resume
    assert "gen/grad_norm" in a[step]
    assert _without_timings(a[step]) == _without_timings(b[step]), step
  listing = sorted(p.name for p in (epath.Path(work) / "checkpoints").iterdir())
  assert _finalized_steps(work) == [2, 4], listing
  root = epath.Path(work)
  assert json.loads((root / "eval.json").read_text())["step"] == 4
  assert (root / "config.json").exists() and list((root / "images").iterdir())


def test_load_tokenizer_from_a_bucket_encodes_as_the_local_run(tokenizer_runs):
  work, ref, _, _ = tokenizer_runs
  x = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  remote, local = ifsq_jax.load_tokenizer(work), ifsq_jax.load_tokenizer(str(ref))
  assert remote.config == local.config
  np.testing.assert_array_equal(np.asarray(remote.encode(x)), np.asarray(local.encode(x)))
  np.testing.assert_array_equal(np.asarray(remote.encode_to_indices(x)), np.asarray(local.encode_to_indices(x)))


def test_evaluate_tool_reads_and_writes_a_bucket(tokenizer_runs):
  work, _, _, _ = tokenizer_runs
  assert evaluate.main(["--tokenizer", work, "--max_examples", "8", "--batch", "8"]) == 0
  result = json.loads((epath.Path(work) / "eval_validation.json").read_text())
  assert result["images"] == 8 and result["tokenizer"] == work and np.isfinite(result["psnr"])


def _tiny_tokenizer_and_dit(root):
  """A converted tokenizer (32 px -> 8 x 8 x 4) and a converted DiT on its codes, written under ``root``."""
  cfg = TokenizerConfig(hidden_size=32, hidden_size_mult=(1, 1, 1), num_res_blocks=1, downsample=(True, True, False),
                        upsample=(False, True, True), resolution=32, levels=(17, 17, 5, 5))
  params = nn.meta.unbox(Tokenizer(cfg).init(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32))["params"])
  torch_io.save_converted(root / "tok", jax.tree.map(lambda p: np.asarray(p) * 2, params),
                          {"kind": "tokenizer", "model": dataclasses.asdict(cfg)})
  fields = dit_lib.dit_config("S", 1, depth=1, hidden_size=32, num_heads=2, input_size=8, num_classes=5, z_dim=0)
  fields.pop("dtype", None)
  module = dit_lib.DiT(**fields)
  x = np.zeros((1, 8, 8, 4), np.float32)
  params = nn.meta.unbox(module.init(jax.random.key(2), x, np.zeros((1,)), np.zeros((1,), np.int32))["params"])
  torch_io.save_converted(root / "dit", jax.tree.map(lambda p: np.asarray(p) + 0.02, params),
                          {"kind": "dit", "model": fields, "weights": "ema"})


def test_sample_tool_writes_a_bucket_and_fid_tool_reads_it_back(gcs_bucket, tmp_path):
  bucket = epath.Path(gcs_bucket)
  _tiny_tokenizer_and_dit(bucket)
  module, params = ifsq_jax.load_model(str(bucket / "dit"))  # a converted directory in a bucket
  assert module.input_size == 8 and jax.tree.leaves(params)

  def run(out, *extra):
    return sample.main(["--model", str(bucket / "dit"), "--tokenizer", str(bucket / "tok"), "--out", str(out),
                        "--latent_scale", "1.5", "--steps", "2", "--num", "10", "--shard_size", "8", "--batch", "4",
                        *extra])

  out = bucket / "samples"
  assert run(out, "--png", "--max_shards", "1") == 0  # stopped after one shard, as a killed run
  assert sorted(p.name for p in out.iterdir()) == ["meta.json", "png", "shard-00000-of-00002.npz"]
  assert run(out, "--png") == 0  # resumed: the second shard, then the packed batch
  assert run(tmp_path / "local") == 0
  names = ["samples_10x32x32x3.npz", "shard-00000-of-00002.npz", "shard-00001-of-00002.npz"]
  with (out / names[0]).open("rb") as f, np.load(f) as remote, np.load(tmp_path / "local" / names[0]) as local:
    np.testing.assert_array_equal(remote["arr_0"], local["arr_0"])
    np.testing.assert_array_equal(remote["arr_1"], local["arr_1"])
  assert sorted(p.name for p in out.iterdir()) == sorted(["meta.json", "png", *names])  # no temporary files left
  assert len(list((out / "png").iterdir())) == 10
  assert json.loads((out / "meta.json").read_text())["model"] == str(bucket / "dit")

  # tools.fid reads the batch back from the bucket, caches the reference's features beside it, writes its JSON there.
  ref = bucket / "ref" / "ref.npz"
  paths.write_bytes(ref, (tmp_path / "local" / names[0]).read_bytes())
  metrics = bucket / "metrics.json"
  assert fid.main([str(out / names[0]), "--ref", str(ref), "--batch", "5", "--out", str(metrics)]) == 0
  m = json.loads(metrics.read_text())
  assert m["samples"] == 10 and abs(m["fd_vgg16"]) < 1e-6  # the same images
  assert [p.name.split("-")[0] for p in (bucket / "ref").iterdir()] == ["ref.npz", "ref.vgg16"]


def _tiny_dinov2_state_dict():
  torch.manual_seed(0)
  cfg = Dinov2Config(hidden_size=64, num_hidden_layers=1, num_attention_heads=1, intermediate_size=128, image_size=28,
                     patch_size=14)
  return Dinov2Model(cfg).eval().state_dict()


def test_converter_and_repa_target_read_and_write_a_bucket(gcs_bucket):
  bucket = epath.Path(gcs_bucket)
  sd = _tiny_dinov2_state_dict()
  buffer = io.BytesIO()
  torch.save(sd, buffer)  # a torch hub-style .pth, read through torch.load of a file object
  paths.write_bytes(bucket / "in" / "dinov2.pth", buffer.getvalue())
  paths.write_bytes(bucket / "in" / "dinov2.safetensors", save_safetensors({k: v.contiguous() for k, v in sd.items()}))
  for name in ("dinov2.pth", "dinov2.safetensors"):
    out = bucket / name.split(".")[1]
    assert convert_cli.main(["dinov2", "--checkpoint", str(bucket / "in" / name), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "params.safetensors"]
  params, cfg = dinov2_convert.convert({k: v.numpy() for k, v in sd.items()})
  assert cfg.width == 64
  for out in (bucket / "pth", bucket / "safetensors"):
    _, remote = dinov2_convert.load(out)
    jax.tree.map(np.testing.assert_array_equal, remote, params)
  # repa.path in a bucket: the weights, the feature width, and the shapes-only architecture.
  target = repa.load_target("dinov2", str(bucket / "pth"))
  assert target.dim == repa.target_dim("dinov2", str(bucket / "pth")) == 64
  jax.tree.map(np.testing.assert_array_equal, target.params, params)
  with shapes_only.enabled():
    assert repa.load_target("dinov2", str(bucket / "pth")).dim == 64
  with pytest.raises(ValueError, match="holds no converted DINOv2"):
    repa.target_dim("dinov2", str(bucket / "nothing"))


def test_atomic_writes_appends_and_statistics_in_a_bucket(gcs_bucket):
  path = epath.Path(gcs_bucket) / "d" / "file.bin"
  paths.write_bytes(path, b"old")
  with pytest.raises(RuntimeError):
    with paths.atomic_open(path) as f:
      f.write(b"partial")
      raise RuntimeError("interrupted")
  assert path.read_bytes() == b"old" and [p.name for p in path.parent.iterdir()] == ["file.bin"]
  paths.append_text(path.parent / "log.txt", "a\n")
  paths.append_text(path.parent / "log.txt", "b\n")
  assert (path.parent / "log.txt").read_text() == "a\nb\n"
  stats = fid_lib.FeatureStats(3)
  stats.update(np.random.default_rng(0).standard_normal((5, 3)))
  stats.save(gcs_bucket + "/stats")  # .npz appended, as np.savez does
  mu, sigma = fid_lib.load_stats(gcs_bucket + "/stats.npz")
  np.testing.assert_array_equal(mu, stats.mu)
  np.testing.assert_array_equal(sigma, stats.sigma)
  assert str(paths.absolute(gcs_bucket + "/x")) == gcs_bucket + "/x"
  assert paths.absolute("x") == epath.Path(pathlib.Path("x").absolute())


def test_npz_and_zip_stream_into_tensorflows_gfile(tmp_path):
  """atomic_open's file in a bucket cannot seek, so np.savez streams into TensorFlow's GFile.

  With TensorFlow installed, epath opens gs:// files as GFiles, whose seek in write mode raises a TensorFlow error
  that zipfile does not expect. Shown on a local GFile (its write-mode seek is the same on every filesystem).
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  path = str(tmp_path / "a.npz")
  with tf.io.gfile.GFile(path, "wb") as f:
    with pytest.raises(tf.errors.OpError):
      np.savez(f, a=np.arange(3))
  with tf.io.gfile.GFile(path, "wb") as f:
    stream = paths._Stream(f)  # pylint: disable=protected-access
    np.savez(stream, a=np.arange(3), b=np.ones((2, 2), np.float32))
    stream.close()
  with tf.io.gfile.GFile(path, "rb") as f, np.load(f) as z:  # and np.load reads a GFile
    np.testing.assert_array_equal(z["a"], np.arange(3))
    assert z["b"].shape == (2, 2)


def _dit_config(tokenizer, **overrides):
  """A DiT of two tiny blocks on the 8 x 8 x 4 codes of ``_tiny_tokenizer_and_dit``'s tokenizer (32 px)."""
  from conftest import apply_overrides  # pylint: disable=g-import-not-at-top
  from ifsq_jax.train import dit  # pylint: disable=g-import-not-at-top
  c = dit.default_config()
  c.tokenizer = tokenizer
  c.data.image_size = 32
  c.data.transform = "resize_crop_flip"
  c.data.eval_examples = 4
  c.model = dit.model_fields("S", 1, depth=2, hidden_size=32, num_heads=2, input_size=8, num_classes=2,
                             encoder_depth=1, projector_dim=32)
  dit.set_repa(c, "none")
  c.train.compute_dtype = "float32"
  c.train.global_batch_size = 8
  c.train.num_steps = 2
  c.train.log_every = 1
  c.checkpoint.every = 2
  c.checkpoint.async_save = False
  c.latent.scale_batches = 1
  c.sample.num_steps = 1
  c.sample.batch_size = 8
  c.eval.num_samples = 8
  c.eval.grid_classes = c.eval.grid_per_class = 2
  return apply_overrides(c, overrides)


def test_dit_reads_its_tokenizer_repa_weights_images_and_code_shards_from_a_bucket(gcs_bucket, tmp_path):
  from ifsq_jax.data import code_shards, sources  # pylint: disable=g-import-not-at-top
  from ifsq_jax.tools import extract  # pylint: disable=g-import-not-at-top
  from ifsq_jax.train import dit  # pylint: disable=g-import-not-at-top
  bucket = epath.Path(gcs_bucket)
  _tiny_tokenizer_and_dit(bucket)
  rng = np.random.default_rng(0)
  for i in range(24):  # an image folder in the bucket: two classes of JPEGs
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(buffer, format="JPEG", quality=90)
    paths.write_bytes(bucket / "imgs" / f"c{i % 2}" / f"{i:02d}.jpg", buffer.getvalue())
  folder = sources.ImageFolderSource(str(bucket / "imgs"), "train")
  assert len(folder) == 22 and folder.classes == ["c0", "c1"] and folder[0][0].shape == (40, 48, 3)

  # Codes extracted from the bucket's images into the bucket, read back one record at a time.
  assert extract.main(["--tokenizer", str(bucket / "tok"), "--out", str(bucket / "codes"), "--data", "image_folder",
                       "--path", str(bucket / "imgs"), "--image_size", "32", "--shard_size", "8", "--batch", "8"]) == 0
  codes = code_shards.CodeShardSource(str(bucket / "codes"))
  assert len(codes) == 22 and codes.codes_shape == (8, 8, 4)
  tok = ifsq_jax.load_tokenizer(str(bucket / "tok"))
  from ifsq_jax.data import transforms  # pylint: disable=g-import-not-at-top
  np.testing.assert_array_equal(codes[5]["codes"].astype(np.float32),
                                np.asarray(tok.encode(transforms.to_float(transforms.center_crop(folder[5][0], 32))[None])[0]))

  # DiT on the bucket's code shards, and on its images with REPA weights from the bucket (read in a worker process).
  dit.train_and_evaluate(_dit_config(str(bucket / "tok"), **{"data.codes_dir": str(bucket / "codes")}),
                         str(tmp_path / "codes_run"))
  paths.write_bytes(bucket / "in" / "dinov2.pth", _torch_bytes(_tiny_dinov2_state_dict()))
  assert convert_cli.main(["dinov2", "--checkpoint", str(bucket / "in" / "dinov2.pth"), "--out",
                           str(bucket / "dinov2")]) == 0
  c = _dit_config(str(bucket / "tok"), **{"data.name": "image_folder", "data.path": str(bucket / "imgs"),
                                          "data.workers": 1})
  dit.set_repa(c, "dinov2", str(bucket / "dinov2"))
  dit.train_and_evaluate(c, str(tmp_path / "image_run"))
  for run in ("codes_run", "image_run"):
    m = _metrics(tmp_path / run)
    assert sorted(m) == [1, 2] and all(np.isfinite(r["loss"]) for r in m.values())
  assert "proj" in _metrics(tmp_path / "image_run")[2]


def _torch_bytes(state_dict):
  buffer = io.BytesIO()
  torch.save(state_dict, buffer)
  return buffer.getvalue()

"""Tokenizer evaluation: the sharded, padded, multi-process run equals the metrics computed in one go."""

import dataclasses
import json
import socket
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import ifsq_jax
from conftest import subprocess_env
from ifsq_jax import eval as ev
from ifsq_jax.convert import torch_io
from ifsq_jax.data import sources, transforms
from ifsq_jax.eval import reconstruction
from ifsq_jax.models.tokenizer import Tokenizer, TokenizerConfig
from ifsq_jax.nets import lpips

SIZE = 32


def _tokenizer_dir(path):
  cfg = TokenizerConfig(hidden_size=32, hidden_size_mult=(1, 1), num_res_blocks=1, downsample=(True, False),
                        upsample=(False, True), resolution=SIZE, levels=(5, 5, 5, 5))
  params = Tokenizer(cfg).init(jax.random.key(0), np.zeros((1, SIZE, SIZE, 3), np.float32))["params"]
  params = nn.meta.unbox(params)  # plain arrays (init gives them logical axis names)
  params = jax.tree.map(lambda p: np.asarray(p) * 3.0, params)  # spread the latent over the levels
  torch_io.save_converted(str(path), params, {"kind": "tokenizer", "model": dataclasses.asdict(cfg)})
  return str(path)


def _expected(tok_dir):
  """Every metric computed on the whole split at once, without the evaluator."""
  src = sources.EmbeddedSource("validation")
  x = np.stack([transforms.to_float(transforms.center_crop(src[i][0], SIZE)) for i in range(len(src))])
  tok = ifsq_jax.load_tokenizer(tok_dir)
  recon, out = tok.model.apply(tok.variables, x)
  recon = np.asarray(recon)
  a, b = (x + 1) / 2, (recon + 1) / 2
  real, fake = ev.FeatureStats(512), ev.FeatureStats(512)
  real.update(ev.vgg16_features(x))
  fake.update(ev.vgg16_features(np.clip(recon, -1, 1)))
  alex = lpips.LPIPS("alexnet", spatial=True).apply(lpips.load_params("alexnet"), x, recon)
  idx = np.asarray(out.indices).ravel()
  counts = np.bincount(idx, minlength=625)
  p = counts[counts > 0] / idx.size
  return {"images": len(src), "l1": np.mean(np.abs(x - recon)), "psnr": np.mean(ev.psnr(a, b)),
          "ssim": np.mean(ev.ssim(a, b)), "lpips_alex": np.mean(alex), "fd_vgg16": ev.fd_vgg16(real, fake),
          "codes_used": [len(np.unique(idx))], "code_usage": len(np.unique(idx)) / 625,
          "code_entropy_bits": -np.sum(p * np.log2(p)), "tokens": idx.size}


def _command(tok_dir, out, *flags):
  return [sys.executable, "-m", "ifsq_jax.tools.evaluate", "--tokenizer", tok_dir, "--out", str(out),
          "--split", "validation", "--image_size", str(SIZE), "--batch", "16", *flags]


def _check(result, expected):
  for k, v in expected.items():
    if isinstance(v, list) or k in ("images", "tokens"):
      assert result[k] == v, k
    else:
      np.testing.assert_allclose(result[k], v, rtol=2e-5, err_msg=k)


def test_evaluate_over_devices_with_a_padded_last_batch_matches_one_pass(tmp_path):
  tok_dir = _tokenizer_dir(tmp_path / "tok")
  out = tmp_path / "eval.json"
  proc = subprocess.run(_command(tok_dir, out), capture_output=True, text=True, timeout=300, env=subprocess_env(8))
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(out.read_text())
  assert result["weights"] == "ema" and result["images"] == 82  # 82 images: the last batch of 16 is padded
  _check(result, _expected(tok_dir))
  assert len(result["level_usage"]) == 4 and result["code_usage"] > 0.1
  # A second evaluation keeps the first file.
  proc = subprocess.run(_command(tok_dir, out, "--max_examples", "20"), capture_output=True, text=True, timeout=300,
                        env=subprocess_env(8))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert json.loads(out.read_text())["images"] == 20
  assert json.loads((tmp_path / "eval.json.1").read_text()) == result


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_evaluate_the_same_metrics_as_one(tmp_path):
  tok_dir = _tokenizer_dir(tmp_path / "tok")
  port = _free_port()
  procs = [subprocess.Popen(_command(tok_dir, tmp_path / "two.json", f"--coordinator_address=127.0.0.1:{port}",
                                     "--num_processes=2", f"--process_id={i}"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env(4))
           for i in range(2)]
  for p in procs:
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
  _check(json.loads((tmp_path / "two.json").read_text()), _expected(tok_dir))


class _FakeInception(nn.Module):
  """Any image -> 2048-d feature network stands in for the converted FID Inception."""

  @nn.compact
  def __call__(self, x):
    return nn.Dense(2048)(jnp.mean(x.reshape(x.shape[0], -1, 3), axis=1) * jnp.arange(1.0, 5.0).sum())


def test_rfid_uses_clamped_reconstructions_in_unit_range():
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, (24, SIZE, SIZE, 3)).astype(np.float32)
  recon = (x + rng.normal(0, 0.5, x.shape)).astype(np.float32)
  module = _FakeInception()
  variables = module.init(jax.random.key(0), x[:1])
  metrics = reconstruction.ReconstructionMetrics(inception=(module, variables))
  metrics.update(x[:12], recon[:12])  # one batch shape, one compile
  metrics.update(x[12:], recon[12:], valid=np.arange(12) < 9)
  result = metrics.result()
  feats = lambda v: np.asarray(module.apply(variables, v))
  real = feats((x[:21] + 1) / 2)
  fake = feats(np.clip((recon[:21] + 1) / 2, 0, 1))
  expected = ev.frechet_distance(real.mean(0), np.cov(real, rowvar=False), fake.mean(0), np.cov(fake, rowvar=False))
  assert result["images"] == 21
  np.testing.assert_allclose(result["rfid"], expected, rtol=1e-6)
  np.testing.assert_allclose(result["psnr"], np.mean(ev.psnr((x[:21] + 1) / 2, (recon[:21] + 1) / 2)), rtol=1e-6)
  assert "code_usage" not in result


def test_undecodable_images_are_skipped_counted_and_named(tmp_path, caplog):
  import logging  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  from ifsq_jax.tools import evaluate  # pylint: disable=g-import-not-at-top
  from test_code_shards import image_folder  # pylint: disable=g-import-not-at-top
  tok = ifsq_jax.load_tokenizer(_tokenizer_dir(tmp_path / "tok"))
  root = image_folder(tmp_path / "images", size=SIZE + 8)
  with caplog.at_level(logging.WARNING):
    result = evaluate.evaluate(tok, sources.ImageFolderSource(str(root), "train"), SIZE, batch=8)
  assert result["skipped_images"] == 1 and result["images"] == 12
  assert any("03_broken.jpg" in r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
  os.remove(root / "train" / "b" / "03_broken.jpg")
  clean = evaluate.evaluate(tok, sources.ImageFolderSource(str(root), "train"), SIZE, batch=8)
  assert clean["skipped_images"] == 0
  for k in ("l1", "psnr", "ssim", "lpips_alex", "code_usage"):
    np.testing.assert_allclose(result[k], clean[k], rtol=1e-6, err_msg=k)

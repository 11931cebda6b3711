"""``ifsq_jax.eval`` as the one home of the generative metrics: one Inception Score, weights as program arguments."""

import ast
import pathlib
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ifsq_jax import config_lib
from ifsq_jax.eval import features, fid, generative, reconstruction
from ifsq_jax.nets import inception
from ifsq_jax.tools import fid as tool
from ifsq_jax.train import sample_eval
from test_fid_tool import _random_variables

CLASSES = 48  # the stub's logits: the first 48 pixel values of an image


class _StubExtractor:
  """Features that are plain functions of the pixels, so both paths can be fed the same logits without a network.

  The first 48 uint8 values of each image are its logits (scaled), slices of them its pool, spatial and VGG16
  features; any image size with at least 16 pixels.
  """

  def __init__(self, inception_dir, batch=64, preprocess="adm"):
    del inception_dir
    self.batch, self.preprocess = batch, preprocess
    self.inception_key, self.has_inception, self.has_logits = "stub", True, True

  def __call__(self, images, inception=True):
    x = np.asarray(images, np.float32).reshape(len(images), -1)[:, :CLASSES] / 255.0
    out = {"vgg16": x[:, :4]}
    if inception:
      out.update(pool=x[:, :8], spatial=x[:, 8:12], logits_unbiased=8.0 * x)
    return out


def _samples(n, seed=0):
  """(n, 4, 4, 3) uint8 images whose first 48 values give near-one-hot logits of varied classes."""
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 64, (n, 4, 4, 3), dtype=np.uint8)
  images.reshape(n, -1)[np.arange(n), rng.integers(0, CLASSES, n)] = 255
  return images


def _as_float(images):
  """[-1, 1] floats that ``fid.to_uint8`` maps back to ``images`` exactly."""
  return images.astype(np.float32) / np.float32(127.5) - 1.0


@pytest.mark.parametrize("n", [12_345, 7_501])
def test_tool_and_training_inception_scores_are_one_number_above_5000_samples(n, tmp_path, monkeypatch):
  monkeypatch.setattr(tool, "FeatureExtractor", _StubExtractor)
  monkeypatch.setattr(features, "FeatureExtractor", _StubExtractor)
  images = _samples(n)
  np.savez(tmp_path / "samples.npz", arr_0=images)
  np.savez(tmp_path / "ref.npz", arr_0=_samples(16, seed=1))
  by_tool = tool.evaluate(str(tmp_path / "samples.npz"), str(tmp_path / "ref.npz"), "stub", batch=4096,
                          cache_dir=str(tmp_path / "cache"))["inception_score"]

  c = config_lib.add_image_data(config_lib.base_config())
  c.data.eval_examples = 8
  c.eval = ml_collections.ConfigDict({"inception_path": "stub", "fid_reference": ""})
  assert fid.to_uint8(_as_float(images)).tobytes() == images.tobytes()
  in_training = sample_eval.SampleEvaluator(c, batch=4096).score(_as_float(images))["inception_score"]

  logits = 8.0 * images.reshape(n, -1)[:, :CLASSES].astype(np.float32) / 255.0
  split = generative.inception_score_split(n)
  assert sample_eval.inception_score_split is generative.inception_score_split
  assert by_tool == in_training == generative.inception_score(logits) == generative.inception_score(logits, split)
  # Near-equal splits, not ADM's 5000 + a short remainder, which would give another number.
  assert by_tool != pytest.approx(generative.inception_score(logits, generative.IS_SPLIT), rel=1e-6)
  assert 1.0 < by_tool < CLASSES


def test_default_splits_equal_adm_s_for_multiples_of_5000_and_small_n():
  rng = np.random.default_rng(0)
  for n in (10_000, 4_999, 17):
    logits = rng.normal(0, 3, (n, 10))
    assert generative.inception_score(logits) == generative.inception_score(logits, generative.IS_SPLIT)
  with pytest.raises(ValueError, match="n=0 samples"):
    generative.inception_score_split(0)


def _largest_constant_bytes(lowered) -> int:
  """Bytes of the largest dense constant in a lowered program's StableHLO text (splats count as small)."""
  hexes = re.findall(r'dense<"0x([0-9A-Fa-f]+)">', lowered.as_text())
  return max((len(h) // 2 for h in hexes), default=0)


def _nbytes(tree) -> int:
  return sum(np.asarray(a).nbytes for a in jax.tree.leaves(tree))


def test_the_check_sees_weights_closed_over_as_constants():
  w = np.random.default_rng(0).normal(size=(256, 256)).astype(np.float32)
  x = jnp.zeros((2, 256))
  assert _largest_constant_bytes(jax.jit(lambda x: x @ w).lower(x)) == w.nbytes
  assert _largest_constant_bytes(jax.jit(lambda w, x: x @ w).lower(w, x)) < 1024


def test_vgg16_program_takes_the_weights_as_an_argument():
  params = fid.vgg16_params()
  lowered = fid.vgg16_program().lower(params, jnp.zeros((2, 32, 32, 3)))
  assert _nbytes(params) > 50 * 2**20  # 14.7M float32 weights, none of them in the program
  assert _largest_constant_bytes(lowered) < 2**16
  assert len(lowered.as_text()) < 2**20


@pytest.mark.parametrize("preprocess", ["adm", "pytorch_fid"])
def test_inception_programs_take_the_variables_as_an_argument(preprocess):
  variables = _random_variables(seed=3)
  module = inception.InceptionV3FID(preprocess=preprocess)
  x = jnp.zeros((2, 32, 32, 3))
  program = features.inception_program(module, ("pool", "spatial", "logits_unbiased"))
  assert program is features.inception_program(module, ("pool", "spatial", "logits_unbiased"))  # one per config
  for lowered in (program.lower(variables, x), reconstruction.inception_pair_program(module).lower(variables, x, x)):
    assert _largest_constant_bytes(lowered) < 2**16 < _nbytes(variables)


def test_reconstruction_lpips_program_takes_the_weights_as_an_argument():
  nets = reconstruction.lpips_params()
  x = jnp.zeros((2, 32, 32, 3))  # >= 32 pixels: the AlexNet LPIPS branch is traced too
  lowered = reconstruction.per_image_program().lower(nets, x, x)
  assert _largest_constant_bytes(lowered) < 2**16 < _nbytes(nets)


def test_reconstruction_metrics_place_the_weights_once_per_mesh():
  metrics = reconstruction.ReconstructionMetrics()
  x = np.zeros((2, 32, 32, 3), np.float32)
  metrics.update(x, x)
  placed = metrics._nets_beside(x)  # pylint: disable=protected-access
  metrics.update(x, x)
  assert metrics._nets_beside(x) is placed  # pylint: disable=protected-access
  assert all(isinstance(a, jax.Array) for a in jax.tree.leaves(placed))
  assert metrics.result()["images"] == 4


def _imported_modules(package: pathlib.Path) -> dict[str, set[str]]:
  """{file name: the modules its import statements name} over a package's files."""
  out = {}
  for path in package.glob("*.py"):
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        names.update(a.name for a in node.names)
      elif isinstance(node, ast.ImportFrom):
        names.update([node.module or ""] + [f"{node.module}.{a.name}" for a in node.names])
    out[path.name] = names
  return out


def test_eval_imports_neither_tools_nor_train_and_train_imports_no_tools():
  root = pathlib.Path(features.__file__).parent.parent
  for package, banned in (("eval", ("ifsq_jax.tools", "ifsq_jax.train")), ("train", ("ifsq_jax.tools",))):
    for name, modules in _imported_modules(root / package).items():
      assert not {m for m in modules if m.startswith(banned)}, f"{package}/{name}"

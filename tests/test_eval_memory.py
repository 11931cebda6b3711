"""Bounded memory at scale: the latent-scale pass in the step's micro-batches, evaluation without host images.

* The DiT's latent scale measured in micro-batches of global batch / grad_accum_steps equals the whole-batch value.
* Samples are rounded to uint8 on the devices with the bytes of ``fid.to_uint8``; their features are computed
  where they are, and only features reach the host: no (N, H, W, 3) array, no float32 image batch.
* The streamed evaluation gives the numbers of scoring the gathered float samples (the previous path).
* ``--compile_only`` lists the latent-scale pass and the evaluation programs beside the train steps.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_dit_train import tiny_config, tokenizer_dir  # noqa: F401  (a fixture)
from test_fid_tool import _random_variables

from ifsq_jax import main as main_lib
from ifsq_jax import parallel
from ifsq_jax.convert import torch_io
from ifsq_jax.data import transforms
from ifsq_jax.eval import features as features_lib
from ifsq_jax.eval import fid
from ifsq_jax.train import dit, registry


def _trainer(config):
  trainer = dit.DiTTrainer(config, parallel.make_mesh())
  state = jax.jit(lambda k: nn.meta.unbox(trainer.init_state(k)))(jax.random.key(1))
  return trainer, state


def test_latent_scale_in_the_steps_micro_batches_equals_the_whole_batch_pass(tokenizer_dir):  # noqa: F811
  scales, shapes = {}, {}
  for k in (1, 4):
    c = tiny_config(tokenizer_dir, **{"train.global_batch_size": 32, "train.grad_accum_steps": k,
                                      "latent.scale_batches": 2})
    trainer, state = _trainer(c)
    program = trainer.moments_program()
    seen = []

    def record(batch, frozen, program=program, seen=seen):
      seen.append(batch["image"].shape)
      return program(batch, frozen)

    trainer.moments_program = lambda record=record: record
    data = trainer.train_data(0, 1)
    try:
      scales[k] = float(trainer.prepare(state, data, trainer.frozen_on_devices).extra["latent_scale"])
    finally:
      data.close()
    shapes[k] = seen
  assert shapes[1] == [(32, 32, 32, 3)] * 2  # one program call per global batch
  assert shapes[4] == [(8, 32, 32, 3)] * 8  # the step's micro-batch: 32 / 4
  assert scales[4] == pytest.approx(scales[1], rel=1e-6)


def test_device_rounding_gives_the_bytes_of_fid_to_uint8_for_every_float32():
  thresholds = features_lib.uint8_thresholds()[1:-1]
  rng = np.random.default_rng(0)
  x = np.concatenate([rng.uniform(-1.1, 1.1, 50_000).astype(np.float32), thresholds,
                      np.nextafter(thresholds, np.float32(-np.inf)), np.nextafter(thresholds, np.float32(np.inf)),
                      np.float32([0.0, -0.0, 1.0, -1.0, 1e-30, -1e-30, -1e-45, 7.0, -7.0, np.inf, -np.inf])])
  want = fid.to_uint8(x)
  np.testing.assert_array_equal(np.asarray(jax.jit(features_lib.to_uint8)(x)), want)
  # A float32 floor(127.5 x + 128) alone misses near the steps: the thresholds are needed.
  assert np.any(np.clip(np.floor(np.float32(127.5) * x + np.float32(128)), 0, 255).astype(np.uint8) != want)
  # The validation crops go to the features as uint8: the bytes their [-1, 1] floats round back to.
  u = np.arange(256, dtype=np.uint8)
  np.testing.assert_array_equal(fid.to_uint8(transforms.to_float(u)), u)


def test_mesh_features_are_the_extractors_features_of_the_same_uint8_images(tmp_path):
  path = str(tmp_path / "inception")
  torch_io.save_converted(path, _random_variables(seed=4), {"kind": "inception"})
  extractor = features_lib.FeatureExtractor(path, batch=8)
  mesh = parallel.make_mesh()
  images = np.random.default_rng(2).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
  on_mesh = features_lib.MeshFeatures(extractor, mesh)(parallel.global_array(images, mesh))
  on_host = extractor(images)
  assert set(on_mesh) == set(on_host) == {"vgg16", "pool", "spatial", "logits_unbiased"}
  for name, want in on_host.items():
    got = parallel.to_host(on_mesh[name])
    assert got.dtype == np.float32 and on_mesh[name].sharding.is_equivalent_to(parallel.batch_sharding(mesh, 2), 2)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max(), err_msg=name)


def test_evaluation_gathers_features_only_and_scores_as_the_gathered_samples(tokenizer_dir, monkeypatch):  # noqa: F811
  n, batch = 20, 8  # three sampler calls of 8, the last with 4 padding rows
  c = tiny_config(tokenizer_dir, **{"eval.num_samples": n, "sample.batch_size": batch, "eval.grid_classes": 2,
                                    "eval.grid_per_class": 2})
  trainer, state = _trainer(c)
  state = state.replace(extra={"latent_scale": jnp.asarray(1.3, jnp.float32)})
  gathered = []
  to_host = parallel.to_host

  def recording(x):
    out = to_host(x)
    gathered.append((out.shape, out.dtype))
    return out

  monkeypatch.setattr(parallel, "to_host", recording)
  got = trainer.evaluate(state, step=0)
  monkeypatch.setattr(parallel, "to_host", to_host)

  # The host received features (B, D) float32, and uint8 images of the grid's calls only: never float32 images,
  # never more than one call's rows.
  assert gathered and all(shape[0] == batch for shape, _ in gathered)
  images = [(shape, dtype) for shape, dtype in gathered if len(shape) == 4]
  assert images and all(dtype == np.uint8 for _, dtype in images)
  assert {shape for shape, _ in gathered if len(shape) == 2} == {(batch, 512)}

  # The previous path: every sample gathered as float32, rounded and scored on the host.
  labels = np.arange(n) % c.model.num_classes
  samples = trainer.sample_all(state, labels, seed=c.seed + 1)["images"]
  want = trainer.evaluator.score(samples)
  assert set(got) == set(want) == {"fd_vgg16", "samples"} and got["samples"] == n
  assert got["fd_vgg16"] == pytest.approx(want["fd_vgg16"], rel=1e-5)
  # The grid: the first samples of classes 0 and 1, as the saved uint8 images read back.
  rows = trainer.image_rows(state)
  expected = transforms.to_float(fid.to_uint8(np.stack([samples[[0, 9]], samples[[1, 10]]])))
  np.testing.assert_array_equal(np.stack(rows), expected)


def test_compile_only_lists_the_latent_scale_pass_and_the_evaluation_programs(tokenizer_dir, capsys):  # noqa: F811
  c = tiny_config(tokenizer_dir, **{"train.global_batch_size": 16, "train.grad_accum_steps": 2,
                                    "eval.num_samples": 20})
  main_lib.compile_only(registry.get("dit"), c, None)
  out = capsys.readouterr().out
  names = [line.split(" | ")[0] for line in out.splitlines() if " | " in line][1:]
  assert names == ["train", "latent scale (8)", "eval: sample + decode (8)", "eval: to uint8 (8)",
                   "eval: features (8)"], out
  rows = [line.split(" | ") for line in out.splitlines() if " | " in line][1:]
  assert float(rows[0][-1]) > 0 and all(r[-1] == "-" for r in rows[1:])  # FLOPs: counted for the steps only
  assert float(rows[-1][5].replace(",", "")) > 0, out  # the feature networks' peak (MiB per device)

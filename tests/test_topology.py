"""Ahead-of-time compilation for TPU topologies on this CPU host (libtpu's compiler; nothing runs on a TPU)."""

import math
import subprocess

import jax
import numpy as np
import pytest

from conftest import REPO, main_command, subprocess_env, toy_config
from ifsq_jax import parallel, shapes_only, topology
from ifsq_jax.train import loop, registry, toy


def test_topology_names_are_parsed_and_bad_ones_refused():
  assert topology.parse("v5e:4x4") == ("v5e", (4, 4))
  assert topology.parse("v4:2x2x4") == ("v4", (2, 2, 4))
  assert topology.chips("v5p:2x2x2") == 8
  for bad in ("v5e:4x4x4", "v4:2x2", "v7:2x2", "v5e", "v6e:0x4", "tpu-v5e-16"):
    with pytest.raises(ValueError, match=f"--topology={bad!r} is not valid"):
      topology.parse(bad)


@pytest.mark.parametrize("name,kind,chips,hosts", [("v4:2x2x2", "TPU v4", 8, 2), ("v5e:4x4", "TPU v5 lite", 16, 4),
                                                   ("v5p:2x2x2", "TPU v5", 8, 2), ("v6e:2x2", "TPU v6 lite", 4, 1)])
def test_each_generation_gives_one_device_per_chip(name, kind, chips, hosts):
  devices = topology.devices(name)
  assert len(devices) == chips and {d.device_kind for d in devices} == {kind}
  assert len({d.process_index for d in devices}) == hosts
  assert {d.core_on_chip for d in devices} == {0}  # v4 as megacore: one device of both TensorCores


def test_compile_only_for_a_topology_prints_memory_and_writes_nothing(tmp_path):
  work = tmp_path / "work"
  proc = subprocess.run(main_command(work, "--compile_only", "--topology=v5e:2x2", "--config.mesh.data=2",
                                     "--config.mesh.fsdp=2"),
                        env=subprocess_env(1), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = proc.stdout
  assert "mesh {'data': 2, 'fsdp': 2, 'tensor': 1} on TPU v5e:2x2 (4 chips, 1 hosts)" in out
  row = next(line for line in out.splitlines() if line.startswith("train |"))
  peak_mib = float(row.split("|")[5].replace(",", ""))
  assert 0 < peak_mib < 1024
  assert "fits in the 16 GiB of HBM of a v5e chip." in out
  assert not work.exists()

  bad = subprocess.run(main_command(work, "--compile_only", "--topology=v5e:4x4x4"), env=subprocess_env(1),
                       capture_output=True, text=True, timeout=120)
  assert bad.returncode != 0 and "--topology='v5e:4x4x4' is not valid" in bad.stderr
  alone = subprocess.run(main_command(work, "--topology=v5e:2x2"), env=subprocess_env(1), capture_output=True,
                         text=True, timeout=120)
  assert alone.returncode != 0 and "it needs --compile_only" in alone.stderr
  assert not work.exists()


def _state_bytes(trainer_cls, config, devices):
  """(all bytes of the train state, bytes of it on one device under its shardings)."""
  mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, devices)
  with shapes_only.enabled():
    trainer = trainer_cls(config, mesh)
  shardings, abstract = loop.abstract_state(trainer, jax.random.key(0), mesh, config.mesh.rules)
  leaves = jax.tree.leaves(abstract)
  total = sum(math.prod(a.shape) * a.dtype.itemsize for a in leaves)
  local = sum(math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize for a in leaves)
  return total, local


@pytest.mark.parametrize("config_file,tokens", [("configs/dit_l2.py:repa=none", 256),
                                                ("configs/llamagen_l.py:repa=none", 256)])
def test_paper_generators_compile_for_16_chips_with_their_state_sharded(config_file, tokens):
  """DiT-L and LlamaGen-L at full width (2 layers) for a v5e 4 x 4 slice: a sharding regression fails here."""
  c = shapes_only.load_config_file(str(REPO / config_file))
  c.tokenizer = str(REPO / "configs" / "ifsq_f16_d4.py")
  c.model.depth, c.model.encoder_depth = 2, 1
  c.mesh.data, c.mesh.fsdp = 4, 4
  c.data.codes_dir = "extracted"  # codes as the batch (never read: nothing runs); the step without the tokenizer
  c.train.global_batch_size = 64
  devices = topology.devices("v5e:4x4")
  task = registry.get(c.task)
  [row] = loop.compile_steps(task.TRAINER, c, schema=task.default_config(), devices=devices)
  total, local = _state_bytes(task.TRAINER, c, devices)
  # Parameters, optimizer state and EMA are sharded 4 ways over fsdp (norm scales and biases replicated).
  assert 0.25 * total <= local < 0.27 * total
  batch_bytes = 64 * tokens * 4 * 4 // 16  # codes (or token ids), float32, this chip's 4 examples
  assert local <= row.arguments <= local + batch_bytes + 2**20
  assert row.aliased >= 0.9 * local  # the state is donated: updated in place
  assert row.peak < topology.HBM_GIB["v5e"] * 2**30
  # FLOPs per chip: 6 (8 with the blocks rematerialised) x per-token matmul parameters x tokens x 4 examples;
  # per layer 12 d^2 (attention 4 d^2, MLP 8 d^2), plus LlamaGen's output heads.
  d = c.model.hidden_size
  per_token = 12 * d * d * c.model.depth + d * sum(c.model.get("vocab_sizes", ()))
  assert 6 * per_token * tokens * 4 < row.flops < 1.25 * 8 * per_token * tokens * 4, (row.flops, per_token)


# Peak memory against the per-chip batch: about linear (the generators), bending (the tokenizer: convex, or
# concave where the compiler rematerialises), a staircase, refused by the compiler above a batch, and bumpy
# (not monotonic: LlamaGen-XL on v4 needed 31.83 GiB at 21 per chip and 31.06 at 22).
PEAKS = {
    "linear": lambda b: 3.0 + 0.5 * b,
    "convex": lambda b: 3.0 + 0.01 * b * b,
    "concave": lambda b: 3.0 + 4.0 * math.sqrt(b),
    "staircase": lambda b: 3.0 + 8.0 * (b // 8),
    "refused above 40": lambda b: 3.0 + 0.5 * b if b <= 40 else math.inf,
    "bumpy": lambda b: 3.0 + 0.5 * b + (0.75 if b % 3 == 1 else 0.0),
}


@pytest.mark.parametrize("shape", PEAKS)
@pytest.mark.parametrize("limit", [2.0, 3.6, 4.0, 12.25, 28.0, 70.0])
@pytest.mark.parametrize("guess", [1, 2, 40, 50, 63])
def test_largest_fitting_batch_is_found_from_any_guess_without_asking_twice(shape, limit, guess):
  asked = []

  def peak(batch):
    asked.append(batch)
    return PEAKS[shape](batch)

  largest = topology.largest_fitting(peak, limit, guess)
  under = [b for b in range(1, 1000) if PEAKS[shape](b) <= limit]
  if shape == "bumpy":  # a batch that fits with the next one not fitting
    assert (largest == 0 and 1 not in under) or (largest in under and largest + 1 not in under)
  else:
    assert largest == max(under, default=0)
  assert len(asked) == len(set(asked)) and min(asked) >= 1
  assert len(asked) <= 3 * math.ceil(math.log2(abs(largest - guess) + 2)) + 4, asked


@pytest.mark.parametrize("answer", [6, 61, 75, 300])
def test_largest_fitting_reads_an_about_linear_peak_off_its_line(answer):
  line = lambda b: 13.0 + 1.1 * b
  limit = line(answer) + 0.5
  known = {1: line(1), 2: line(2)}  # two compiles, as the bench fits
  for guess in (answer, answer + 7, answer - 3, answer + answer // 2):
    asked = []
    found = topology.largest_fitting(lambda b: asked.append(b) or line(b), limit, guess, known=known)
    assert found == answer
    assert asked == [answer, answer + 1] if guess == answer else len(asked) <= 3, (guess, asked)
  # Off the line: the tokenizer's compiled peaks on v5p:2x2x2 (GiB, linear between them). The fit through 1 and
  # 16 per chip said 61; the search reads 80, 76, then 75 off the lines through the nearest peaks.
  compiled = {16: 26.2, 61: 74.19, 75: 93.51, 76: 95.93, 80: 100.14, 1000: 1000.0}
  tokenizer = lambda b: float(np.interp(b, list(compiled), list(compiled.values())))
  asked = []
  assert topology.largest_fitting(lambda b: asked.append(b) or tokenizer(b), 95.0, 61, known={16: 26.2}) == 75
  assert asked == [61, 80, 76, 75]


def test_multislice_splits_the_data_axis_over_slices():
  devices = topology.devices("v5e:2x2", num_slices=2)
  assert len(devices) == 8 and sorted({d.slice_index for d in devices}) == [0, 1]
  mesh = parallel.make_mesh(4, 2, 1, devices, slices=2)
  slice_of = np.vectorize(lambda d: d.slice_index)(mesh.devices)
  # fsdp (and tensor) stay inside a slice; only the data axis crosses the data-centre network.
  np.testing.assert_array_equal(slice_of[:, :, 0], [[0, 0], [0, 0], [1, 1], [1, 1]])
  with pytest.raises(ValueError, match="mesh.slices=3 must be >= 1 and divide the data axis"):
    parallel.make_mesh(4, 2, 1, devices, slices=3)
  c = toy_config(**{"mesh.data": 4, "mesh.fsdp": 2, "mesh.slices": 2})
  [row] = loop.compile_steps(toy.ToyTrainer, c, schema=toy.default_config(), devices=devices)
  assert row.peak > 0 and row.flops > 0

"""DiT and LlamaGen over two processes, killed after a checkpoint and restarted, log one process's numbers.

Each test trains the task's quickstart config, shrunk, for 6 steps (checkpoints every 2) three ways: one process
with 8 CPU devices to the end (the reference); two processes with 4 devices each (``jax.distributed`` on
127.0.0.1), SIGKILLed together once a checkpoint is on disk and a later step is logged, as a crashed job; then
the same two commands again, which resume from the newest checkpoint and finish. All three use the mesh
``data=2, fsdp=4``: CPU devices are laid out by process, so each process holds the parameters sharded over its
own 4 devices and the gradient all-reduce over ``data`` crosses the processes.

On resume the loop moves the lines of steps after the restored checkpoint to ``metrics.jsonl.orphaned``
(``writers.rewind_metrics``) and logs those steps again, so the final ``metrics.jsonl`` holds each step once.

LlamaGen runs without REPA: with the VGG16 target, the two processes' CPU collectives (gloo) go out of step
within the first train steps ("Received data size doesn't match expected size", 1536 vs 512 bytes), although
both compile the same program: the order of XLA:CPU's collectives under ``jax.distributed`` is at fault.
"""

import dataclasses
import json
import signal
import socket
import subprocess
import sys
import time

import flax.linen as nn
import jax
import numpy as np
import pytest
from conftest import REPO, subprocess_env

from ifsq_jax.convert import torch_io
from ifsq_jax.models.tokenizer import Tokenizer, TokenizerConfig

STEPS = 6
EVERY = 2
# Wall-clock rates and times: the only logged values that may differ.
TIMING = ("steps_per_sec", "examples_per_sec", "perf/data_wait_ms", "perf/step_ms")

# Shared by both tasks: 2 layers of width 32, batch 8, a tiny evaluation at the end only (the loop always
# evaluates after the last step), the mesh of the two-process runs in the single-process run too.
COMMON = ["--config.model.depth=2", "--config.model.hidden_size=32", "--config.model.num_heads=2",
          "--config.model.encoder_depth=1", "--config.model.projector_dim=32",
          f"--config.train.num_steps={STEPS}", "--config.train.log_every=1", f"--config.checkpoint.every={EVERY}",
          "--config.train.eval_at_start=False", "--config.train.eval_every=0", "--config.train.image_every=0",
          "--config.train.global_batch_size=8", "--config.data.eval_examples=8", "--config.eval.num_samples=8",
          "--config.eval.grid_classes=2", "--config.eval.grid_per_class=1", "--config.sample.batch_size=8",
          "--config.mesh.data=2", "--config.mesh.fsdp=4"]
DIT = [f"--config={REPO / 'configs' / 'dit_l2.py'}:quickstart", "--config.latent.scale_batches=1",
       "--config.sample.num_steps=2"]
LLAMAGEN = [f"--config={REPO / 'configs' / 'llamagen_l.py'}:quickstart", "--config.model.factorized_depth=1",
            "--config.repa.target=none", "--config.model.z_dim=0",
            "--config.eval.cknna_batch=8", "--config.eval.cknna_topk=3"]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
  """A random tokenizer of the quickstart's geometry: 32 px -> 8 x 8 x 4 codes of 17 levels (289 + 289 tokens)."""
  path = tmp_path_factory.mktemp("tokenizer")
  cfg = TokenizerConfig(hidden_size=32, hidden_size_mult=(1, 1), num_res_blocks=1, downsample=(True, True),
                        upsample=(True, True), resolution=32, levels=(17,) * 4)
  boxed = Tokenizer(cfg).init(jax.random.key(1), np.zeros((1, 32, 32, 3), np.float32))["params"]
  # Doubled weights spread the latent over more of the levels than a fresh init does.
  params = jax.tree.map(lambda p: 2.0 * np.asarray(p), nn.meta.unbox(boxed))
  torch_io.save_converted(str(path), params, {"kind": "tokenizer", "model": dataclasses.asdict(cfg)})
  return str(path)


def _env(devices):
  env = subprocess_env(devices)
  # Also cache the short compilations: Orbax compiles a slice program per array and device when saving. (Process 1
  # of the two never finds its programs there: JAX keys the entries by the process's own CPU topology.)
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  return env


def _command(workdir, flags, *extra):
  return [sys.executable, "-m", "ifsq_jax.main", f"--workdir={workdir}", *flags, *extra]


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(command, devices, log):
  """A process whose output goes to ``log`` (a pipe nobody reads while polling would fill and stall it)."""
  with open(log, "w") as f:
    proc = subprocess.Popen(command, env=_env(devices), stdout=f, stderr=subprocess.STDOUT)
  proc.log = log
  return proc


def _start_two(workdir, flags, name):
  port = _free_port()  # a fresh port for each start: the killed coordinator's may not be free yet
  return [_start(_command(workdir, flags, f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                          f"--process_id={i}"), 4, workdir.parent / f"{name}{i}.log") for i in range(2)]


def _finish(procs):
  """Waits for the processes; their outputs, after asserting that each exited with 0."""
  for p in procs:
    p.wait(timeout=300)
  outs = [p.log.read_text() for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, f"{p.log}:\n{out[-4000:]}"
  return outs


def _lines(path):
  return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _train_steps(path):
  return [r["step"] for r in _lines(path) if "loss" in r]


def _saved_steps(workdir):
  return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def _kill_after_a_checkpoint(workdir, procs):
  """SIGKILLs both processes once checkpoint EVERY is on disk and a later step is logged."""
  start = time.time()
  while not ((workdir / "checkpoints" / str(EVERY)).exists()
             and max(_train_steps(workdir / "metrics.jsonl"), default=0) > EVERY):
    if any(p.poll() is not None for p in procs):
      for p in procs:
        p.kill()
        p.wait()
      pytest.fail("a process ended before it was killed:\n" + "\n".join(p.log.read_text()[-3000:] for p in procs))
    assert time.time() - start < 240, "no checkpoint written"
    time.sleep(0.02)
  for p in procs:
    p.send_signal(signal.SIGKILL)
  for p in procs:
    assert p.wait(timeout=60) == -signal.SIGKILL


def _check_two_processes_resume_and_match_one(flags, tmp_path, scalars):
  one, two = tmp_path / "one", tmp_path / "two"
  # The reference runs beside the first two processes, which spend much of their time waiting for each other.
  single = _start(_command(one, flags), 8, tmp_path / "one.log")
  _kill_after_a_checkpoint(two, _start_two(two, flags, "killed"))
  logged = _train_steps(two / "metrics.jsonl")
  resumed_from = max(_saved_steps(two))
  assert EVERY <= resumed_from < STEPS and max(logged) > EVERY  # killed while training, after a checkpoint
  outs = _finish(_start_two(two, flags, "resumed"))
  _finish([single])
  assert "Process 1 of 2; 4 local / 8 global devices" in outs[1]
  for out in outs:
    assert f"Resumed from step {resumed_from} in" in out

  # The killed run's lines after the restored checkpoint were set aside; every step is logged once.
  orphaned = _lines(two / "metrics.jsonl.orphaned")
  assert [r["step"] for r in orphaned] == [s for s in logged if s > resumed_from]
  ref = {r["step"]: r for r in _lines(one / "metrics.jsonl") if "loss" in r}
  got = [r for r in _lines(two / "metrics.jsonl") if "loss" in r]
  assert [r["step"] for r in got] == list(ref) == list(range(1, STEPS + 1))
  assert scalars <= set(ref[1])
  for rec in got + orphaned:  # the set-aside lines too: the killed run computed the same numbers
    want = ref[rec["step"]]
    assert set(rec) == set(want)
    for key in sorted(set(want) - set(TIMING)):
      np.testing.assert_allclose(rec[key], want[key], rtol=1e-5, err_msg=f"step {rec['step']}: {key}")

  # The evaluation after the last step, from the resumed processes' parameters.
  evals = [[r for r in _lines(w / "metrics.jsonl") if "eval/samples" in r] for w in (one, two)]
  assert [[r["step"] for r in e] for e in evals] == [[STEPS], [STEPS]]
  for key, want in evals[0][0].items():
    np.testing.assert_allclose(evals[1][0][key], want, rtol=1e-5, err_msg=key)
  assert _saved_steps(two) == _saved_steps(one) == list(range(EVERY, STEPS + 1, EVERY))
  # Nothing else is left there (a save the kill interrupted is removed on restart).
  assert sorted(p.name for p in (two / "checkpoints").iterdir()) == [str(s) for s in _saved_steps(two)]


def test_dit_two_processes_killed_and_resumed_log_one_process_numbers(tokenizer_dir, tmp_path):
  _check_two_processes_resume_and_match_one([*DIT, *COMMON, f"--config.tokenizer={tokenizer_dir}"], tmp_path,
                                            {"loss", "mse", "cos", "proj", "grad_norm", "latent_scale", "t_mean"})


def test_llamagen_two_processes_killed_and_resumed_log_one_process_numbers(tokenizer_dir, tmp_path):
  _check_two_processes_resume_and_match_one([*LLAMAGEN, *COMMON, f"--config.tokenizer={tokenizer_dir}"], tmp_path,
                                            {"loss", "ce", "ce_0", "ce_1", "accuracy", "grad_norm"})

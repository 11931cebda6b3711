"""``python -m ifsq_jax.main`` as a process: SIGKILL and resume, SIGTERM, corrupted checkpoints, bad configs."""

import json
import os
import pathlib
import signal
import subprocess
import time

import numpy as np
import pytest

from conftest import main_command, read_metrics, subprocess_env

SMALL = ["--config.data.image_size=16", "--config.model.width=16", "--config.model.mlp_width=64",
         "--config.data.eval_examples=8", "--config.train.log_every=1", "--config.checkpoint.async_save=False"]


def _run(workdir, *flags, timeout=240):
  proc = subprocess.run(main_command(workdir, *SMALL, *flags), env=subprocess_env(), capture_output=True, text=True,
                        timeout=timeout)
  return proc


def _steps(workdir):
  d = pathlib.Path(workdir) / "checkpoints"
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def _wait_for(predicate, proc, timeout=180):
  start = time.time()
  while not predicate():
    if proc.poll() is not None:
      out = proc.stdout.read() if proc.stdout else ""
      raise AssertionError(f"the run ended (rc {proc.returncode}) before the awaited state:\n{out[-3000:]}")
    if time.time() - start > timeout:
      proc.kill()
      raise AssertionError("timed out")
    time.sleep(0.02)


def test_sigkill_then_resume_logs_identical_losses(tmp_path):
  flags = ["--config.train.num_steps=120", "--config.checkpoint.every=20"]
  ref = _run(tmp_path / "ref", *flags)
  assert ref.returncode == 0, ref.stderr[-3000:]

  work = tmp_path / "killed"
  proc = subprocess.Popen(main_command(work, *SMALL, *flags), env=subprocess_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  _wait_for(lambda: 40 in _steps(work), proc)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  killed_at = max(_steps(work))
  assert killed_at < 120, "the run finished before it was killed"

  resumed = _run(work, *flags)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"Resumed from step {killed_at}" in resumed.stderr
  a, b = read_metrics(tmp_path / "ref"), read_metrics(work)
  assert sorted(a) == sorted(b) == list(range(1, 121))
  for step in range(killed_at + 1, 121):
    assert a[step]["loss"] == b[step]["loss"], step  # bitwise on CPU
    assert a[step]["grad_norm"] == b[step]["grad_norm"], step


def test_sigterm_saves_a_checkpoint_at_the_current_step_and_exits_cleanly(tmp_path):
  proc = subprocess.Popen(main_command(tmp_path, *SMALL, "--config.train.num_steps=100000",
                                       "--config.checkpoint.every=100000"),
                          env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  metrics = tmp_path / "metrics.jsonl"
  _wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 5, proc)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out[-3000:]
  last = max(read_metrics(tmp_path))
  assert _steps(tmp_path) == [last] and 5 <= last < 100000
  assert "Received SIGTERM" in out and "checkpoint saved" in out


def test_corrupted_newest_checkpoint_falls_back_to_the_previous_one(tmp_path):
  first = _run(tmp_path, "--config.train.num_steps=20", "--config.checkpoint.every=10")
  assert first.returncode == 0, first.stderr[-3000:]
  assert _steps(tmp_path) == [10, 20]
  # Damage step 20: empty every array file of its state.
  damaged = [p for p in (tmp_path / "checkpoints" / "20" / "state").rglob("*") if p.is_file() and "d" in p.parts]
  damaged = damaged or [p for p in (tmp_path / "checkpoints" / "20" / "state").rglob("*") if p.is_file()]
  for p in damaged:
    p.write_bytes(b"")
  again = _run(tmp_path, "--config.train.num_steps=30", "--config.checkpoint.every=10")
  assert again.returncode == 0, again.stderr[-3000:]
  assert "could not be restored" in again.stderr and "Resumed from step 10" in again.stderr
  assert (tmp_path / "checkpoints" / "20.corrupt").is_dir()  # set aside, not deleted
  assert _steps(tmp_path) == [10, 20, 30]
  assert sorted(read_metrics(tmp_path)) == list(range(1, 31))
  assert (tmp_path / "metrics.jsonl.orphaned").exists()


def test_a_changed_optimizer_setting_exits_with_the_differing_entries_and_renames_nothing(tmp_path):
  first = _run(tmp_path, "--config.train.num_steps=2", "--config.checkpoint.every=1")
  assert first.returncode == 0, first.stderr[-3000:]
  again = _run(tmp_path, "--config.train.num_steps=4", "--config.optimizer.grad_clip_norm=0.0")
  assert again.returncode != 0
  assert "CheckpointMismatchError" in again.stderr and "Traceback" not in again.stderr
  assert "opt_state/0/0/mu/" in again.stderr and "opt_state/1/0/mu/" in again.stderr  # missing / unexpected
  assert "new work dir" in again.stderr and "init_from" in again.stderr
  assert _steps(tmp_path) == [1, 2] and not list((tmp_path / "checkpoints").glob("*.corrupt*"))


@pytest.mark.parametrize("flag,message", [
    ("--config.train.global_batch_size=12", "global_batch_size=12 .* does not divide over the 8 devices"),
    ("--config.mesh.data=3", r"mesh .* has 3 devices but there are 8|needs a multiple"),
    ("--config.data.name=imagenet", "config.data.name='imagenet' is not a known dataset"),
    ("--config.train.log_every=0", "config.train.log_every=0 must be >= 1"),
])
def test_bad_config_is_one_clear_error_before_compiling(tmp_path, flag, message):
  proc = _run(tmp_path, flag, timeout=120)
  assert proc.returncode != 0
  import re  # pylint: disable=g-import-not-at-top
  assert re.search(message, proc.stderr), proc.stderr[-2000:]
  assert "Invalid config" in proc.stderr
  assert not (tmp_path / "checkpoints").exists()


def test_misspelled_override_is_rejected(tmp_path):
  proc = _run(tmp_path, "--config.train.lerning_rate=0.1", timeout=120)
  assert proc.returncode != 0 and "lerning_rate" in proc.stderr


def test_missing_dataset_path_is_one_clear_error(tmp_path):
  proc = _run(tmp_path, "--config.data.name=image_folder", f"--config.data.path={tmp_path / 'nowhere'}", timeout=120)
  assert proc.returncode != 0
  assert "does not exist or is not a directory (config.data.path)" in proc.stderr
  assert "Traceback" not in proc.stderr

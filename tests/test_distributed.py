"""Two local processes with jax.distributed on 127.0.0.1 train like one process."""

import json
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np

from conftest import REPO, main_command, read_metrics, read_records, subprocess_env

FLAGS = ["--config.data.image_size=16", "--config.model.width=16", "--config.model.mlp_width=64",
         "--config.data.eval_examples=8", "--config.train.log_every=1", "--config.train.num_steps=4",
         "--config.checkpoint.every=2", "--config.mesh.data=2", "--config.mesh.fsdp=4"]


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_log_the_same_losses_as_one(tmp_path):
  single = subprocess.run(main_command(tmp_path / "one", *FLAGS), env=subprocess_env(8), capture_output=True,
                          text=True, timeout=300)
  assert single.returncode == 0, single.stderr[-3000:]

  work = tmp_path / "two"
  # The data axis split over two "slices" (here the processes, as on a multislice TPU job).
  procs = _two_processes(work, *FLAGS, "--config.mesh.slices=2")
  outs = [p.communicate(timeout=300)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  assert "Process 1 of 2; 4 local / 8 global devices" in outs[1]
  a, b = read_metrics(tmp_path / "one"), read_metrics(work)
  assert sorted(a) == sorted(b) == [1, 2, 3, 4]
  for step in a:
    np.testing.assert_allclose(b[step]["loss"], a[step]["loss"], rtol=1e-5)
  assert sorted(int(p.name) for p in (work / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4]


def _two_processes(work, *flags):
  port = _free_port()
  return [subprocess.Popen(
      main_command(work, *flags, f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                   f"--process_id={i}"),
      env=subprocess_env(4), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]


def test_sigterm_to_one_process_stops_both_at_the_same_step(tmp_path):
  procs = _two_processes(tmp_path, *FLAGS, "--config.train.num_steps=100000", "--config.checkpoint.every=100000")
  metrics = tmp_path / "metrics.jsonl"
  start = time.time()
  while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
    assert all(p.poll() is None for p in procs), procs[0].stdout.read()[-3000:]
    assert time.time() - start < 240, "no steps logged"
    time.sleep(0.05)
  procs[1].send_signal(signal.SIGTERM)
  outs = [p.communicate(timeout=120)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  # JAX's preemption service carries the notice to the other process; both stop after the same step.
  assert all("preemption notice (SIGTERM)" in out for out in outs)
  stopped = [int(re.search(r"Stopped at step (\d+)", out).group(1)) for out in outs]
  assert stopped[0] == stopped[1] == max(read_metrics(tmp_path)) >= 3
  assert [int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()] == [stopped[0]]


def test_tokenizer_trains_and_evaluates_over_two_processes(tmp_path):
  """G and D steps, the sharded evaluation and the image grid, with parameters on both processes' devices."""
  config = REPO / "configs" / "ifsq_f16_d4.py"
  flags = [f"--config={config}:tiny", "--config.data.image_size=16", "--config.train.num_steps=3",
           "--config.loss.disc_start=1", "--config.data.eval_examples=20", "--config.train.log_every=1",
           "--config.checkpoint.every=3", "--config.mesh.data=4", "--config.mesh.fsdp=2",
           "--config.model.hidden_size_mult=(1,1)", "--config.model.downsample=(True,False)",
           "--config.model.upsample=(False,True)", "--config.loss.disc_layers=1", "--config.loss.disc_ndf=8"]
  port = _free_port()
  work = tmp_path / "two"
  procs = [subprocess.Popen(
      [sys.executable, "-m", "ifsq_jax.main", f"--workdir={work}", *flags,
       f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
      env=subprocess_env(4), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  m = read_records(work)
  assert sorted(m) == [1, 2, 3] and "disc/loss" in m[2] and "adaptive_weight" in m[3]
  result = json.loads((work / "eval.json").read_text())
  assert result["images"] == 20 and result["psnr"] > 0 and 0 < result["code_usage"] <= 1
  assert list((work / "images").glob("*.png"))

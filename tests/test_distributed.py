"""Two local processes with jax.distributed on 127.0.0.1 train like one process."""

import socket
import subprocess

import numpy as np

from conftest import main_command, read_metrics, subprocess_env

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

  port = _free_port()
  work = tmp_path / "two"
  procs = [subprocess.Popen(
      main_command(work, *FLAGS, f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                   f"--process_id={i}"),
      env=subprocess_env(4), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outs = [p.communicate(timeout=300)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  assert "Process 1 of 2; 4 local / 8 global devices" in outs[1]
  a, b = read_metrics(tmp_path / "one"), read_metrics(work)
  assert sorted(a) == sorted(b) == [1, 2, 3, 4]
  for step in a:
    np.testing.assert_allclose(b[step]["loss"], a[step]["loss"], rtol=1e-5)
  assert sorted(int(p.name) for p in (work / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4]

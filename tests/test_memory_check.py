"""A run whose compiled step cannot fit stops before step 1, with the figures and the levers."""

import subprocess
import sys

import jax
import pytest

from conftest import toy_config
from ifsq_jax.train import loop, toy


def test_the_host_memory_figure_on_cpu_is_the_available_memory_over_the_devices():
  available, source = loop._memory_limit(jax.devices())  # pylint: disable=protected-access
  assert 0 < available < 2**50 and f"/ {jax.local_device_count()} CPU devices" in source


def test_a_step_over_the_memory_limit_stops_before_step_one_naming_the_levers(tmp_path, monkeypatch):
  monkeypatch.setattr(loop, "_memory_limit", lambda devices: (1024, "a 1 KiB test device"))
  with pytest.raises(loop.DoesNotFit) as e:
    toy.train_and_evaluate(toy_config(**{"checkpoint.every": 1}), tmp_path)
  msg = str(e.value)
  assert "step needs" in msg and "a 1 KiB test device" in msg
  for lever in ("config.train.grad_accum_steps=1", "config.mesh.fsdp=1", "config.train.check_memory=False"):
    assert lever in msg
  assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())
  assert not (tmp_path / "metrics.jsonl").exists() or "loss" not in (tmp_path / "metrics.jsonl").read_text()


def test_check_memory_false_tries_anyway(tmp_path, monkeypatch):
  monkeypatch.setattr(loop, "_memory_limit", lambda devices: (1024, "a 1 KiB test device"))
  state = toy.train_and_evaluate(toy_config(**{"train.num_steps": 2, "train.check_memory": False}), tmp_path)
  assert int(state.step) == 2


def test_main_prints_one_line_when_the_step_does_not_fit(tmp_path):
  # A toy model whose activations alone exceed the host: the loop refuses it after compiling, before step 1.
  code = ("import sys; from ifsq_jax.train import loop; loop._memory_limit = lambda d: (1 << 20, 'a 1 MiB device'); "
          "from ifsq_jax import main; sys.argv = ['main', '--config=configs/toy.py', '--workdir', sys.argv[1], "
          "'--config.train.num_steps=2', '--config.data.image_size=16']; main.run()")
  out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run")], capture_output=True, text=True,
                       timeout=600)
  assert out.returncode == 1, out.stderr[-2000:]
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith("DoesNotFit: the compiled") and "a 1 MiB device" in last, out.stderr[-2000:]
  assert "Traceback" not in out.stderr

"""host_memory: XLA's memory-optimised CPU scheduler, and large buffers reused instead of faulted in again."""

import os
import subprocess
import sys

import pytest
from conftest import subprocess_env

from ifsq_jax.kernels.cpu import host_memory

SCRIPT = """
import resource
from ifsq_jax.kernels.cpu import host_memory
print("set", host_memory.from_env())
import jax, jax.numpy as jnp
f = jax.jit(lambda a: jnp.sum(jnp.tanh(jnp.tanh(a @ a) @ a)))  # 36 MiB temporaries
x = jnp.ones((3072, 3072), jnp.float32) / 3072
for _ in range(2):
  jax.block_until_ready(f(x))
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
  jax.block_until_ready(f(x))
print("faults", resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(keep: str | None) -> tuple[str, int]:
  env = subprocess_env(1)
  env.pop("IFSQ_JAX_KEEP_FREED_MEMORY", None)
  if keep is not None:
    env["IFSQ_JAX_KEEP_FREED_MEMORY"] = keep
  out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  lines = dict(line.split(" ", 1) for line in out.stdout.splitlines())
  return lines["set"], int(lines["faults"])


def test_kept_memory_is_not_faulted_in_again_and_is_the_cpu_default():
  set_off, faults_off = _faults(keep="0")
  set_on, faults_on = _faults(keep="1")
  set_default, faults_default = _faults(keep=None)  # subprocess_env runs on CPU
  assert (set_off, set_on, set_default) == ("False", "True", "True")
  assert faults_off > 100_000, faults_off  # matmul temporaries of 36 MiB: fresh pages every run
  assert faults_on < faults_off / 10, (faults_on, faults_off)
  assert faults_default < faults_off / 10, (faults_default, faults_off)


def test_from_env_leaves_accelerator_runs_alone_and_rejects_other_values(monkeypatch):
  monkeypatch.delenv("IFSQ_JAX_KEEP_FREED_MEMORY", raising=False)
  monkeypatch.setenv("JAX_PLATFORMS", "tpu,cpu")
  assert not host_memory.from_env()  # returns before touching malloc
  monkeypatch.setenv("IFSQ_JAX_KEEP_FREED_MEMORY", "yes")
  with pytest.raises(ValueError, match=r"IFSQ_JAX_KEEP_FREED_MEMORY='yes'.*0.*1"):
    host_memory.from_env()


SCHEDULER_SCRIPT = """
import ifsq_jax.main  # all the entry point imports, before its setup
from ifsq_jax.kernels.cpu import host_memory
host_memory.setup()
import jax, jax.numpy as jnp

def branches(x, w):  # eight independent products of 1 MiB
  return sum(jnp.sum(jnp.tanh(x @ w[i]) @ x) for i in range(8))

x, w = jax.ShapeDtypeStruct((512, 512), jnp.float32), jax.ShapeDtypeStruct((8, 512, 512), jnp.float32)
print(jax.jit(branches).lower(x, w).compile().memory_analysis().temp_size_in_bytes)
"""


def _temporaries(xla_flags: str) -> int:
  env = subprocess_env(1)
  env["XLA_FLAGS"] += xla_flags
  out = subprocess.run([sys.executable, "-c", SCHEDULER_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  return int(out.stdout.split()[-1])


def test_setup_selects_the_memory_optimised_scheduler_and_keeps_an_explicit_choice():
  mib = 2**20
  chosen = _temporaries("")
  concurrent = _temporaries(" --xla_cpu_enable_concurrency_optimized_scheduler=true")
  assert concurrent >= 8 * mib, concurrent  # all eight products live at once
  assert chosen <= 3 * mib, chosen  # one or two at a time


def test_use_memory_scheduler_adds_the_flag_once_and_only_for_cpu(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
  monkeypatch.setenv("JAX_PLATFORMS", "tpu,cpu")
  assert not host_memory.use_memory_scheduler()
  assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2"
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  assert host_memory.use_memory_scheduler()
  assert not host_memory.use_memory_scheduler()
  assert os.environ["XLA_FLAGS"] == ("--xla_force_host_platform_device_count=2 "
                                     "--xla_cpu_enable_concurrency_optimized_scheduler=false")

"""keep_freed_memory: a program's large buffers are reused instead of faulted in again every run."""

import subprocess
import sys

from conftest import subprocess_env

SCRIPT = """
import resource
from ifsq_jax import host_memory
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


def _faults(keep: bool) -> tuple[str, int]:
  env = subprocess_env(1)
  env["IFSQ_JAX_KEEP_FREED_MEMORY"] = "1" if keep else "0"
  out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  lines = dict(line.split(" ", 1) for line in out.stdout.splitlines())
  return lines["set"], int(lines["faults"])


def test_kept_memory_is_not_faulted_in_again():
  set_off, faults_off = _faults(keep=False)
  set_on, faults_on = _faults(keep=True)
  assert set_off == "False" and set_on == "True"
  assert faults_off > 100_000, faults_off  # matmul temporaries of 36 MiB: fresh pages every run
  assert faults_on < faults_off / 10, (faults_on, faults_off)

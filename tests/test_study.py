"""The Fashion-MNIST study (python -m ifsq_jax.study): grid, FLOP matching, metric, resume, report."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from etils import epath

from test_idx import write_idx_dir
from ifsq_jax.study import cells, classifier, grid, metrics, report


def test_levels_count_two_to_the_bits_plus_one():
  assert [grid.levels(k) for k in (2, 3, 4, 5, 6)] == [5, 9, 17, 33, 65]


def test_the_full_grid_has_every_tokenizer_and_its_generators_per_seed():
  names = [c.name for c in grid.cells(grid.GRIDS["full"], 3)]
  assert len(names) == len(set(names)) == 3 * (12 + 11 + 11)
  assert "seed2/tokenizer-fsq-6" in names and "seed0/dit-ae" in names and "seed1/llamagen-vq" in names
  assert "seed0/dit-vq" not in names and "seed0/llamagen-ae" not in names
  first_generator = next(i for i, n in enumerate(names) if "dit" in n)
  assert all("tokenizer" in n for n in names[:first_generator])  # a seed's tokenizers come first


def test_llamagen_factorizes_only_codebooks_larger_than_the_vq_one():
  assert grid.llamagen_vocab(grid.Cell("llamagen", "ifsq", 3, 0)) == ((9**4,), ())
  assert grid.llamagen_vocab(grid.Cell("llamagen", "fsq", 4, 0)) == ((289, 289), (2, 2))
  assert grid.llamagen_vocab(grid.Cell("llamagen", "vq", 0, 0)) == ((grid.VQ_CODEBOOK,), ())


def test_generators_are_matched_to_the_budget_within_one_step(tmp_path):
  sizes = grid.GRIDS["tiny"].sizes
  spent = {}
  for kind in ("dit", "llamagen"):
    per_step = grid.generator_step_flops(grid.Cell(kind, "ifsq", 4, 0), sizes, str(tmp_path))
    steps = grid.matched_steps(sizes.budget_flops, per_step)
    assert steps * per_step <= sizes.budget_flops < (steps + 1) * per_step
    spent[kind] = (steps * per_step, per_step)
  (dit_spent, dit_step), (ar_spent, ar_step) = spent["dit"], spent["llamagen"]
  assert dit_step != ar_step  # different models, different step counts, the same budget
  assert abs(dit_spent - ar_spent) < max(dit_step, ar_step)


def test_eval_steps_are_distinct_fractions_of_the_run():
  assert grid.eval_steps(100, (0.25, 0.5, 1.0)) == [25, 50, 100]
  assert grid.eval_steps(2, (0.1, 0.5, 1.0)) == [1, 2]


def test_fd_is_zero_for_a_set_with_itself_and_grows_with_a_shift():
  rng = np.random.default_rng(0)
  real = rng.normal(size=(500, 16))
  assert metrics.fd(real, real) == pytest.approx(0.0, abs=1e-6)
  shifts = [metrics.fd(real, real + s) for s in (0.5, 1.0, 2.0)]
  assert shifts == pytest.approx([16 * 0.25, 16 * 1.0, 16 * 4.0], rel=1e-6)  # |mu1 - mu2|^2, equal covariances
  assert metrics.fd(real, 2.0 * real) > 1.0


def test_precision_and_recall_of_identical_sets_are_one_and_of_far_sets_zero():
  rng = np.random.default_rng(1)
  real = rng.normal(size=(200, 8))
  out = metrics.feature_metrics(real, real.copy())
  assert out["precision"] == out["recall"] == 1.0 and out["fd_fmnist"] == pytest.approx(0.0, abs=1e-6)
  far = metrics.feature_metrics(real, real + 100.0)
  assert far["precision"] == far["recall"] == 0.0


def test_label_accuracy_counts_samples_recognised_as_their_class():
  logits = np.eye(10)[[0, 1, 2, 3]]
  out = metrics.feature_metrics(np.random.default_rng(0).normal(size=(8, 3)), np.random.default_rng(1).normal(
      size=(8, 3)), fake_logits=np.concatenate([logits, logits]), labels=np.array([0, 1, 2, 0, 0, 1, 2, 3]))
  assert out["label_accuracy"] == 7 / 8  # predictions 0 1 2 3 0 1 2 3


def test_the_classifier_sees_rgb_and_grey_alike():
  trained = classifier.Trained(
      classifier.Classifier(4).init(__import__("jax").random.key(0), np.zeros((1, 32, 32, 1)))["params"], 4, batch=3)
  x = np.random.default_rng(0).uniform(-1, 1, (5, 32, 32, 1)).astype(np.float32)
  logits, feats = trained(np.repeat(x, 3, -1))
  assert logits.shape == (5, 10) and feats.shape == (5, classifier.FEATURES)
  np.testing.assert_allclose(trained(x)[1], feats, rtol=1e-5, atol=1e-6)


def _summary(mean, sd=0.1, n=3):
  return {"mean": mean, "sd": sd, "n": n}


def test_claims_follow_clear_differences_only():
  configs = []
  for kind in ("tokenizer", "dit", "llamagen"):
    for k in (2, 4, 6):
      configs.append({"kind": kind, "bottleneck": "ifsq", "bits": k, "fd_fmnist": _summary(10.0 - (k == 4))})
      configs.append({"kind": kind, "bottleneck": "fsq", "bits": k, "fd_fmnist": _summary(12.0)})
  curve = lambda a, b: [{"step": 1, "fd_fmnist": _summary(a)}, {"step": 2, "fd_fmnist": _summary(b)}]
  next(c for c in configs if c["kind"] == "dit" and c["bits"] == 4 and c["bottleneck"] == "ifsq")["curve"] = curve(
      20.0, 5.0)
  next(c for c in configs if c["kind"] == "llamagen" and c["bits"] == 4 and c["bottleneck"] == "ifsq")["curve"] = (
      curve(15.0, 8.0))
  verdicts = [v for _, v, _ in report.claims(configs)]
  assert verdicts == ["supports", "supports", "supports"]
  for c in configs:  # one seed each: no spread, nothing can be decided
    c["fd_fmnist"] = _summary(c["fd_fmnist"]["mean"], 0.0, 1)
  assert [v for _, v, _ in report.claims(configs)][:2] == ["cannot decide", "cannot decide"]


def test_a_checkpoint_saved_but_not_evaluated_is_set_aside(tmp_path):
  work = epath.Path(tmp_path)
  for s in (10, 20):
    (work / "checkpoints" / str(s)).mkdir(parents=True)
  cells._set_aside_unevaluated(work, [20, 40])
  assert sorted(p.name for p in (work / "checkpoints").iterdir()) == ["10", "20.unevaluated"]
  (work / "checkpoints" / "20").mkdir()
  cells.write_json(work / cells.EVALS / "step_00000020.json", {"fd_fmnist": 1.0})
  cells._set_aside_unevaluated(work, [20, 40])
  assert (work / "checkpoints" / "20").exists()


def _study(data, out, *extra):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  cmd = [sys.executable, "-m", "ifsq_jax.study", f"--data={data}", f"--out={out}", "--grid=tiny", *extra]
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc.stdout


def test_a_stopped_study_keeps_its_finished_cells_and_writes_the_report(tmp_path):
  data, out = tmp_path / "fm", tmp_path / "study"
  write_idx_dir(data, n_train=48, n_test=24)
  first = _study(data, out, "--max_cells=1")
  assert "[1/2] seed0/tokenizer-ifsq-2 done" in first and "Stopped after 1 cell" in first
  tok = out / "seed0" / "tokenizer-ifsq-2"
  stamp = (tok / "result.json").stat().st_mtime_ns
  checkpoints = sorted(p.name for p in (tok / "checkpoints").iterdir())
  second = _study(data, out)
  assert "1 of 2 cells to run" in second and "[2/2] seed0/dit-ifsq-2 done" in second
  assert (tok / "result.json").stat().st_mtime_ns == stamp  # not retrained
  assert sorted(p.name for p in (tok / "checkpoints").iterdir()) == checkpoints
  results = json.loads((out / "results.json").read_text())
  assert [c["cell"] for c in results["cells"]] == ["seed0/dit-ifsq-2", "seed0/tokenizer-ifsq-2"]
  dit = next(c for c in results["cells"] if c["kind"] == "dit")
  assert [e["step"] for e in dit["evals"]] == grid.eval_steps(dit["steps"], grid.GRIDS["tiny"].sizes.eval_fractions)
  assert dit["train_flops"] <= dit["budget_flops"]
  text = (out / "REPORT.md").read_text()
  assert "fd_fmnist" in text and "cannot decide" in text and "FID" in text
  assert (out / "samples_best_dit.png").exists() and (out / "rec_fd_vs_bits.png").exists()
  assert "0 of 2 cells to run" in _study(data, out)  # all done: only the report is rebuilt

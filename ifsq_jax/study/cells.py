"""Running one cell of the grid in its work dir, resumably, and its result file.

A cell's work dir (``--out/seed0/dit-ifsq-4``) is the project trainer's own
work dir (config.json, metrics.jsonl, checkpoints/), plus:

* ``evals/step_NNNNNNNN.json``: a generator's evaluation at one point of its
  FLOP budget, written atomically when it is done;
* ``result.json``: written atomically when the cell is done; its presence is
  what "done" means. A rerun of the study skips such cells.

A killed cell resumes from the trainer's newest checkpoint (the loop restores
the exact data position and keys). A generator evaluation is done after the
loop's save at the same step, so one killed while evaluating a step whose
checkpoint was already saved would not be redone by the loop: that checkpoint
is set aside first (``checkpoints/<step>.unevaluated``) and the run resumes
from the one before it. The final step's evaluation is redone from the state
the loop returns.

The trainers' own evaluations are replaced by the study's (subclasses below):
the tokenizer's LPIPS and ``fd_vgg16`` would cost more than its training here,
and the generators are scored in the classifier's features.

N samples, H W image size.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import jax
import numpy as np
from etils import epath

from ifsq_jax import paths
from ifsq_jax.models.pretrained import load_tokenizer
from ifsq_jax.study import grid as grid_lib
from ifsq_jax.study import metrics
from ifsq_jax.train import dit, llamagen, loop, writers
from ifsq_jax.train import tokenizer as tokenizer_train

RESULT = "result.json"
EVALS = "evals"
SAMPLES = "samples.npz"


def is_done(workdir: epath.Path) -> bool:
  return (workdir / RESULT).exists()


def read_result(workdir: epath.Path) -> dict[str, Any]:
  return json.loads((workdir / RESULT).read_text())


def write_json(path: epath.Path, value: Any) -> None:
  """Writes ``value`` as JSON atomically (a reader sees the old file or the whole new one)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  paths.write_text(path, json.dumps(value, indent=2))


class Reference:
  """What every evaluation compares with: the classifier and the test split's images and features.

  Attributes:
    classifier: A :class:`~ifsq_jax.study.classifier.Trained`.
    test_images: (N, 32, 32, 3) uint8 test images (grey repeated).
    test_labels: (N,) int32.
    test_features: (N, F) classifier features of the test images.
  """

  def __init__(self, classifier, test_images: np.ndarray, test_labels: np.ndarray):
    self.classifier = classifier
    self.test_images = test_images
    self.test_labels = test_labels
    _, self.test_features = classifier(test_images.astype(np.float32) / 127.5 - 1.0)


# ------------------------------------------------------------------ tokenizer


class StudyTokenizerTrainer(tokenizer_train.TokenizerTrainer):
  """The tokenizer trainer without its own evaluation (the study evaluates the whole model afterwards)."""

  def evaluate(self, state, step):
    del state, step
    return {}


def run_tokenizer(cell: grid_lib.Cell, sizes: grid_lib.Sizes, data_dir: str, workdir: epath.Path,
                  ref: Reference) -> dict[str, Any]:
  """Trains (or resumes) the tokenizer and evaluates its EMA weights on the first ``sizes.rec_images`` test images."""
  config = grid_lib.tokenizer_config(cell, sizes, data_dir)
  loop.run(StudyTokenizerTrainer, config, workdir, schema=tokenizer_train.default_config())
  tok = load_tokenizer(str(workdir))
  n = min(sizes.rec_images, len(ref.test_images))
  out = metrics.reconstruction(tok, ref.test_images[:n], ref.classifier)
  return {"steps": config.train.num_steps, **out}


# ------------------------------------------------------------------ generators


def _evaluating(base: type) -> type:
  """A generator trainer whose evaluation is the study's, at the steps in ``config``'s study fields.

  The subclass scores ``gen_samples`` class-balanced EMA samples (sample i has
  label i % 10, the same noise / keys at every step) against the test split in
  the classifier's features, only at its evaluation steps; at other steps it
  returns nothing. It keeps the last evaluation's samples for the per-class
  grid.
  """

  class Trainer(base):
    study: dict[str, Any] = {}  # set by run_generator: reference, eval steps, samples, work dir
    instance = None  # the last one built (the loop builds it), for the final evaluation after a resume

    def __init__(self, config, mesh):
      super().__init__(config, mesh)
      type(self).instance = self
      self.last_samples = None

    def evaluate(self, state, step):
      s = self.study
      if step not in s["eval_steps"]:
        return {}
      return evaluate_generator(self, state, step, s)

    def image_rows(self, state):
      if self.last_samples is None:
        return super().image_rows(state)
      return list(per_class_grid(*self.last_samples))

  Trainer.__name__ = f"Study{base.__name__}"
  return Trainer


StudyDiTTrainer = _evaluating(dit.DiTTrainer)
StudyLlamaGenTrainer = _evaluating(llamagen.LlamaGenTrainer)


def per_class_grid(images: np.ndarray, labels: np.ndarray, per_class: int = 8) -> np.ndarray:
  """(classes, per_class, H, W, 3) in [-1, 1]: the first ``per_class`` samples of each class, a row per class."""
  rows = []
  for k in range(int(labels.max()) + 1):
    picked = images[labels == k][:per_class]
    if len(picked) < per_class:
      picked = np.concatenate([picked, -np.ones((per_class - len(picked),) + images.shape[1:], images.dtype)])
    rows.append(picked)
  return np.clip(np.stack(rows), -1, 1)


def evaluate_generator(trainer, state, step: int, study: dict[str, Any]) -> dict[str, float]:
  """Scores samples of the EMA weights at ``step``; writes ``evals/step_N.json`` (and the samples at the end)."""
  ref: Reference = study["reference"]
  start = time.time()
  labels = np.arange(study["samples"]) % 10
  images = np.asarray(trainer.sample_all(state, labels, seed=study["sample_seed"])["images"], np.float32)
  logits, feats = ref.classifier(images)
  # FD against the whole test split; precision / recall against as many test images as samples (the k-NN radii
  # depend on the set sizes).
  out = metrics.feature_metrics(ref.test_features, feats, logits, labels, pr_real=ref.test_features[:len(feats)])
  out.update(step=step, flops=step * study["step_flops"], seconds=time.time() - start)
  trainer.last_samples = (images, labels)
  workdir: epath.Path = study["workdir"]
  write_json(workdir / EVALS / f"step_{step:08d}.json", out)
  if step == study["eval_steps"][-1]:
    grid = per_class_grid(images, labels)
    writers.save_png(writers.image_grid(list(grid)), workdir / "samples.png")
  logging.info("study eval at step %d: %s", step, {k: round(v, 4) for k, v in out.items()})
  return {k: v for k, v in out.items() if k in ("fd_fmnist", "precision", "recall", "label_accuracy")}


def _checkpoint_steps(workdir: epath.Path) -> list[int]:
  d = workdir / "checkpoints"
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def _set_aside_unevaluated(workdir: epath.Path, eval_steps: list[int]) -> None:
  """Sets aside a newest checkpoint saved at an intermediate evaluation step whose evaluation is missing."""
  steps = _checkpoint_steps(workdir)
  if steps and steps[-1] in eval_steps[:-1] and not (workdir / EVALS / f"step_{steps[-1]:08d}.json").exists():
    path = workdir / "checkpoints" / str(steps[-1])
    path.rename(workdir / "checkpoints" / f"{steps[-1]}.unevaluated")
    logging.warning("Checkpoint %s was saved but not evaluated; resuming from the one before it.", path)


def run_generator(cell: grid_lib.Cell, sizes: grid_lib.Sizes, data_dir: str, workdir: epath.Path,
                  tokenizer_dir: epath.Path, ref: Reference, step_flops: float, sample_seed: int = 1) -> dict[str, Any]:
  """Trains (or resumes) a FLOP-matched generator, evaluated along the way; returns the cell's result."""
  steps = grid_lib.matched_steps(sizes.budget_flops, step_flops)
  eval_steps = grid_lib.eval_steps(steps, sizes.eval_fractions)
  config = grid_lib.generator_config(cell, sizes, data_dir, str(tokenizer_dir), num_steps=steps)
  config.train.eval_every = 1  # the loop asks at every step; the study's evaluate answers at its eval steps only
  trainer_cls = StudyDiTTrainer if cell.kind == "dit" else StudyLlamaGenTrainer
  module = dit if cell.kind == "dit" else llamagen
  trainer_cls.study = {"reference": ref, "eval_steps": eval_steps, "samples": sizes.gen_samples,
                       "sample_seed": sample_seed, "step_flops": step_flops, "workdir": workdir}
  if workdir.exists():
    _set_aside_unevaluated(workdir, eval_steps)
  state = loop.run(trainer_cls, config, workdir, schema=module.default_config())
  final = workdir / EVALS / f"step_{steps:08d}.json"
  if not final.exists():  # killed while evaluating the last step: the loop returned the restored final state
    evaluate_generator(trainer_cls.instance, state, steps, trainer_cls.study)
  evals = [json.loads((workdir / EVALS / f"step_{s:08d}.json").read_text())
           for s in eval_steps if (workdir / EVALS / f"step_{s:08d}.json").exists()]
  vocab, groups = grid_lib.llamagen_vocab(cell) if cell.kind == "llamagen" else ((), ())
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  return {"steps": steps, "step_flops": step_flops, "budget_flops": sizes.budget_flops,
          "train_flops": steps * step_flops, "params": n_params, "vocab_sizes": list(vocab),
          "group_sizes": list(groups), "evals": evals, **{k: v for k, v in evals[-1].items()
                                                          if k not in ("step", "seconds")}}

r"""The small-scale study of the paper's claims on Fashion-MNIST: ``python -m ifsq_jax.study``.

  python -m ifsq_jax.study --data=DIR --out=DIR [--grid=smoke|full] [--seeds=N]
  python -m ifsq_jax.study --data=DIR --out=DIR --dry_run       # the plan: cells, steps, FLOPs, time
  python -m ifsq_jax.study --data=DIR --out=DIR --report_only   # rebuild REPORT.md from the finished cells

Trains and evaluates one run per cell of the grid (:mod:`ifsq_jax.study.grid`),
each in its own work dir under ``--out``; a killed study run again with the same
command keeps its finished cells and resumes the unfinished one from its
checkpoint. Progress lines give the elapsed time and an ETA for the whole grid.
At the end (and with ``--report_only``) it writes ``REPORT.md``,
``results.json`` and the plots into ``--out`` (:mod:`ifsq_jax.study.report`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shlex
import sys
import time
from typing import Sequence

from etils import epath

from ifsq_jax import paths
from ifsq_jax.data import sources
from ifsq_jax.kernels.cpu import host_memory
from ifsq_jax.study import cells as cells_lib
from ifsq_jax.study import classifier as classifier_lib
from ifsq_jax.study import grid as grid_lib
from ifsq_jax.study import report
from ifsq_jax.train import writers

STUDY_FILE = "study.json"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m ifsq_jax.study", description=__doc__.split("\n\n")[0])
  p.add_argument("--data", required=True, help="directory of the four Fashion-MNIST IDX files (.gz or not)")
  p.add_argument("--out", required=True, help="the study's directory: one work dir per cell, the report")
  p.add_argument("--grid", default="smoke", choices=sorted(grid_lib.GRIDS), help="which grid (default smoke)")
  p.add_argument("--seeds", type=int, default=0, help="seeds of the whole chain (0: the grid's default)")
  p.add_argument("--only", default="", help="run only cells whose name contains this text (e.g. tokenizer-ifsq-4)")
  p.add_argument("--max_cells", type=int, default=0, help="stop after this many cells (0: all); rerun to go on")
  p.add_argument("--dry_run", action="store_true", help="print the plan (cells, steps, FLOPs, time) and exit")
  p.add_argument("--report_only", action="store_true", help="rebuild the report from the finished cells and exit")
  args = p.parse_args(argv)
  if args.seeds < 0 or args.max_cells < 0:
    p.error(f"--seeds={args.seeds} and --max_cells={args.max_cells} must be >= 0.")
  return args


def _cpu_seconds() -> float:
  """CPU time of this process (all its threads), user + system."""
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


class Progress:
  """Elapsed time and an ETA for the whole grid from the measured times of the cells finished so far.

  A kind (tokenizer, dit, llamagen) that has not finished a cell yet is
  estimated from the grid's per-kind seconds.
  """

  def __init__(self, todo: list[grid_lib.Cell], grid: grid_lib.Grid, done: int, total: int):
    self.todo = list(todo)
    self.grid = grid
    self.done, self.total = done, total
    self.times: dict[str, list[float]] = {}
    self.start = time.time()

  def estimate(self, kind: str) -> float:
    t = self.times.get(kind)
    return sum(t) / len(t) if t else self.grid.seconds.get(kind, 60.0)

  def finished(self, cell: grid_lib.Cell, seconds: float) -> str:
    self.times.setdefault(cell.kind, []).append(seconds)
    self.todo.remove(cell)
    self.done += 1
    eta = sum(self.estimate(c.kind) for c in self.todo)
    return (f"[{self.done}/{self.total}] {cell.name} done in {writers.format_eta(seconds)} | elapsed "
            f"{writers.format_eta(time.time() - self.start)} | ETA {writers.format_eta(eta)}")


def _check_study(out: epath.Path, grid: grid_lib.Grid, seeds: int, data: str) -> None:
  """Refuses to mix grids in one --out; records the grid, seeds and data the first time."""
  path = out / STUDY_FILE
  if path.exists():
    old = json.loads(path.read_text())
    if old["grid"] != grid.name:
      raise SystemExit(f"--out={out} holds a study of grid {old['grid']!r}, not {grid.name!r}: use another --out.")
    if old["sizes"] != json.loads(json.dumps(grid.sizes.__dict__)):
      raise SystemExit(f"--out={out} was started with other sizes of grid {grid.name!r} (a different version of "
                       f"the study): use another --out. Recorded: {old['sizes']}")
    seeds = max(seeds, old["seeds"])
  paths.write_text(path, json.dumps({"grid": grid.name, "seeds": seeds, "data": str(data),
                                     "sizes": grid.sizes.__dict__}, indent=2))


def plan(grid: grid_lib.Grid, seeds: int, data: str, todo: list[grid_lib.Cell]) -> tuple[str, dict[str, float]]:
  """A text table of the cells (steps, FLOPs per step, total FLOPs) and the estimated time; the step FLOPs."""
  s = grid.sizes
  flops: dict[str, float] = {}
  lines = [f"grid {grid.name}: {len(todo)} cells to run, {seeds} seed(s); generator budget "
           f"{grid_lib.round_flops(s.budget_flops)} FLOPs each, evaluated at {s.eval_fractions} of it",
           "cell | steps | FLOPs/step | train FLOPs | evals at"]
  for cell in todo:
    if cell.kind == "tokenizer":
      lines.append(f"{cell.name} | {s.tok_steps} | - | - | end")
      continue
    key = f"{cell.kind}-{cell.tokenizer_label}"
    if key not in flops:
      flops[key] = grid_lib.generator_step_flops(cell, s, data)
    steps = grid_lib.matched_steps(s.budget_flops, flops[key])
    lines.append(f"{cell.name} | {steps} | {grid_lib.round_flops(flops[key])} | "
                 f"{grid_lib.round_flops(steps * flops[key])} | {grid_lib.eval_steps(steps, s.eval_fractions)}")
  est = sum(grid.seconds.get(c.kind, 60.0) for c in todo)
  per_kind = ", ".join(f"{k} {v:.0f} s" for k, v in grid.seconds.items())
  lines.append(f"estimated time: {writers.format_eta(est)} from the grid's seconds per cell ({per_kind or 'none'}) "
               "on 2 quiet CPU cores; the classifier adds a few minutes, once per --out.")
  return "\n".join(lines), flops


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  # force: absl's handler (installed at import) would drop INFO lines outside absl.app.
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", force=True)
  for name in ("absl", "jax", "orbax", "flax", "tensorflow"):
    logging.getLogger(name).setLevel(logging.WARNING)
  host_memory.setup()
  grid = grid_lib.GRIDS[args.grid]
  out = epath.Path(args.out)
  seeds = args.seeds or grid.seeds
  if args.report_only:
    report.write(out, command=None)
    print(f"Wrote {out / report.REPORT}")
    return 0
  try:
    sources.idx_split(args.data, "test")
  except sources.DataError as e:
    raise SystemExit(f"--data={args.data!r}: {e}") from None
  all_cells = grid_lib.cells(grid, seeds)
  selected = [c for c in all_cells if args.only in c.name]
  if not selected:
    raise SystemExit(f"--only={args.only!r} matches no cell of grid {grid.name!r} (e.g. {all_cells[0].name}).")
  todo = [c for c in selected if not cells_lib.is_done(out / c.name)]
  if args.dry_run:
    text, _ = plan(grid, seeds, args.data, todo)
    print(text)
    return 0
  out.mkdir(parents=True, exist_ok=True)
  _check_study(out, grid, seeds, args.data)
  command = "python -m ifsq_jax.study " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
  paths.append_text(out / "commands.log", f"{time.strftime('%Y-%m-%d %H:%M:%S')} {command}\n")
  s = grid.sizes
  clf, clf_result = classifier_lib.train(args.data, out / "classifier", s.clf_steps, s.clf_batch, s.clf_width,
                                         log=logging.info)
  logging.info("classifier: test accuracy %.4f", clf_result["test_accuracy"])
  test_images, test_labels = sources.idx_split(args.data, "test")
  import numpy as np  # pylint: disable=g-import-not-at-top
  ref = cells_lib.Reference(clf, np.repeat(test_images[..., None], 3, -1), np.asarray(test_labels, np.int32))
  progress = Progress(todo, grid, len(selected) - len(todo), len(selected))
  eta = sum(progress.estimate(c.kind) for c in todo)
  print(f"{len(todo)} of {len(selected)} cells to run in {out}; estimated {writers.format_eta(eta)}", flush=True)
  flops: dict[str, float] = {}
  ran = 0
  for cell in list(todo):
    if args.max_cells and ran >= args.max_cells:
      print(f"Stopped after {ran} cell(s) (--max_cells); run the same command again to go on.", flush=True)
      return 0
    workdir = out / cell.name
    start, cpu_start = time.time(), _cpu_seconds()
    if cell.kind == "tokenizer":
      result = cells_lib.run_tokenizer(cell, s, args.data, workdir, ref)
    else:
      tok_dir = out / cell.tokenizer.name
      if not cells_lib.is_done(tok_dir):
        raise SystemExit(f"{cell.name} needs its tokenizer {tok_dir}, which is not finished (--only left it out?).")
      key = f"{cell.kind}-{cell.tokenizer_label}"
      if key not in flops:
        flops[key] = grid_lib.generator_step_flops(cell, s, args.data)
      result = cells_lib.run_generator(cell, s, args.data, workdir, tok_dir, ref, flops[key])
    seconds = time.time() - start
    # The CPU time beside the wall time: on a shared machine the wall time says as much about the neighbours.
    result.update(cell=cell.name, kind=cell.kind, bottleneck=cell.bottleneck, bits=cell.bits, seed=cell.seed,
                  seconds=seconds, cpu_seconds=_cpu_seconds() - cpu_start, load_average=os.getloadavg()[0])
    cells_lib.write_json(workdir / cells_lib.RESULT, result)
    ran += 1
    print(progress.finished(cell, seconds), flush=True)
  report.write(out, command=command)
  print(f"Wrote {out / report.REPORT}, {out / report.RESULTS}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())

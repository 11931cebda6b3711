r"""Per-chip memory of the paper's runs on TPU slices, compiled ahead of time on this host.

  pip install -e ".[tpu]"
  python bench/tpu_memory.py [--models dit_l1,llamagen_l] [--topologies v5e:4x4] [--out table.md]

For each model and topology the real train step (frozen tokenizer and DINOv2
inside it, as the configs train) is compiled by libtpu for that slice, with
every parameter, gradient and optimizer state sharded over all chips (mesh
``data=1, fsdp=chips``), at the paper's global batch (one micro-batch). Printed:
the peak memory per chip at that batch (where it does not fit: the temporaries
the compiler asked for plus the state), and the largest per-chip batch: peak
memory is about affine in the batch, so two compiles (one example per chip and
the paper's batch) give the line; ``--verify`` compiles the predicted batch and
the next one, searching on (:func:`ifsq_jax.topology.largest_fitting`, each batch
read off the line through the nearest compiled peaks) where the fit was off, so
the batch reported fits and one more does not. FLOPs are counted
on the step's jaxpr (:mod:`ifsq_jax.flops`). Nothing runs on a TPU; no weights
are needed.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import time

import jax

from ifsq_jax import shapes_only, topology
from ifsq_jax.train import loop, registry

TOKENIZER = "configs/ifsq_f16_d4.py"
MODELS = {  # name: (config file, overrides)
    "tokenizer": (TOKENIZER, {"loss.disc_start": 0}),  # the GAN phase: discriminator and G+GAN steps
    "dit_l1": ("configs/dit_l2.py", {}),
    "dit_xl2": ("configs/dit_l2.py:model=XL,patch=2", {}),
    "llamagen_l": ("configs/llamagen_l.py", {}),
    "llamagen_xl": ("configs/llamagen_l.py:model=XL", {}),
}
TOPOLOGIES = ("v5e:4x4", "v5p:2x2x2", "v4:2x2x2")


def _config(model: str, per_chip: int, chips: int):
  path, overrides = MODELS[model]
  c = shapes_only.load_config_file(path)
  if c.task != "tokenizer":
    c.tokenizer = TOKENIZER
  for key, value in overrides.items():
    group, name = key.split(".")
    c[group][name] = value
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, chips, 1
  c.train.global_batch_size = per_chip * chips
  c.train.grad_accum_steps = 1
  c.train.num_steps = 1000
  return c


def _compile(model: str, per_chip: int, devices: list, fixed: float = 0.0) -> tuple[loop.StepMemory | None, float]:
  """(the step with the largest peak, or None when the compiler refuses it; then the GiB per chip it asked for).

  A refusal names either the temporaries (to which ``fixed``, the GiB of state and batch, is added) or the
  memory used in all; ``math.inf`` when it names neither. The compiler checks the temporaries; a returned step
  may still not fit once its arguments are counted.
  """
  c = _config(model, per_chip, len(devices))
  task = registry.get(c.task)
  start = time.time()
  took = lambda: f"[{time.time() - start:.0f} s]"
  try:
    rows = loop.compile_steps(task.TRAINER, c, schema=task.default_config(), devices=devices)
  except loop.DoesNotFit as e:
    temporaries = re.search(r"required for HLO temporaries \(([\d.]+)G\)", str(e))
    used = re.search(r"Used ([\d.]+)G of [\d.]+G hbm", str(e))  # e.g. v4's "Used 30.96G of 30.75G hbm"
    asked = fixed + float(temporaries.group(1)) if temporaries else float(used.group(1)) if used else math.inf
    print(f"  {model}, {per_chip} per chip: refused, {str(e)} {took()}", file=sys.stderr, flush=True)
    return None, asked
  finally:
    jax.clear_caches()  # a tokenizer compile holds up to 23 GiB of host memory: one at a time
  step = max(rows, key=lambda r: r.peak)
  print(f"  {model}, {per_chip} per chip: peak {step.peak / 2**30:.2f} GiB {took()}", file=sys.stderr, flush=True)
  return step, 0.0


def _cell(model: str, name: str, verify: bool, fit_at: int = 0) -> str:
  """One row of the table: ``model`` on topology ``name``; ``fit_at``: the second per-chip batch of the fit."""
  devices = topology.devices(name)
  chips, hbm = len(devices), topology.HBM_GIB[topology.parse(name)[0]]
  paper = shapes_only.load_config_file(MODELS[model][0]).train.global_batch_size
  per_chip = max(1, paper // chips)
  one, _ = _compile(model, 1, devices)
  if one is None:
    return f"| {model} | {name} ({chips}, fsdp={chips}) | {paper} ({per_chip}) | does not fit at 1 | 0 | |"
  gib = lambda b: b / 2**30
  fixed = gib(one.peak - one.temporaries)  # state and batch: the temporaries grow with the batch
  b2 = fit_at or (per_chip if per_chip > 1 else 2)
  row, asked = _compile(model, b2, devices, fixed)
  peak2 = gib(row.peak) if row is not None else asked
  slope = (peak2 - gib(one.peak)) / (b2 - 1)
  largest = max(1, math.floor(1 + (hbm - gib(one.peak)) / slope)) if slope > 0 else b2
  if verify:  # compiled: the batch reported fits and one more does not
    known = {b: gib(r.peak) if r is not None else math.inf for b, r in ((1, one), (b2, row))}
    def peak(b: int) -> float:
      r = _compile(model, b, devices)[0]
      return gib(r.peak) if r is not None else math.inf
    largest = topology.largest_fitting(peak, hbm, largest, known=known)
  if b2 == per_chip:
    verdict = "" if row is not None and peak2 <= hbm else ": does not fit"
    at_paper = f"{'' if row is not None else '~'}{peak2:.1f} GiB{verdict}" if math.isfinite(peak2) else "refused"
  else:  # the paper's batch from the fit
    at_paper_gib = gib(one.peak) + slope * (per_chip - 1)
    at_paper = f"~{at_paper_gib:.1f} GiB (fit){': does not fit' if at_paper_gib > hbm else ''}"
  tflops = one.flops * per_chip / 1e12
  return (f"| {model} | {name} ({chips}, fsdp={chips}) | {paper} ({per_chip}) | {at_paper} | "
          f"{largest}{' (compiled)' if verify else ' (linear fit)'} | {tflops:.2f} |")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--models", default=",".join(MODELS))
  parser.add_argument("--topologies", default=",".join(TOPOLOGIES))
  parser.add_argument("--verify", action="store_true",
                      help="compile the predicted largest batch and one more (and search on where the fit is off)")
  parser.add_argument("--fit_at", type=int, default=0,
                      help="the second per-chip batch of the fit (default: the paper's); a smaller one compiles "
                           "with less host memory")
  parser.add_argument("--out", default="", help="also write the table (markdown) here")
  args = parser.parse_args()
  if args.fit_at < 0 or args.fit_at == 1:
    parser.error(f"--fit_at={args.fit_at} is not valid: 0 (the paper's batch) or a per-chip batch >= 2")
  jax.config.update("jax_platforms", "cpu")
  lines = ["| model | TPU (chips, mesh) | paper global batch (per chip) | peak per chip at it | "
           "largest per-chip batch | TFLOPs per chip and step (paper batch) |", "|" + "---|" * 6]
  print("\n".join(lines), flush=True)
  for name in args.topologies.split(","):
    for model in args.models.split(","):
      start = time.time()
      lines.append(_cell(model, name, args.verify, args.fit_at))
      print(lines[-1], f"  [{time.time() - start:.0f} s]", flush=True)
  if args.out:
    with open(args.out, "w") as f:
      f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
  main()

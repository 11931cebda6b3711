"""The study's report, rebuilt from the cells' result files: ``REPORT.md``, ``results.json`` and the plots.

Every figure is the mean over the seeds that finished the cell, with the
sample standard deviation and the count (``mean ± sd (n)``). A difference is
called *clear* when the two means differ by more than twice the standard error
of their difference (each side needs at least 2 seeds); the claims are judged
with that rule only, and what it cannot separate is reported as undecided.

S seeds.
"""

from __future__ import annotations

import json
import math
import os
import platform
from typing import Any

import numpy as np
from etils import epath

from ifsq_jax import paths
from ifsq_jax.study import grid as grid_lib

REPORT = "REPORT.md"
RESULTS = "results.json"
TOKENIZER_KEYS = ("psnr", "ssim", "fd_fmnist", "code_usage", "code_entropy_bits", "channel_entropy_ratio")
GENERATOR_KEYS = ("fd_fmnist", "precision", "recall", "label_accuracy")


def machine() -> dict[str, str]:
  """The processor, core count and JAX devices."""
  import jax  # pylint: disable=g-import-not-at-top
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    pass
  return {"cpu": cpu, "cores": str(os.cpu_count()), "devices": ", ".join(sorted({d.device_kind for d in jax.devices()})),
          "jax": jax.__version__, "python": platform.python_version()}


def summary(values: list[float]) -> dict[str, float]:
  """``{"mean", "sd", "n"}`` (sd 0 for one value)."""
  v = np.asarray([x for x in values if x is not None and math.isfinite(x)], np.float64)
  if not len(v):
    return {"mean": float("nan"), "sd": float("nan"), "n": 0}
  return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "n": int(len(v))}


def clear(a: dict[str, float], b: dict[str, float]) -> int:
  """-1 if a's mean is clearly below b's, 1 if clearly above, 0 if not separable (see the module docstring)."""
  if a["n"] < 2 or b["n"] < 2:
    return 0
  se = math.sqrt(a["sd"]**2 / a["n"] + b["sd"]**2 / b["n"])
  d = a["mean"] - b["mean"]
  if abs(d) <= 2 * se:
    return 0
  return -1 if d < 0 else 1


def fmt(s: dict[str, float] | None, digits: int = 2) -> str:
  if not s or not s["n"]:
    return "-"
  return f"{s['mean']:.{digits}f} ± {s['sd']:.{digits}f} ({s['n']})"


def load(out: epath.Path) -> dict[str, Any]:
  """The classifier's and every finished cell's results, and the per-configuration summaries over seeds."""
  cells = []
  for path in sorted(out.glob("seed*/*/result.json")):
    cells.append(json.loads(path.read_text()))
  clf_path = out / "classifier" / "result.json"
  clf = json.loads(clf_path.read_text()) if clf_path.exists() else None
  study_path = out / "study.json"
  study = json.loads(study_path.read_text()) if study_path.exists() else {}
  groups: dict[tuple[str, str, int], list[dict]] = {}
  for c in cells:
    groups.setdefault((c["kind"], c["bottleneck"], c["bits"]), []).append(c)
  configs = []
  for (kind, bottleneck, bits), runs in sorted(groups.items()):
    keys = TOKENIZER_KEYS if kind == "tokenizer" else GENERATOR_KEYS
    entry = {"kind": kind, "bottleneck": bottleneck, "bits": bits, "seeds": sorted(r["seed"] for r in runs),
             "seconds": summary([r["seconds"] for r in runs])}
    entry.update({k: summary([r.get(k) for r in runs]) for k in keys if any(k in r for r in runs)})
    if kind != "tokenizer":
      entry["steps"] = runs[0]["steps"]
      entry["step_flops"] = runs[0]["step_flops"]
      entry["params"] = runs[0]["params"]
      entry["vocab_sizes"] = runs[0].get("vocab_sizes", [])
      curve = {}
      for r in runs:
        for e in r["evals"]:
          curve.setdefault(e["step"], []).append(e["fd_fmnist"])
      entry["curve"] = [{"step": s, "flops": s * entry["step_flops"], "fd_fmnist": summary(v)}
                        for s, v in sorted(curve.items())]
    configs.append(entry)
  return {"study": study, "classifier": clf, "cells": cells, "configs": configs}


def _find(configs, kind, bottleneck, bits=0):
  return next((c for c in configs if c["kind"] == kind and c["bottleneck"] == bottleneck and c["bits"] == bits), None)


def claims(configs: list[dict]) -> list[tuple[str, str, str]]:
  """(claim, verdict, why) for the paper's three claims: verdict is supports / contradicts / cannot decide."""
  out = []
  # (1) iFSQ vs FSQ, for reconstruction and for generation.
  bits = sorted({c["bits"] for c in configs if c["bottleneck"] == "ifsq"})
  wins, losses, ties, notes = 0, 0, 0, []
  for kind in ("tokenizer", "dit", "llamagen"):
    for k in bits:
      a, b = _find(configs, kind, "ifsq", k), _find(configs, kind, "fsq", k)
      if not a or not b or "fd_fmnist" not in a or "fd_fmnist" not in b:
        continue
      verdict = clear(a["fd_fmnist"], b["fd_fmnist"])
      wins += verdict < 0
      losses += verdict > 0
      ties += verdict == 0
      notes.append(f"{kind} {k} bits: iFSQ {a['fd_fmnist']['mean']:.2f} vs FSQ {b['fd_fmnist']['mean']:.2f}"
                   f"{' (clear)' if verdict else ''}")
  why = (f"fd_fmnist (lower is better), iFSQ clearly better in {wins}, clearly worse in {losses}, not separable in "
         f"{ties} comparisons: " + "; ".join(notes)) if notes else "no pair of iFSQ and FSQ cells finished."
  if wins and wins > losses and wins >= ties:
    verdict = "supports"
  elif losses and losses > wins and losses >= ties:
    verdict = "contradicts"
  else:
    verdict = "cannot decide"
  out.append(("(1) iFSQ's bound beats FSQ's tanh bound for reconstruction and generation", verdict, why))

  # (2) Both generators are best at about 4 bits (iFSQ tokenizers).
  optima, details, against = {}, [], 0
  for kind in ("dit", "llamagen"):
    curve = [(k, _find(configs, kind, "ifsq", k)) for k in bits]
    curve = [(k, c["fd_fmnist"]) for k, c in curve if c and "fd_fmnist" in c]
    if len(curve) < 2:
      continue
    best_k, best = min(curve, key=lambda kc: kc[1]["mean"])
    near = [k for k, s in curve if clear(s, best) <= 0]  # widths not clearly worse than the best
    optima[kind] = (best_k, near)
    details.append(f"{kind}: best at {best_k} bits, not clearly worse at {near}")
    against += 4 not in near
  if len(optima) < 2:
    verdict, why = "cannot decide", "needs the iFSQ bit sweep for both generators."
  elif against:
    verdict, why = "contradicts", "; ".join(details)
  elif all(best == 4 for best, _ in optima.values()) and all(len(near) < len(bits) for _, near in optima.values()):
    verdict, why = "supports", "; ".join(details)
  else:
    verdict, why = "cannot decide", "; ".join(details) + " (4 bits is among the best, but not set apart)"
  out.append(("(2) AR and diffusion generators meet at an equilibrium of about 4 bits per dimension", verdict, why))

  # (3) At 4 bits: AR better early, diffusion better at the end of the same FLOP budget.
  d, a = _find(configs, "dit", "ifsq", 4), _find(configs, "llamagen", "ifsq", 4)
  if not d or not a or not d.get("curve") or not a.get("curve"):
    out.append(("(3) AR converges faster early, diffusion reaches a better final quality", "cannot decide",
                "needs DiT and LlamaGen on the 4-bit iFSQ tokenizer."))
    return out
  early = clear(a["curve"][0]["fd_fmnist"], d["curve"][0]["fd_fmnist"])  # -1: AR better early
  final = clear(d["curve"][-1]["fd_fmnist"], a["curve"][-1]["fd_fmnist"])  # -1: DiT better at the end
  why = (f"first evaluation: LlamaGen {fmt(a['curve'][0]['fd_fmnist'])} vs DiT {fmt(d['curve'][0]['fd_fmnist'])}; "
         f"end of the budget: DiT {fmt(d['curve'][-1]['fd_fmnist'])} vs LlamaGen {fmt(a['curve'][-1]['fd_fmnist'])}")
  if early < 0 and final < 0:
    verdict = "supports"
  elif early > 0 or final > 0:
    verdict = "contradicts"
  else:
    verdict = "cannot decide"
  out.append(("(3) AR converges faster early, diffusion reaches a better final quality", verdict, why))
  return out


def _table(rows: list[list[str]]) -> str:
  head, *body = rows
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  lines += ["| " + " | ".join(r) + " |" for r in body]
  return "\n".join(lines)


def _name(bottleneck: str) -> str:
  return {"ifsq": "iFSQ", "fsq": "FSQ (tanh)", "ae": "AE (no quantizer)", "vq": "VQ"}[bottleneck]


def write(out: epath.Path, command: str | None) -> dict[str, Any]:
  """Writes REPORT.md, results.json and the PNGs into ``out``; returns the results."""
  from ifsq_jax.study import plots  # pylint: disable=g-import-not-at-top  (matplotlib only when reporting)
  data = load(out)
  configs = data["configs"]
  data["claims"] = [{"claim": c, "verdict": v, "why": w} for c, v, w in claims(configs)]
  data["machine"] = machine()
  total = sum(c["seconds"] for c in data["cells"]) + (data["classifier"] or {}).get("seconds", 0.0)
  data["wall_seconds"] = total
  if command:
    data["command"] = command
  elif (out / RESULTS).exists():
    data["command"] = json.loads((out / RESULTS).read_text()).get("command", "")
  figures = plots.write_all(out, data)
  paths.write_text(out / RESULTS, json.dumps({k: v for k, v in data.items() if k != "cells"} |
                                              {"cells": data["cells"]}, indent=1))
  paths.write_text(out / REPORT, markdown(data, figures))
  return data


def markdown(data: dict[str, Any], figures: dict[str, str]) -> str:
  """The report's text."""
  configs, study, clf, m = data["configs"], data["study"], data["classifier"], data["machine"]
  sizes = study.get("sizes", {})
  lines = ["# iFSQ at small scale: Fashion-MNIST study", ""]
  lines.append(f"Command: `{data.get('command', '')}`  ")
  lines.append(f"Grid: {study.get('grid', '?')}, {study.get('seeds', '?')} seed(s). Machine: {m['cpu']}, "
               f"{m['cores']} cores visible, JAX {m['jax']} on {m['devices']}. Wall time of the finished cells and "
               f"the classifier: {data['wall_seconds'] / 3600:.2f} h (sum of their measured times).")
  lines.append("")
  lines.append("Every figure is `mean ± sd (seeds)` over the seeds of the whole chain (tokenizer, then its "
               "generators). `fd_fmnist` is the Fréchet distance in the penultimate features of a small CNN "
               "trained on the Fashion-MNIST training split: not FID, and not comparable with FID. Lower is better.")
  if clf:
    lines.append(f"The classifier's test accuracy: {100 * clf['test_accuracy']:.2f} % "
                 f"({clf['test_images']} test images, {clf['train_steps']} steps of {clf['batch']}).")
  lines += ["", "## The paper's claims at this scale", ""]
  for c in data["claims"]:
    lines.append(f"* **{c['claim']}: {c['verdict']}.** {c['why'].rstrip('.')}.")
  lines += ["", "A difference counts as clear when the means differ by more than twice the standard error of the "
            "difference (at least 2 seeds each). Nothing was tuned per cell: every cell of a kind has the same "
            "sizes, steps and learning rate.", ""]
  lines += ["## Tokenizers", "",
            f"f4 (8 x 8 latents), 4 channels, {sizes.get('tok_steps', '?')} steps of {sizes.get('tok_batch', '?')} "
            f"images, L1 loss; metrics on the first {sizes.get('rec_images', '?')} test images (EMA weights).", ""]
  rows = [["tokenizer", "bits", "levels", "PSNR", "SSIM", "rec. fd_fmnist", "code usage", "level entropy / log2 L",
           "time (s)"]]
  for c in configs:
    if c["kind"] != "tokenizer":
      continue
    rows.append([_name(c["bottleneck"]), str(c["bits"] or "-"),
                 str(grid_lib.levels(c["bits"])) if c["bits"] else "-", fmt(c.get("psnr")), fmt(c.get("ssim"), 3),
                 fmt(c.get("fd_fmnist")), fmt(c.get("code_usage"), 4), fmt(c.get("channel_entropy_ratio"), 3),
                 fmt(c["seconds"], 0)])
  lines += [_table(rows), ""]
  lines += ["## Generators", "",
            f"Each trains for the same budget of {sizes.get('budget_flops', 0):.2e} training FLOPs (matmuls and "
            "convolutions of its train step, counted on the jaxpr, the tokenizer's encoding not included), "
            f"evaluated at {sizes.get('eval_fractions')} of it on {sizes.get('gen_samples', '?')} class-balanced "
            "samples of the EMA weights against the test split. `label acc.` is how often the classifier "
            "recognises a sample as the class it was drawn for.", ""]
  rows = [["generator", "tokenizer", "bits", "vocab", "params", "steps", "fd_fmnist", "precision", "recall",
           "label acc.", "time (s)"]]
  for c in configs:
    if c["kind"] == "tokenizer":
      continue
    rows.append(["DiT" if c["kind"] == "dit" else "LlamaGen", _name(c["bottleneck"]), str(c["bits"] or "-"),
                 " + ".join(str(v) for v in c.get("vocab_sizes") or []) or "-", f"{c['params']:,}", str(c["steps"]),
                 fmt(c.get("fd_fmnist")), fmt(c.get("precision"), 3), fmt(c.get("recall"), 3),
                 fmt(c.get("label_accuracy"), 3), fmt(c["seconds"], 0)])
  lines += [_table(rows), ""]
  if figures:
    lines += ["## Plots", ""]
    for title, name in figures.items():
      lines += [f"**{title}**", "", f"![{title}]({name})", ""]
  return "\n".join(lines) + "\n"

"""FSQ (tanh bound) vs iFSQ at 2-5 bits per channel, and an AE, at small scale on CPU.

The paper's tokenizer claim, in miniature: the quickstart tokenizer (f4, d4,
32x32 crops of the embedded photos) is trained with each bottleneck for the same
number of steps from the same seed (identical initial encoder and decoder, the
same batches), with L1 + LPIPS-VGG (no GAN), and evaluated with EMA weights on
the whole validation split (82 crops). Bits b means 2^b + 1 levels per channel.

Writes ``OUT/<run>/`` (each a normal work dir), ``OUT/results.json``,
``OUT/table.md`` and ``OUT/study.png``. Runs that already finished are skipped,
so an interrupted study continues where it stopped.

Usage: ``python bench/tokenizer_study.py [--out out/tokenizer_study] [--steps 400] [--bits 2 3 4 5]``
(about 50 minutes on 2 CPU cores with the defaults).
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("MPLBACKEND", "Agg")

from ifsq_jax.train import tokenizer  # pylint: disable=g-import-not-at-top

COLUMNS = (("psnr", "PSNR", "{:.2f}"), ("ssim", "SSIM", "{:.3f}"), ("lpips_alex", "LPIPS", "{:.3f}"),
           ("fd_vgg16", "fd_vgg16", "{:.1f}"), ("code_usage", "code usage", "{:.2%}"),
           ("channel_entropy_ratio", "level entropy", "{:.3f}"))


def run_config(bottleneck: str, bits: int | None, steps: int):
  c = tokenizer.small_cpu_config(tokenizer.default_config())
  c.seed = 0
  c.model.bottleneck = bottleneck
  if bits is not None:
    c.model.levels = (2**bits + 1,) * 4
  c.train.num_steps = steps
  c.train.log_every = max(1, steps // 4)
  c.train.eval_every = 0  # evaluate once, at the end
  c.train.image_every = 0
  c.checkpoint.every = steps
  c.loss.disc_start = steps + 1  # L1 + LPIPS only: a GAN at this scale adds noise, not signal
  c.data.eval_examples = 1_000_000  # the whole validation split
  return c


def runs(bits_list):
  out = [(f"{name}_{b}bit", bottleneck, b) for b in bits_list for name, bottleneck in (("fsq", "fsq"), ("ifsq", "ifsq"))]
  return out + [("ae", "ae", None)]


def table(results: dict) -> str:
  lines = ["| bottleneck | bits | levels | " + " | ".join(h for _, h, _ in COLUMNS) + " |",
           "|---|---|---|" + "---|" * len(COLUMNS)]
  for name, r in results.items():
    bound = "AE (no quantizer)" if r["bottleneck"] == "ae" else ("iFSQ" if r["bottleneck"] == "ifsq" else "FSQ (tanh)")
    cells = [fmt.format(r[k]) if k in r else "-" for k, _, fmt in COLUMNS]
    bits = str(r["bits"]) if r["bits"] else "-"
    levels = str(2 ** r["bits"] + 1) if r["bits"] else "-"
    lines.append(f"| {bound} | {bits} | {levels} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def plot(results: dict, path: str) -> None:
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  keys = [c for c in COLUMNS if c[0] != "code_usage"]
  fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.4))
  for ax, (k, title, _) in zip(axes, keys):
    for bottleneck, label, style in (("fsq", "FSQ (tanh)", "o--"), ("ifsq", "iFSQ", "s-")):
      pts = sorted((r["bits"], r[k]) for r in results.values() if r["bottleneck"] == bottleneck and k in r)
      if pts:
        ax.plot(*zip(*pts), style, label=label)
    ae = [r[k] for r in results.values() if r["bottleneck"] == "ae" and k in r]
    if ae:
      ax.axhline(ae[0], color="gray", linestyle=":", label="AE")
    ax.set_title(title)
    ax.set_xticks(sorted({r["bits"] for r in results.values() if r["bits"]}))
    ax.set_xlabel("bits per channel")
    ax.grid(alpha=0.3)
  axes[0].legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", default="out/tokenizer_study")
  parser.add_argument("--steps", type=int, default=400)
  parser.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4, 5])
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  results, start = {}, time.time()
  for name, bottleneck, bits in runs(args.bits):
    workdir = os.path.join(args.out, name)
    eval_path = os.path.join(workdir, "eval.json")
    t0 = time.time()
    done = os.path.exists(eval_path) and json.load(open(eval_path))["step"] == args.steps
    if not done:
      tokenizer.train_and_evaluate(run_config(bottleneck, bits, args.steps), workdir)
    with open(eval_path) as f:
      results[name] = {"bottleneck": bottleneck, "bits": bits, **json.load(f)}
    print(f"{name:10s} {'(done before)' if done else f'{time.time() - t0:6.0f} s'}  "
          + "  ".join(f"{h} {fmt.format(results[name][k])}" for k, h, fmt in COLUMNS if k in results[name]),
          flush=True)
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump({"steps": args.steps, "runs": results}, f, indent=2)
  text = table(results)
  with open(os.path.join(args.out, "table.md"), "w") as f:
    f.write(text)
  plot(results, os.path.join(args.out, "study.png"))
  print(f"\n{args.steps} steps per run, {time.time() - start:.0f} s in all\n")
  print(text)


if __name__ == "__main__":
  main()

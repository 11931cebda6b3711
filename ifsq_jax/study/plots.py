"""The study's PNGs: FD against bits (reconstruction and generation), FD against FLOPs at 4 bits, sample grids.

Error bars are one standard deviation over the seeds. Images are small (under
100 kB each) so that a full run's plots can be committed.
"""

from __future__ import annotations

import shutil
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
from etils import epath  # pylint: disable=g-import-not-at-top,wrong-import-position

_STYLE = {"ifsq": ("iFSQ", "-o"), "fsq": ("FSQ (tanh)", "--s")}
_GEN = {"dit": "DiT", "llamagen": "LlamaGen"}


def _series(configs, kind, bottleneck):
  pts = sorted((c["bits"], c["fd_fmnist"]) for c in configs
               if c["kind"] == kind and c["bottleneck"] == bottleneck and c["bits"] and "fd_fmnist" in c)
  return [p[0] for p in pts], [p[1]["mean"] for p in pts], [p[1]["sd"] for p in pts]


def _baseline(ax, configs, kind, bottleneck, label, color):
  c = next((c for c in configs if c["kind"] == kind and c["bottleneck"] == bottleneck and "fd_fmnist" in c), None)
  if c:
    ax.axhline(c["fd_fmnist"]["mean"], color=color, lw=1, ls=":", label=f"{label} ({c['fd_fmnist']['mean']:.1f})")


def _save(fig, path: epath.Path) -> None:
  fig.tight_layout()
  fig.savefig(str(path), dpi=80)
  plt.close(fig)


def write_all(out: epath.Path, data: dict[str, Any]) -> dict[str, str]:
  """Writes the PNGs that the finished cells allow; returns {title: file name}."""
  configs = data["configs"]
  written = {}

  x, y, e = _series(configs, "tokenizer", "ifsq")
  if x:
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for b, (label, style) in _STYLE.items():
      x, y, e = _series(configs, "tokenizer", b)
      if x:
        ax.errorbar(x, y, yerr=e, fmt=style, capsize=3, label=label)
    _baseline(ax, configs, "tokenizer", "ae", "AE", "grey")
    _baseline(ax, configs, "tokenizer", "vq", "VQ", "black")
    ax.set(xlabel="bits per latent dimension", ylabel="reconstruction fd_fmnist", title="Tokenizers")
    ax.legend(fontsize=8)
    _save(fig, out / "rec_fd_vs_bits.png")
    written["Reconstruction fd_fmnist against bits"] = "rec_fd_vs_bits.png"

  if any(c["kind"] != "tokenizer" for c in configs):
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for kind, color in (("dit", "tab:blue"), ("llamagen", "tab:red")):
      for b, (label, style) in _STYLE.items():
        x, y, e = _series(configs, kind, b)
        if x:
          ax.errorbar(x, y, yerr=e, fmt=style, color=color, capsize=3, label=f"{_GEN[kind]}, {label}")
    _baseline(ax, configs, "dit", "ae", "DiT on AE", "tab:blue")
    _baseline(ax, configs, "llamagen", "vq", "LlamaGen on VQ", "tab:red")
    ax.set(xlabel="bits per latent dimension", ylabel="generation fd_fmnist", title="Generators (same FLOPs)")
    ax.legend(fontsize=7)
    _save(fig, out / "gen_fd_vs_bits.png")
    written["Generation fd_fmnist against bits"] = "gen_fd_vs_bits.png"

    curves = [(k, c) for k in ("dit", "llamagen") for c in configs
              if c["kind"] == k and c["bottleneck"] == "ifsq" and c["bits"] == 4 and c.get("curve")]
    if curves:
      fig, ax = plt.subplots(figsize=(5, 3.5))
      for kind, c in curves:
        ax.errorbar([p["flops"] for p in c["curve"]], [p["fd_fmnist"]["mean"] for p in c["curve"]],
                    yerr=[p["fd_fmnist"]["sd"] for p in c["curve"]], fmt="-o", capsize=3, label=_GEN[kind])
      ax.set(xlabel="training FLOPs", ylabel="generation fd_fmnist", title="iFSQ, 4 bits")
      ax.legend(fontsize=8)
      _save(fig, out / "gen_fd_vs_flops.png")
      written["Generation fd_fmnist against training FLOPs (iFSQ, 4 bits)"] = "gen_fd_vs_flops.png"

    for kind in ("dit", "llamagen"):
      cands = [c for c in configs if c["kind"] == kind and "fd_fmnist" in c]
      if not cands:
        continue
      best = min(cands, key=lambda c: c["fd_fmnist"]["mean"])
      label = f"{best['bottleneck']}-{best['bits']}" if best["bits"] else best["bottleneck"]
      src = out / f"seed{best['seeds'][0]}" / f"{kind}-{label}" / "samples.png"
      if src.exists():
        name = f"samples_best_{kind}.png"
        shutil.copyfile(str(src), str(out / name))
        written[f"{_GEN[kind]}'s best cell ({label}, seed {best['seeds'][0]}): one row per class"] = name
  return written

r"""Activation analysis: how evenly the FSQ (tanh) and iFSQ bounds fill their bins.

The paper's argument is that ``2 * sigmoid(1.6 z) - 1`` maps a Gaussian latent to a
near-uniform distribution on (-1, 1), so all L levels are used evenly, while tanh
piles mass into the edge bins. This tool measures it on Gaussian inputs with the
library's own quantizer: for each bound (the original FSQ tanh bound, iFSQ and a
sweep of alpha), input standard deviation and level count it reports

* per-bin occupancy (the share of samples at each level),
* the entropy of the levels in bits, against the ceiling log2 L,
* the largest bin over the uniform share 1 / L,
* the share of the two edge bins together (uniform: 2 / L),
* the RMS rounding error in code units, ``rms(codes - bounded / (L // 2))``.

Usage::

  python -m ifsq_jax.tools.activation_analysis --out DIR

It writes ``DIR/activation_analysis.md`` (Markdown tables), ``.json`` (all numbers,
occupancies included) and ``.png`` (a plot); ``DIR`` may be ``gs://...``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from scipy import special

from ifsq_jax.quantizers.fsq import FSQ
from ifsq_jax.quantizers.stats import channel_histograms

STDS = (0.5, 1.0, 2.0, 4.0)
LEVELS = (5, 9, 17, 33)
ALPHAS = (1.0, 1.2, 1.4, 1.6, 1.8, 2.0, 2.4)


@dataclasses.dataclass(frozen=True)
class Bound:
  """One bound under study."""

  name: str
  bound: str
  alpha: float = 1.6

  def fsq(self, levels: int, channels: int) -> FSQ:
    return FSQ((levels,) * channels, bound=self.bound, alpha=self.alpha)


def default_bounds(alphas: Sequence[float] = ALPHAS) -> list[Bound]:
  return [Bound("FSQ tanh", "tanh")] + [Bound(f"iFSQ alpha={a:g}", "ifsq", a) for a in alphas]


def measure(bound: Bound, levels: int, stds: Sequence[float], samples: int, seed: int = 0) -> list[dict]:
  """Measures one bound and level count for several input scales at once.

  Args:
    bound: The bound.
    levels: L.
    stds: Standard deviations of the Gaussian inputs; each is one channel.
    samples: Samples per standard deviation.
    seed: PRNG seed; the same seed gives the same samples to every bound.

  Returns:
    One dict of metrics per standard deviation.
  """
  fsq = bound.fsq(levels, len(stds))
  half_width = levels // 2

  @jax.jit
  def run(key):
    z = jax.random.normal(key, (samples, len(stds)), jnp.float32) * jnp.asarray(stds, jnp.float32)
    codes = fsq.quantize(z)
    err = codes - fsq.bounded(z) / half_width
    hist = channel_histograms(fsq.codes_to_digits(codes), fsq.levels)
    return hist, jnp.sqrt(jnp.mean(jnp.square(err), axis=0))

  hist, rms = jax.device_get(run(jax.random.key(seed)))
  rows = []
  for i, std in enumerate(stds):
    p = hist[i, :levels].astype(np.float64) / samples
    nz = p[p > 0]
    entropy = float(-(nz * np.log2(nz)).sum())
    rows.append(dict(
        bound=bound.name, alpha=bound.alpha if bound.bound == "ifsq" else None, levels=levels, std=std,
        occupancy=p.tolist(), entropy_bits=entropy, max_entropy_bits=math.log2(levels),
        max_bin_over_uniform=float(p.max() * levels), edge_share=float(p[0] + p[-1]),
        rms_error=float(rms[i])))
  return rows


def expected_occupancy(bound: Bound, levels: int, std: float) -> np.ndarray:
  """Exact occupancy of each level for z ~ N(0, std^2), from the inverse of the bound.

  Level k (in level units, after the offset) collects the z whose bounded value
  lies in [k - 1/2, k + 1/2); the bound is monotone, so these are intervals of z.
  """
  fsq = bound.fsq(levels, 1)
  consts = fsq._channel_consts  # pylint: disable=protected-access
  half_l, offset, shift = (float(consts[k][0]) for k in ("half_l", "offset", "shift"))
  lowest = -(levels // 2)
  between = np.arange(lowest, lowest + levels - 1, dtype=np.float64) + 0.5  # the L - 1 inner bin edges
  y = np.clip((between + offset) / half_l, -1.0, 1.0)  # act(z) (or tanh(z + shift)) at the edges
  with np.errstate(divide="ignore"):
    if bound.bound == "tanh":
      z = np.arctanh(y) - shift
    else:
      z = 2.0 * np.arctanh(y) / bound.alpha
  cdf = 0.5 * (1.0 + special.erf(z / (std * math.sqrt(2.0))))
  return np.diff(np.concatenate([[0.0], cdf, [1.0]]))


def uniform_activation_row(levels: int) -> dict:
  """The ideal the iFSQ bound aims at: act(z) uniform on (-1, 1).

  The two edge bins are half as wide as the others, so they hold 1 / (2 (L - 1))
  each and the inner bins 1 / (L - 1); the rounding error is uniform in every bin.
  """
  p = np.full(levels, 1.0 / (levels - 1))
  p[[0, -1]] /= 2
  return dict(bound="uniform act(z) (ideal)", alpha=None, levels=levels, std=None, occupancy=p.tolist(),
              entropy_bits=float(-(p * np.log2(p)).sum()), max_entropy_bits=math.log2(levels),
              max_bin_over_uniform=float(p.max() * levels), edge_share=float(p[0] + p[-1]),
              rms_error=1.0 / math.sqrt(12.0) / (levels // 2))


def markdown_table(rows: list[dict]) -> str:
  """A Markdown table of the scalar metrics."""
  head = ("| bound | input std | entropy (bits) | of log2 L | max bin / uniform | edge bins share "
          "| RMS rounding error |\n|---|---|---|---|---|---|---|\n")
  lines = []
  for r in rows:
    lines.append(
        f"| {r['bound']} | {'-' if r['std'] is None else format(r['std'], 'g')} | {r['entropy_bits']:.3f} | {r['entropy_bits'] / r['max_entropy_bits']:.1%} "
        f"| {r['max_bin_over_uniform']:.2f} | {r['edge_share']:.1%} | {r['rms_error']:.4f} |")
  return head + "\n".join(lines) + "\n"


def plot(rows: list[dict], path: epath.PathLike, levels: int = 17) -> None:
  """Occupancy at std 1 (tanh vs iFSQ) and entropy against alpha, for one level count."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(12, 4.2))
  sel = [r for r in rows if r["levels"] == levels and r["std"] == 1.0]
  x = np.arange(levels) - levels // 2
  for r, color in zip([s for s in sel if s["bound"] in ("FSQ tanh", "iFSQ alpha=1.6")], ("tab:red", "tab:blue")):
    ax0.plot(x, r["occupancy"], "o-", color=color, label=r["bound"])
  ax0.axhline(1.0 / levels, color="gray", ls="--", label="uniform 1/L")
  ax0.set(xlabel="level", ylabel="share of samples", title=f"Bin occupancy, L={levels}, z ~ N(0, 1)")
  ax0.legend()
  for std in sorted({r["std"] for r in rows}):
    pts = sorted((r["alpha"], r["entropy_bits"]) for r in rows
                 if r["levels"] == levels and r["std"] == std and r["alpha"] is not None)
    line, = ax1.plot(*zip(*pts), "o-", label=f"iFSQ, std {std:g}")
    tanh = [r for r in rows if r["levels"] == levels and r["std"] == std and r["alpha"] is None]
    ax1.axhline(tanh[0]["entropy_bits"], color=line.get_color(), ls=":", lw=1)
  ax1.axhline(math.log2(levels), color="gray", ls="--", label="log2 L")
  ax1.set(xlabel="alpha", ylabel="entropy (bits)", title=f"Entropy vs alpha, L={levels} (dotted: FSQ tanh)")
  ax1.legend(fontsize=8)
  fig.tight_layout()
  with epath.Path(path).open("wb") as f:
    fig.savefig(f, format="png", dpi=120)
  plt.close(fig)


def run_analysis(out: epath.PathLike, samples: int = 2**21, seed: int = 0, levels: Sequence[int] = LEVELS,
                 stds: Sequence[float] = STDS, alphas: Sequence[float] = ALPHAS) -> list[dict]:
  """Runs every measurement and writes the Markdown, JSON and PNG files into ``out``."""
  out = epath.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  rows = []
  for level in levels:
    for bound in default_bounds(alphas):
      rows.extend(measure(bound, level, stds, samples, seed))
  text = [f"# Activation analysis\n\nGaussian inputs z ~ N(0, std^2), {samples} samples per input scale "
          f"(seed {seed}). L bins used equally would give entropy log2 L, max bin / uniform 1.00 and an "
          "edge share of 2 / L. The first row of each table is the ideal the iFSQ bound aims at, a uniform "
          "act(z) on (-1, 1), whose two edge bins are half as wide as the others. The RMS rounding error "
          "is in code units ([-1, 1]).\n"]
  for level in levels:
    text.append(f"\n## L = {level} (log2 L = {math.log2(level):.3f})\n\n")
    text.append(markdown_table([uniform_activation_row(level)] + [r for r in rows if r["levels"] == level]))
  (out / "activation_analysis.md").write_text("".join(text))
  (out / "activation_analysis.json").write_text(json.dumps(rows, indent=1))
  plot(rows, out / "activation_analysis.png", levels=17 if 17 in levels else levels[0])
  return rows


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", required=True, type=epath.Path, help="output directory (local or gs://)")
  parser.add_argument("--samples", type=int, default=2**21, help="samples per input scale")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  if args.samples < 1:
    parser.error(f"--samples={args.samples} must be >= 1")
  run_analysis(args.out, samples=args.samples, seed=args.seed)
  print((args.out / "activation_analysis.md").read_text())
  print(f"Wrote {args.out / 'activation_analysis.md'}, .json and .png")


if __name__ == "__main__":
  main()

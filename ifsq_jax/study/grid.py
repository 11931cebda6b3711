"""The study's grid: its cells, their configs and the FLOP budget that matches the generators.

A cell is one training run with its own work dir: a tokenizer (iFSQ or FSQ at
K bits per channel, L = 2^K + 1 levels, or the AE / VQ baselines), or a
generator (DiT on codes or AE latents, LlamaGen on indices) on the tokenizer of
the same seed. Every config starts from the project's own trainer config
(``train.tokenizer.default_config()`` etc.) with the grid's sizes: nothing
differs between cells of one kind but the bottleneck, its levels and the seed.

FLOP matching: a generator trains ``budget // flops_per_step`` steps, with
``flops_per_step`` the matmul and convolution FLOPs of one train step counted
on its jaxpr (:func:`ifsq_jax.train.loop.step_flops`, as ``--compile_only``
counts them), of the generator alone (the step fed with codes, as from
``ifsq_jax.tools.extract`` shards: the frozen tokenizer's encoding is the same
work per example for both generators and is not part of their training).

K bits, L levels, D latent channels.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile

import ml_collections

from ifsq_jax import config_lib
from ifsq_jax.train import dit, llamagen, loop
from ifsq_jax.train import tokenizer as tokenizer_train

BOUNDS = ("ifsq", "fsq")  # fsq: the original tanh bound
CHANNELS = 4  # latent channels D (the paper's d4)
MAX_SINGLE_VOCAB = 16384  # a larger FSQ codebook is factorized for LlamaGen (2 groups of 2 channels)
FACTORIZED_GROUPS = (2, 2)
VQ_CODEBOOK = 16384  # the VQ baseline's codebook (LlamaGen's VQ-16)
# The EMA the cells are evaluated with. Runs here are 80 to 450 steps: with 0.99 an 83-step run would keep
# 0.99^83 = 43 % of its initial weights; 0.9 (the quickstart tokenizer's) keeps none after a few dozen steps.
EMA_DECAY = 0.9


def levels(bits: int) -> int:
  """Levels per channel for K bits: 2^K + 1, as the official configs count them (K=4: 17)."""
  return 2**bits + 1


@dataclasses.dataclass(frozen=True)
class Sizes:
  """Model sizes, steps and evaluation sizes of one grid (the same for every cell of a kind).

  Attributes:
    tok_width, tok_steps, tok_batch, tok_lr: The tokenizer (f4: 32 px -> 8 x 8 x 4; width of its first level).
    dit_depth, dit_width, dit_heads: The DiT (patch 1 on the 8 x 8 latents).
    ar_depth, ar_width, ar_heads: The LlamaGen GPT (64 tokens).
    gen_batch, gen_lr: Both generators' batch and peak learning rate (warmup ``gen_warmup`` steps).
    budget_flops: Training FLOPs of every generator.
    eval_fractions: Where along the budget each generator is evaluated.
    sample_steps: Euler steps of the DiT sampler.
    gen_samples: Class-balanced samples per generator evaluation.
    rec_images: Test images each tokenizer reconstructs for its metrics.
    clf_steps, clf_batch, clf_width: The classifier of the metric.
  """

  tok_width: int
  tok_steps: int
  tok_batch: int
  tok_lr: float
  dit_depth: int
  dit_width: int
  dit_heads: int
  ar_depth: int
  ar_width: int
  ar_heads: int
  gen_batch: int
  gen_lr: float
  gen_warmup: int
  budget_flops: float
  eval_fractions: tuple[float, ...]
  sample_steps: int
  gen_samples: int
  rec_images: int
  clf_steps: int
  clf_batch: int
  clf_width: int


@dataclasses.dataclass(frozen=True)
class Grid:
  """A named grid: bit widths, bounds, baselines, sizes and the default number of seeds."""

  name: str
  bits: tuple[int, ...]
  bounds: tuple[str, ...]
  baselines: bool  # the AE (for DiT) and VQ (for LlamaGen) tokenizers
  generators: tuple[str, ...]  # "dit", "llamagen"
  sizes: Sizes
  seeds: int
  # Seconds per cell kind on 2 CPU cores, measured (see docs/study.md): the plan's time estimate.
  seconds: dict[str, float] = dataclasses.field(default_factory=dict)


_FULL = Sizes(tok_width=32, tok_steps=150, tok_batch=16, tok_lr=2e-3,
              dit_depth=3, dit_width=96, dit_heads=3, ar_depth=3, ar_width=96, ar_heads=3,
              gen_batch=16, gen_lr=1e-3, gen_warmup=50, budget_flops=1e12,
              eval_fractions=(0.25, 0.5, 1.0), sample_steps=10, gen_samples=300, rec_images=500,
              clf_steps=2500, clf_batch=128, clf_width=16)
_SMOKE = dataclasses.replace(_FULL, tok_steps=100, budget_flops=5e11, eval_fractions=(0.5, 1.0), gen_samples=200,
                             rec_images=300, clf_steps=400)
_TINY = Sizes(tok_width=32, tok_steps=6, tok_batch=8, tok_lr=2e-3, dit_depth=1, dit_width=32, dit_heads=2,
              ar_depth=1, ar_width=32, ar_heads=2, gen_batch=8, gen_lr=1e-3, gen_warmup=0, budget_flops=2e9,
              eval_fractions=(0.5, 1.0), sample_steps=2, gen_samples=20, rec_images=12, clf_steps=4, clf_batch=8,
              clf_width=4)

GRIDS = {
    # Seconds per cell on 2 quiet CPU cores, the means of the committed runs (docs/study.md): the ETA before a
    # kind has finished a cell, and the plan's estimate.
    "full": Grid("full", (2, 3, 4, 5, 6), BOUNDS, True, ("dit", "llamagen"), _FULL, 3,
                 {"tokenizer": 81.0, "dit": 67.0, "llamagen": 64.0}),
    "smoke": Grid("smoke", (4,), BOUNDS, False, ("dit", "llamagen"), _SMOKE, 1,
                  {"tokenizer": 60.0, "dit": 46.0, "llamagen": 51.0}),
    # For tests: one tokenizer and its DiT on a few images.
    "tiny": Grid("tiny", (2,), ("ifsq",), False, ("dit",), _TINY, 1),
}


@dataclasses.dataclass(frozen=True)
class Cell:
  """One run of the grid.

  Attributes:
    kind: "tokenizer", "dit" or "llamagen".
    bottleneck: "ifsq", "fsq", "ae" or "vq" (of the tokenizer the cell is or trains on).
    bits: K for FSQ bottlenecks, 0 for the baselines.
    seed: The chain's seed (the tokenizer's and its generators').
  """

  kind: str
  bottleneck: str
  bits: int
  seed: int

  @property
  def tokenizer_label(self) -> str:
    return f"{self.bottleneck}-{self.bits}" if self.bits else self.bottleneck

  @property
  def name(self) -> str:
    """The work dir under ``--out``: ``seed0/tokenizer-ifsq-4``, ``seed1/dit-ae``."""
    return f"seed{self.seed}/{self.kind}-{self.tokenizer_label}"

  @property
  def tokenizer(self) -> Cell:
    return Cell("tokenizer", self.bottleneck, self.bits, self.seed)


def cells(grid: Grid, seeds: int) -> list[Cell]:
  """Every cell, seed by seed; in a seed the tokenizers come before the generators that need them."""
  out = []
  for seed in range(seeds):
    toks = [Cell("tokenizer", b, k, seed) for k in grid.bits for b in grid.bounds]
    if grid.baselines:
      toks += [Cell("tokenizer", "ae", 0, seed), Cell("tokenizer", "vq", 0, seed)]
    out += toks
    for gen in grid.generators:
      for t in toks:
        if (gen == "dit" and t.bottleneck == "vq") or (gen == "llamagen" and t.bottleneck == "ae"):
          continue  # DiT on codes and AE latents, LlamaGen on indices
        out.append(Cell(gen, t.bottleneck, t.bits, seed))
  return out


def _common(c: ml_collections.ConfigDict, data_dir: str, seed: int) -> None:
  c.seed = seed
  c.data.name = "idx"
  c.data.path = data_dir
  c.data.image_size = 32
  # 32 px stays 32 px, and no flips: Fashion-MNIST's items face one way (shoes to the left), and the test split
  # that samples are compared with has no mirrored ones.
  c.data.transform = "center_crop"
  c.data.workers = 0
  c.data.eval_examples = 8  # the trainers' own evaluation is replaced by the study's
  c.train.compute_dtype = "float32"
  c.train.log_every = 50
  c.train.eval_every = 0
  c.train.image_every = 0
  c.checkpoint.keep = 2


def tokenizer_config(cell: Cell, sizes: Sizes, data_dir: str) -> ml_collections.ConfigDict:
  """An f4, 4-channel tokenizer at 32 px: L1 only (no LPIPS, no GAN), as the quickstart tokenizer."""
  c = tokenizer_train.small_cpu_config(tokenizer_train.default_config())
  _common(c, data_dir, cell.seed)
  c.train.global_batch_size = sizes.tok_batch
  c.train.num_steps = sizes.tok_steps
  c.train.ema_decay = EMA_DECAY
  c.checkpoint.every = max(20, sizes.tok_steps // 4)  # a save costs about a second here
  c.optimizer.lr = sizes.tok_lr
  c.optimizer.warmup_steps = min(20, sizes.tok_steps // 4)
  c.model.hidden_size = sizes.tok_width
  c.model.embed_dim = c.model.z_channels = CHANNELS
  c.model.bottleneck = cell.bottleneck
  if cell.bottleneck in BOUNDS:
    c.model.levels = (levels(cell.bits),) * CHANNELS
  c.model.vq_codebook_size = VQ_CODEBOOK
  c.loss.perceptual_weight = 0.0
  c.loss.disc_start = c.train.num_steps  # no GAN steps
  return c


def generator_config(cell: Cell, sizes: Sizes, data_dir: str, tokenizer_dir: str,
                     num_steps: int = 1) -> ml_collections.ConfigDict:
  """The DiT or LlamaGen config of ``cell`` on the tokenizer in ``tokenizer_dir`` (REPA off: no DINOv2 here)."""
  module = dit if cell.kind == "dit" else llamagen
  c = module.default_config()
  _common(c, data_dir, cell.seed)
  c.tokenizer = tokenizer_dir
  c.train.global_batch_size = sizes.gen_batch
  c.train.num_steps = num_steps
  c.train.ema_decay = EMA_DECAY
  c.checkpoint.every = max(20, num_steps // 4)
  c.optimizer.lr = sizes.gen_lr
  c.optimizer.warmup_steps = min(sizes.gen_warmup, num_steps // 4)
  c.eval.num_samples = 2  # the trainers' own evaluation is replaced by the study's
  c.eval.grid_classes = 10
  c.eval.grid_per_class = 8
  c.sample.batch_size = 100
  if cell.kind == "dit":
    c.model = dit.model_fields("S", 1, depth=sizes.dit_depth, hidden_size=sizes.dit_width, num_heads=sizes.dit_heads,
                               input_size=8, in_channels=CHANNELS, num_classes=10, encoder_depth=1)
    c.sample.num_steps = sizes.sample_steps
  else:
    vocab, groups = llamagen_vocab(cell)
    c.tokens.group_sizes = groups
    c.model = llamagen.model_fields("S", depth=sizes.ar_depth, hidden_size=sizes.ar_width, num_heads=sizes.ar_heads,
                                    grid_size=8, num_classes=10, vocab_sizes=vocab, encoder_depth=1)
    c.eval.cknna = False
  module.set_repa(c, "none")
  return c


def llamagen_vocab(cell: Cell) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(vocab_sizes, tokens.group_sizes): one token per position, factorized 2 x 2 above ``MAX_SINGLE_VOCAB`` codes."""
  if cell.bottleneck == "vq":
    return (VQ_CODEBOOK,), ()
  size = levels(cell.bits)**CHANNELS
  if size <= MAX_SINGLE_VOCAB:
    return (size,), ()
  return tuple(levels(cell.bits)**g for g in FACTORIZED_GROUPS), FACTORIZED_GROUPS


def generator_step_flops(cell: Cell, sizes: Sizes, data_dir: str) -> float:
  """FLOPs of one train step of the generator alone (fed codes), counted on its jaxpr; nothing is read or run."""
  with tempfile.TemporaryDirectory() as tmp:
    # The architecture of the tokenizer is all the abstract run reads (ifsq_jax.shapes_only).
    tok = tokenizer_config(cell.tokenizer, sizes, data_dir)
    with open(f"{tmp}/config.json", "w") as f:
      f.write(config_lib.to_json(tok))
    c = generator_config(cell, sizes, data_dir, tmp)
    c.data.codes_dir = tmp  # the step as fed from extracted codes: the generator's work only
    module = dit if cell.kind == "dit" else llamagen
    run = loop.abstract_run(module.TRAINER, c, module.default_config())
    return sum(loop.step_flops(run).values())


def tokenizer_step_flops(cell: Cell, sizes: Sizes, data_dir: str) -> float:
  c = tokenizer_config(cell, sizes, data_dir)
  run = loop.abstract_run(tokenizer_train.TRAINER, c, tokenizer_train.default_config())
  return loop.step_flops(run)["gen"]


def matched_steps(budget: float, step_flops: float) -> int:
  """Steps that spend at most ``budget`` FLOPs: ``budget // step_flops`` (>= 1)."""
  if step_flops <= 0:
    raise ValueError(f"step_flops={step_flops} must be > 0.")
  return max(1, int(budget // step_flops))


def eval_steps(num_steps: int, fractions: tuple[float, ...]) -> list[int]:
  """The steps at which a generator is evaluated: ``round(f * num_steps)`` for each fraction (distinct, >= 1)."""
  return sorted({max(1, min(num_steps, round(f * num_steps))) for f in fractions})


def round_flops(x: float) -> str:
  """FLOPs as ``1.50e+14``."""
  return f"{x:.2e}"

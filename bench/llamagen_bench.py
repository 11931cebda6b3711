"""LlamaGen speed: a training step and KV-cache sampling in JAX, beside the PyTorch reference in the same run.

For each size (LlamaGen-B by default) on a ``--grid`` x ``--grid`` token grid (the
paper's is 16: 256 tokens; the default 8 keeps the run to minutes on 2 cores), in
float32, JAX and PyTorch with the same weights (the JAX init, its zero output heads
redrawn N(0, 0.02) so that logits are not uniform, written into the torch model with
the converter's key table) and the same inputs. The two frameworks'
timed runs alternate (JAX, PyTorch, JAX, ...), so a slow moment of a shared machine
falls on both; the median of the timed runs is reported. Each train step runs once
before timing (the JAX step is compiled ahead); each sampler runs once before timing
in JAX (its program compiles on that call), not in PyTorch (eager: nothing compiles).

* train step (``--batch`` sequences of ``--vocab``-way tokens, default V = 83,521, one
  iFSQ index): the teacher-forced logits, cross-entropy in float32 (mean over B * N),
  its gradient, gradient clipping at global norm 1.0 and AdamW (lr 1e-4, betas (0.9,
  0.95), weight decay 0.05 on every parameter), with the reference's training dropout
  (0.1 on the embeddings and after attention and FFN; labels dropped to the null class
  with p 0.1). JAX: ``ifsq_jax.models.llamagen.LlamaGen``, one compiled step that
  donates parameters and optimizer state. PyTorch: ``bench/torch_llamagen.py`` (the
  official architecture), ``clip_grad_norm_`` and ``torch.optim.AdamW``. Throughput in
  tokens/s = B * N / step time.
* sampling (``--sample_batch`` labels, guidance ``--cfg`` 2.0, so the models run twice as
  many rows: ``[labels | null]``): the whole sequence with the KV cache, temperature 1,
  ``--top_k`` (0: none) and no top-p, as the paper's sampling config. JAX:
  ``ifsq_jax.sampling.draw.draw`` (the path of in-training evaluation and ``tools.sample``)
  around ``ifsq_jax.sampling.autoregressive.generate``, one compiled program (prefill, then a
  ``lax.fori_loop`` over positions). PyTorch: ``torch_llamagen.generate``, the
  reference's Python loop of single-token steps under ``torch.inference_mode`` (caches of
  ``find_multiple(1 + N, 8)`` positions, each step attending over all of them through
  the causal mask, ``torch.multinomial``). Then the factorized model (``--factorized``
  sub-vocabularies, default [289, 289]) beside ``torch_llamagen.generate_group`` (per
  position one trunk step, then G sub-token steps through the 2 factorized blocks with
  their own cache). Throughput in tokens/s = B * N / time (generated positions of the
  conditional rows; a factorized position is one token of G sub-tokens).

Neither model has the REPA projector (``z_dim=0``): the loss is the cross-entropy alone.
PyTorch runs on as many threads as the process has cores, with ``OMP_WAIT_POLICY=PASSIVE``
unless the environment sets it (spinning OpenMP threads collapse on a shared machine).

FLOPs are counted analytically, matmuls only (embedding gathers, norms, RoPE, softmax,
sampling not counted), a backward pass costing twice the forward:

  forward per sequence = 2 N (depth * P_blk + D * sum_g V_g) + 4 depth N^2 D
                         [+ 2 N G f_depth P_blk + 4 f_depth N G^2 D, factorized]
  train step           = 3 * B * forward per sequence

N tokens, D width, P_blk = 4 D^2 + 3 D F the weights of a block (wqkv, wo, SwiGLU of
hidden F), G sub-token groups and f_depth factorized blocks; 4 depth N^2 D the QK^T and
attention-times-V products of the full N x N score matrix (XLA computes all of it, then
masks). Utilisation is FLOPs / time / a peak: a float32 2048^3 matmul in JAX measured
before and after each size's train steps (the better of the two). Sampling reports
throughput only: each decode step is a (2B, D) row block against every weight matrix
(V = 83,521 makes the head the largest), bound by memory traffic, not by the matmul peak.

On a GPU (``jax.default_backend() == "gpu"``) it times instead the LlamaGen-L bfloat16
train step (``--gpu_batch`` sequences of 256 tokens, V = 83,521) with ``attention_impl``
"xla" and "cudnn" and prints its MFU against the chip's dense bf16 peak (989 TFLOP/s for
an H100 or H200; otherwise a measured bf16 matmul), then LlamaGen-L bfloat16 sampling of
``--gpu_sample_batch`` labels with guidance 2.0 (the reference's per-GPU batch 64) in tokens/s.

Usage: ``python bench/llamagen_bench.py [--sizes B] [--grid 8] [--vocab 83521] [--batch 8] [--steps 3]
[--sample_batch 16] [--sample_runs 2] [--cfg 2.0] [--top_k 0] [--factorized 289,289] [--skip_torch]
[--skip_train] [--gpu_batch 32] [--gpu_sample_batch 64]``
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dit_bench import HOPPER_BF16_PEAK, matmul_peak, median_time
from ifsq_jax import parallel
from ifsq_jax.convert import llamagen as conv
from ifsq_jax.kernels.cpu import host_memory
from ifsq_jax.models.llamagen import LlamaGen, example_inputs, ffn_hidden, llamagen_config
from ifsq_jax.sampling import draw

NUM_CLASSES = 1000


def alternating_medians(cases: dict[str, Callable[[], Any]], runs: int, warmup: int = 1) -> dict[str, float]:
  """{name: median wall seconds} of each ``run()`` (blocked until ready); the cases take turns, run by run."""
  for _ in range(warmup):
    for run in cases.values():
      jax.block_until_ready(run())
  times = {name: [] for name in cases}
  for _ in range(runs):
    for name, run in cases.items():
      start = time.perf_counter()
      jax.block_until_ready(run())
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(t) for name, t in times.items()}


def forward_flops(cfg: dict[str, Any]) -> float:
  """Matmul FLOPs of one sequence's teacher-forced forward pass (the formula in the module docstring)."""
  if cfg.get("z_dim", 0):
    raise ValueError(f"z_dim={cfg['z_dim']}: the bench counts models without the REPA projector (z_dim=0).")
  d, depth, n, vocab = cfg["hidden_size"], cfg["depth"], cfg["grid_size"] ** 2, cfg["vocab_sizes"]
  block = 4 * d * d + 3 * d * ffn_hidden(d)
  flops = 2 * n * (depth * block + d * sum(vocab)) + 4 * depth * n * n * d
  if len(vocab) > 1:
    groups, f_depth = len(vocab), cfg["factorized_depth"]
    flops += 2 * n * groups * f_depth * block + 4 * f_depth * n * groups * groups * d
  return flops


def model_fields(size: str, grid: int, vocab: tuple[int, ...], dtype: Any = jnp.float32, **overrides: Any) -> dict:
  """LlamaGen-{size} fields on a grid x grid sequence without the REPA projector."""
  return llamagen_config(size, vocab_sizes=tuple(vocab), grid_size=grid, z_dim=0, dtype=dtype, **overrides)


def init_params(fields: dict[str, Any]) -> dict[str, Any]:
  """The reference's init (zero heads: perturbed, so that logits and gradients are not trivially uniform), numpy.

  An "rbg" key: XLA's CPU backend compiles threefry draws slowly.
  """
  module = LlamaGen(**fields)
  params = nn.meta.unbox(jax.jit(module.init)(jax.random.key(0, impl="rbg"), *example_inputs(module))["params"])
  params = jax.device_get(params)
  rng = np.random.default_rng(0)
  for name, head in params.items():
    if name.startswith("output"):
      head["kernel"] = (0.02 * rng.standard_normal(head["kernel"].shape)).astype(np.float32)
  return params


def torch_kwargs(fields: dict[str, Any]) -> dict[str, Any]:
  """``TorchLlamaGen`` arguments of the architecture of ``LlamaGen(**fields)``."""
  return dict(dim=fields["hidden_size"], n_layer=fields["depth"], n_head=fields["num_heads"],
              vocab_size=list(fields["vocab_sizes"]), block_size=fields["grid_size"] ** 2,
              num_classes=fields["num_classes"], class_dropout_prob=fields["class_dropout_prob"],
              token_dropout_p=fields["token_dropout_prob"], resid_dropout_p=fields["dropout_prob"],
              ffn_dropout_p=fields["dropout_prob"], factorized_n_layer=fields["factorized_depth"],
              z_dims=[fields["z_dim"]] if fields["z_dim"] else [], encoder_depth=fields["encoder_depth"],
              projector_dim=fields["projector_dim"])


def torch_model(fields: dict[str, Any], params: dict[str, Any]):
  """``TorchLlamaGen`` holding ``params`` (loaded strictly through the converter's key table)."""
  import torch  # pylint: disable=g-import-not-at-top
  import torch_llamagen  # pylint: disable=g-import-not-at-top

  model = torch_llamagen.TorchLlamaGen(**torch_kwargs(fields))
  sd = conv.to_state_dict(params, fields)
  model.load_state_dict({k: torch.tensor(v) for k, v in sd.items()}, strict=True)
  return model


# ------------------------------------------------------------------ train step

def jax_train_step(fields: dict[str, Any], params: dict[str, Any], tokens: np.ndarray,
                   labels: np.ndarray) -> Callable[[], Any]:
  """run() of one compiled JAX train step (donated state) on the batch; compiled before it is returned."""
  module = LlamaGen(**fields)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-4, b1=0.9, b2=0.95, weight_decay=0.05))
  tokens, labels, key = jnp.asarray(tokens), jnp.asarray(labels), jax.random.key(1)

  def train_step(params, opt_state, tokens, labels, key):
    def loss_fn(p):
      logits = module.apply({"params": p}, tokens, labels, train=True, rngs={"dropout": key})
      return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), tokens).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  state = [jax.tree.map(jnp.array, params)]  # copies: the step donates them
  state.append(tx.init(state[0]))
  step = jax.jit(train_step, donate_argnums=(0, 1)).lower(*state, tokens, labels, key).compile()

  def run():
    state[0], state[1], loss = step(*state, tokens, labels, key)
    return loss

  return run


def torch_train_step(model, tokens: np.ndarray, labels: np.ndarray) -> Callable[[], float]:
  """run() of the reference's train step on ``model`` (a TorchLlamaGen)."""
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top

  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
  x, y = torch.from_numpy(tokens).long(), torch.from_numpy(labels).long()

  def run() -> float:
    model.train()
    opt.zero_grad(set_to_none=True)
    logits, _ = model(x, y)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x.reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return float(loss.detach())

  return run


def train_bench(size: str, args: argparse.Namespace, peaks: list[float]) -> None:
  fields = model_fields(size, args.grid, (args.vocab,))
  n = args.grid ** 2
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, args.vocab, (args.batch, n)).astype(np.int32)
  labels = rng.integers(0, NUM_CLASSES, args.batch).astype(np.int32)
  params = init_params(fields)
  cases = {"JAX": jax_train_step(fields, params, tokens, labels)}
  if not args.skip_torch:
    cases["PyTorch"] = torch_train_step(torch_model(fields, params), tokens, labels)
  del params
  seconds = alternating_medians(cases, args.steps)
  peaks.append(matmul_peak(jnp.float32, 2048))
  peak = max(peaks[-2:])
  flops = 3 * args.batch * forward_flops(fields)
  print(f"LlamaGen-{size} train step, batch {args.batch} x {n} tokens, V = {args.vocab}: {flops / 1e9:.0f} GFLOP; "
        f"float32 matmul peak {peak / 1e9:.0f} GFLOP/s")
  _print_rows(seconds, args.batch * n, flops, peak)


# ------------------------------------------------------------------ sampling

def sample_cases(fields: dict[str, Any], params: dict[str, Any], labels: np.ndarray,
                 args: argparse.Namespace) -> dict[str, Callable[[], Any]]:
  """{framework: run()} sampling a whole batch; the JAX program is compiled by a first call here."""
  module, jax_params = LlamaGen(**fields), jax.tree.map(jnp.asarray, params)
  options = dict(cfg_scale=args.cfg, temperature=1.0, top_k=args.top_k)
  # As training and tools.sample draw samples (sampling.draw), on one device.
  mesh, indices = parallel.make_mesh(devices=jax.devices()[:1]), np.arange(len(labels))
  cases = {"JAX": lambda: draw.draw(module, jax_params, indices, labels, 2, options, mesh=mesh)["tokens"]}
  jax.block_until_ready(cases["JAX"]())
  if not args.skip_torch:
    import torch  # pylint: disable=g-import-not-at-top
    import torch_llamagen  # pylint: disable=g-import-not-at-top

    model = torch_model(fields, params).eval()
    sampler = torch_llamagen.generate_group if module.factorized else torch_llamagen.generate
    cond, generator = torch.from_numpy(labels).long(), torch.Generator().manual_seed(2)
    cases["PyTorch"] = lambda: sampler(model, cond, generator=generator, **options)
  return cases


def sample_bench(size: str, args: argparse.Namespace) -> None:
  labels = np.random.default_rng(1).integers(0, NUM_CLASSES, args.sample_batch).astype(np.int32)
  n = args.grid ** 2
  factorized = tuple(int(v) for v in args.factorized.split(",")) if args.factorized else None
  for vocab, sampler in [((args.vocab,), "generate")] + ([(factorized, "generate_group")] if factorized else []):
    fields = model_fields(size, args.grid, vocab)
    cases = sample_cases(fields, init_params(fields), labels, args)
    seconds = alternating_medians(cases, args.sample_runs, warmup=0)
    print(f"LlamaGen-{size} sampling, V = {'+'.join(map(str, vocab))} (torch {sampler}), {args.sample_batch} "
          f"labels x {n} tokens, cfg {args.cfg} ({2 * args.sample_batch if args.cfg > 1 else args.sample_batch} rows)"
          f", top_k {args.top_k}")
    _print_rows(seconds, args.sample_batch * n)
    del cases
    gc.collect()


def _print_rows(seconds: dict[str, float], tokens: int, flops: float | None = None, peak: float | None = None) -> None:
  for framework, t in seconds.items():
    line = f"  {framework:8s} {t:8.3f} s  {tokens / t:9.1f} tokens/s"
    if flops:
      line += f"  {100 * flops / t / peak:5.1f}% of the peak"
    if framework == "JAX" and "PyTorch" in seconds:
      line += f"  JAX {seconds['PyTorch'] / t:.2f}x as fast as PyTorch"
    print(line, flush=True)


# ------------------------------------------------------------------ GPU

def gpu_bench(args: argparse.Namespace) -> None:
  """LlamaGen-L bfloat16: train step MFU with XLA's and cuDNN's attention, then sampling tokens/s."""
  kind = jax.devices()[0].device_kind
  if "H100" in kind or "H200" in kind:
    peak, source = HOPPER_BF16_PEAK, f"the {kind}'s dense bf16 peak (H100/H200 SXM)"
  else:
    peak, source = matmul_peak(jnp.bfloat16, 8192), f"a measured 8192^3 bf16 matmul on {kind}"
  vocab, grid = (83521,), 16
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, vocab[0], (args.gpu_batch, grid * grid)).astype(np.int32)
  labels = rng.integers(0, NUM_CLASSES, args.gpu_batch).astype(np.int32)
  print(f"GPU: LlamaGen-L bfloat16 train step, batch {args.gpu_batch} x 256 tokens, V = 83521; MFU against "
        f"{peak / 1e12:.0f} TFLOP/s, {source}")
  params = None
  for impl in ("xla", "cudnn"):
    fields = model_fields("L", grid, vocab, jnp.bfloat16, attention_impl=impl)
    params = init_params(fields) if params is None else params
    flops = 3 * args.gpu_batch * forward_flops(fields)
    seconds = median_time(jax_train_step(fields, params, tokens, labels), args.steps)
    print(f"  attention_impl={impl:5s} {seconds * 1e3:8.1f} ms  {args.gpu_batch * 256 / seconds:9.0f} tokens/s  "
          f"{flops / 1e12:7.2f} TFLOP  MFU {100 * flops / seconds / peak:5.1f}%", flush=True)
  fields = model_fields("L", grid, vocab, jnp.bfloat16)
  sample_labels = rng.integers(0, NUM_CLASSES, args.gpu_sample_batch).astype(np.int32)
  run = sample_cases(fields, params, sample_labels, argparse.Namespace(**{**vars(args), "skip_torch": True}))["JAX"]
  seconds = median_time(run, args.sample_runs, warmup=0)
  print(f"GPU: LlamaGen-L bfloat16 sampling, {args.gpu_sample_batch} labels x 256 tokens, cfg {args.cfg}: "
        f"{seconds:.2f} s, {args.gpu_sample_batch * 256 / seconds:.0f} tokens/s", flush=True)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--sizes", default="B", help="comma-separated LlamaGen sizes, e.g. S,B")
  parser.add_argument("--grid", type=int, default=8, help="token grid side (16: the paper's 256 tokens)")
  parser.add_argument("--vocab", type=int, default=83521, help="single-token vocabulary (83521: one iFSQ index)")
  parser.add_argument("--batch", type=int, default=8, help="sequences per train step")
  parser.add_argument("--steps", type=int, default=3, help="timed train steps")
  parser.add_argument("--sample_batch", type=int, default=16, help="labels per sampling run")
  parser.add_argument("--sample_runs", type=int, default=2, help="timed sampling runs")
  parser.add_argument("--cfg", type=float, default=2.0, help="guidance scale (the paper's 2.0; 1: none)")
  parser.add_argument("--top_k", type=int, default=0, help="top-k filtering while sampling (0: none, the paper's)")
  parser.add_argument("--factorized", default="289,289", help="sub-vocabularies of the factorized model ('': skip)")
  parser.add_argument("--skip_torch", action="store_true", help="time the JAX model only")
  parser.add_argument("--skip_train", action="store_true", help="time sampling only")
  parser.add_argument("--gpu_batch", type=int, default=32, help="sequences per LlamaGen-L step on a GPU")
  parser.add_argument("--gpu_sample_batch", type=int, default=64, help="labels per LlamaGen-L sampling run on a GPU")
  args = parser.parse_args()
  if not args.skip_torch:
    # Spinning OpenMP threads collapse on a shared machine (see bench/dit_bench.py); ACTIVE in the environment wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch  # pylint: disable=g-import-not-at-top  (after the variable: OpenMP reads it once)
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    print(f"PyTorch {torch.__version__}: {torch.get_num_threads()} threads, "
          f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}")
  kept = host_memory.setup()  # as the entry points
  print(f"LlamaGen, float32, {jax.device_count()} {jax.default_backend()} device(s), jax {jax.__version__}, freed host "
        f"memory kept: {kept}")
  if jax.default_backend() == "gpu":
    gpu_bench(args)
    return
  peaks = [matmul_peak(jnp.float32, 2048)]
  for size in args.sizes.split(","):
    if not args.skip_train:
      train_bench(size, args, peaks)
      gc.collect()
    sample_bench(size, args)


if __name__ == "__main__":
  main()

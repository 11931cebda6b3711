"""Tokenizer speed on CPU: images/s and model FLOP utilisation of the f16-d4 model.

For each image size and dtype it measures, in one run:

* a float32 (or bf16 with float32 accumulation) matmul peak of this machine;
* encode + decode (inference) of the paper's 83.3M-parameter tokenizer;
* an L1-only training step (forward + backward + AdamW), the reference's measured case;
* the full generator step with LPIPS-VGG and the discriminator (adaptive weight included).

FLOPs come from XLA's cost analysis of each program built with ``conv_impl="xla"``
(the program that runs uses oneDNN's convolutions on one CPU device, the same
arithmetic, and XLA counts no FLOPs in foreign calls); utilisation is
FLOPs / step time / the matmul peak measured right before and right after that
case (the better of the two, so a slow moment of a shared machine does not
inflate it; the machine's speed drifts over minutes, so each case is set against
its own neighbouring peaks). Programs are compiled as the entry points compile them
(``ifsq_jax.kernels.cpu.host_memory.setup``: XLA's memory-optimised CPU scheduler).

With ``--xla``, each case is timed again right after with the model's
``conv_impl="xla"`` (XLA's convolutions, the fallback where oneDNN is not used),
and the speed ratio printed.

With ``--torch``, the same float32 encode + decode and L1 step also run in PyTorch
on the official architecture (``bench/torch_tokenizer.py``: NCHW, AdamW, as the
official code), on the same images, right after the JAX cases; their utilisation
uses the same FLOPs (XLA's count for the JAX program of that case) and their own
neighbouring peaks, and the JAX / PyTorch speed ratio is printed.

Usage: ``python bench/tokenizer_bench.py [--sizes 128 256] [--dtypes float32 bfloat16] [--batch 4] [--repeats 3]
[--scheduler memory|concurrency] [--xla] [--torch]``
(each case runs twice to warm up, then ``repeats`` timed times; the best is kept).
Freed host memory is kept in the process, as the entry points do on CPU; ``IFSQ_JAX_KEEP_FREED_MEMORY=0``
measures glibc's own settings (``ifsq_jax.kernels.cpu.host_memory``).
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ifsq_jax import parallel
from ifsq_jax.kernels.cpu import host_memory, onednn
from ifsq_jax.models.tokenizer import Tokenizer, TokenizerConfig
from ifsq_jax.train import tokenizer as trainer_lib

TORCH_CASES = ("encode + decode", "L1 training step")


def timed(fn, *args, repeats: int = 3) -> tuple[float, float]:
  """(best wall seconds, kernel seconds per run on average); two warm-up runs first."""
  for _ in range(2):  # compilation, then the allocator settling (kept memory reaches its peak)
    jax.block_until_ready(fn(*args))
  best = float("inf")
  sys_start = resource.getrusage(resource.RUSAGE_SELF).ru_stime
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - start)
  return best, (resource.getrusage(resource.RUSAGE_SELF).ru_stime - sys_start) / repeats


def flops(xla_fn, *args) -> float:
  """XLA's cost-analysis FLOPs of ``xla_fn``, the case built with ``conv_impl="xla"``.

  XLA counts no FLOPs in a foreign (FFI) call, so the oneDNN convolutions are
  counted as the XLA convolutions they replace: the same arithmetic.
  """
  cost = jax.jit(xla_fn).lower(*args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", 0.0))


def matmul_peak(dtype) -> float:
  n = 2048
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))
  return 2 * n**3 / timed(f, a, a, repeats=5)[0]


def reference_config(cfg: TokenizerConfig) -> dict:
  """TokenizerConfig -> the official model config (run.json) of the same iFSQ model."""
  return dict(hidden_size=cfg.hidden_size, hidden_size_mult=list(cfg.hidden_size_mult),
              num_res_blocks=cfg.num_res_blocks, z_channels=cfg.z_channels, embed_dim=cfg.embed_dim,
              double_z=cfg.double_z, levels=list(cfg.levels), do_simple_bound=True, act_fun="scale_sigmoid_16",
              encoder_spatial_downsample=["Downsample" if d else "" for d in cfg.downsample],
              decoder_spatial_upsample=["Upsample" if u else "" for u in cfg.upsample])


def torch_cases(cfg: TokenizerConfig, images: np.ndarray) -> list[tuple[str, Callable[[], float]]]:
  """The float32 encode + decode and L1 step of the official model in PyTorch, on NHWC ``images``."""
  import torch  # pylint: disable=g-import-not-at-top
  import torch_tokenizer  # pylint: disable=g-import-not-at-top

  torch.manual_seed(0)
  model = torch_tokenizer.ImageFSQVAE(reference_config(cfg))
  x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0)

  def recon() -> float:
    with torch.no_grad():
      return float(model(x)[0][0, 0, 0, 0])

  def l1_step() -> float:
    opt.zero_grad(set_to_none=True)
    loss = (model(x)[0] - x).abs().mean()
    loss.backward()
    opt.step()
    return float(loss.detach())

  return list(zip(TORCH_CASES, (recon, l1_step)))


def jax_cases(size: int, dtype_name: str, conv_impl: str, tx) -> tuple[list[tuple[str, Callable]], Callable]:
  """The three JAX cases (names, step functions) of the f16-d4 tokenizer with ``conv_impl``, and its state init."""
  model = Tokenizer(TokenizerConfig(resolution=size, conv_impl=conv_impl), dtype=jnp.dtype(dtype_name))

  def l1_step(p, o, x):
    loss, g = jax.value_and_grad(lambda p: jnp.mean(jnp.abs(model.apply({"params": p}, x)[0] - x)))(p)
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), o, loss

  cfg = trainer_lib.default_config()
  cfg.data.name, cfg.data.image_size, cfg.data.eval_examples = "embedded", size, 4
  cfg.train.compute_dtype = dtype_name
  cfg.loss.disc_start = 0
  cfg.model.conv_impl = conv_impl
  trainer = trainer_lib.TokenizerTrainer(cfg, parallel.make_mesh(-1, 1, 1))
  cases = [("encode + decode", lambda p, x: model.apply({"params": p}, x)[0]), ("L1 training step", l1_step),
           ("full G step (LPIPS + GAN)", trainer.train_steps()["gen_gan"])]

  def init(x):
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), x[:1]))["params"]
    state = nn.meta.unbox(jax.jit(trainer.init_state)(jax.random.key(0)))
    return params, state, trainer.frozen()

  return cases, init


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
  parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--scheduler", choices=["memory", "concurrency"], default="memory",
                      help="XLA's CPU scheduler: the entry points' memory-optimised one, or XLA's default")
  parser.add_argument("--xla", action="store_true",
                      help="also time each case with XLA's own convolutions instead of oneDNN's")
  parser.add_argument("--torch", action="store_true",
                      help="also run the float32 encode + decode and L1 step of the official model in PyTorch")
  args = parser.parse_args()
  if args.torch:
    import torch  # pylint: disable=g-import-not-at-top
    torch.set_num_threads(len(os.sched_getaffinity(0)))
  if args.scheduler == "concurrency":
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_cpu_enable_concurrency_optimized_scheduler=true"
  kept = host_memory.setup()  # as the entry points; IFSQ_JAX_KEEP_FREED_MEMORY=0 gives freed memory back
  print(f"f16-d4 tokenizer, batch {args.batch}, {jax.device_count()} {jax.default_backend()} device(s), "
        f"jax {jax.__version__}, freed host memory kept: {kept}, {args.scheduler} scheduler")
  for dtype_name in args.dtypes:
    dtype = jnp.dtype(dtype_name)
    peaks = [matmul_peak(dtype)]
    rows = []
    for size in args.sizes:
      x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (args.batch, size, size, 3)), jnp.float32)
      tx = optax.adamw(1e-4, weight_decay=0.0)
      cases, init = jax_cases(size, dtype_name, "auto", tx)
      xla_cases, _ = jax_cases(size, dtype_name, "xla", tx)  # the same parameters and state
      params, state, frozen = init(x)
      case_args = ((params, x), (params, tx.init(params), x), (state, {"image": x}, jax.random.key(1), frozen))
      for (name, fn), (_, xla_fn), fargs in zip(cases, xla_cases, case_args):
        fl = flops(xla_fn, *fargs)
        t, kernel = timed(jax.jit(fn), *fargs, repeats=args.repeats)
        peaks.append(matmul_peak(dtype))
        rows.append((f"{size}x{size} {name}", t, fl, kernel, max(peaks[-2:])))
        print(f"  ({size}x{size} {name}: {t:.2f} s)", flush=True)
        if args.xla and onednn.usable():
          t_xla, kernel = timed(jax.jit(xla_fn), *fargs, repeats=args.repeats)
          peaks.append(matmul_peak(dtype))
          rows.append((f"{size}x{size} {name}, XLA convs", t_xla, fl, kernel, max(peaks[-2:])))
          print(f"  ({size}x{size} {name}, XLA's convolutions: {t_xla:.2f} s, oneDNN {t_xla / t:.2f}x as fast)",
                flush=True)
      if args.torch and dtype == jnp.float32:
        jax_rows = {r[0]: r for r in rows}
        for name, fn in torch_cases(TokenizerConfig(resolution=size), np.asarray(x)):
          t, kernel = timed(fn, repeats=args.repeats)
          peaks.append(matmul_peak(dtype))
          jax_t, fl = jax_rows[f"{size}x{size} {name}"][1:3]
          rows.append((f"{size}x{size} {name}, PyTorch", t, fl, kernel, max(peaks[-2:])))
          print(f"  ({size}x{size} {name}, PyTorch {torch.__version__}: {t:.2f} s, "
                f"JAX {t / jax_t:.2f}x as fast)", flush=True)
    print(f"{dtype_name}: measured matmul peaks {', '.join(f'{p / 1e9:.0f}' for p in peaks)} GFLOP/s "
          "(before the first case and after each)")
    for name, t, fl, kernel, peak in rows:
      print(f"  {name:46s} {t:8.2f} s  {args.batch / t:7.2f} images/s  {fl / 1e9:9.1f} GFLOP  "
            f"{100 * fl / t / peak:5.1f}% of {peak / 1e9:.0f} GFLOP/s  (kernel time {kernel:.2f} s)")


if __name__ == "__main__":
  main()

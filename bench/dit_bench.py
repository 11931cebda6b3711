"""DiT speed: a training step and 50-step Euler sampling in JAX, beside the PyTorch reference in the same run.

For each size (DiT-S/2 and DiT-B/2 by default) at input 16 (f16 latents of
256x256 images: 64 tokens at patch 2), in float32, on the same batch:

* train step: x_t = t x1 + (1 - t) x0, the velocity loss mean((v - (x1 - x0))^2), its
  gradient and an AdamW update (lr 2e-4, betas (0.9, 0.95), no weight decay; the fixed
  position table frozen), labels dropped to the null class with p 0.1, as in training.
  JAX: ``ifsq_jax.models.dit.DiT``, one compiled step that donates parameters and
  optimizer state. PyTorch: ``bench/torch_dit.py`` (the official architecture, NCHW).
* sampling: 50 Euler steps on t = linspace(0, 1, 51) from Gaussian noise (the model never
  runs at t = 1), no guidance. JAX: ``ifsq_jax.sampling.draw.draw`` (the path of in-training
  evaluation and ``tools.sample``: the noise made on the host per sample index, then one
  compiled program with the steps in a ``lax.fori_loop``). PyTorch: a Python loop under
  ``torch.inference_mode``.

Neither model has the REPA projector (``z_dim=0``): the loss here is the velocity MSE alone.
Each train step runs twice first (warm-up), then ``--steps`` timed runs; sampling once, then
``--sample_runs`` timed runs (JAX programs are compiled before); the median is reported.
PyTorch runs on as many threads as the process has cores, with ``OMP_WAIT_POLICY=PASSIVE``
unless the environment sets it (spinning OpenMP threads collapse on a shared machine).

FLOPs are counted analytically, matmuls only (elementwise work, norms and softmax not
counted), with a backward pass costing twice the forward:

  forward per image = 2 * (N * P_tok + P_cond) + 4 * depth * N^2 * D
  train step        = 3 * B * forward per image;   sampling = steps * B * forward per image

N tokens, D width; P_tok the weights of the per-token matmuls (patch embedding, qkv,
attention output, MLP, final linear); P_cond those applied once per image (timestep MLP,
every adaLN); 4 * depth * N^2 * D the QK^T and attention-times-V products. This is the
"6 * params * tokens + attention" rule with the adaLN weights counted once per image, not
per token (they act on the conditioning vector). Utilisation is FLOPs / time / a peak: on
CPU a float32 2048^3 matmul in JAX measured before and after each case (the better of its
two neighbours, so a slow moment of a shared machine does not inflate it).

On a GPU (``jax.default_backend() == "gpu"``) it also times the DiT-L/1 bfloat16 train step
(``--gpu_batch`` images) with ``attention_impl`` "xla" and "cudnn", and prints its MFU
against the chip's dense bf16 peak (989 TFLOP/s for an H100 or H200; otherwise a measured
bf16 matmul); the peak used is printed.

Usage: ``python bench/dit_bench.py [--sizes S/2,B/2] [--batch 16] [--steps 10] [--sample_steps 50]
[--sample_runs 3] [--skip_torch] [--gpu_batch 128]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ifsq_jax import parallel
from ifsq_jax.kernels.cpu import host_memory
from ifsq_jax.models import dit
from ifsq_jax.sampling import draw

INPUT_SIZE = 16
FREQ_DIM = 256  # width of the sinusoidal timestep features
HOPPER_BF16_PEAK = 989e12  # H100 / H200 SXM dense bf16, FLOP/s


def median_time(run: Callable[[], Any], steps: int, warmup: int = 2) -> float:
  """Median wall seconds of ``run()`` (blocked until ready) over ``steps`` runs after ``warmup`` ones."""
  for _ in range(warmup):
    jax.block_until_ready(run())
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(run())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def matmul_peak(dtype: Any, n: int) -> float:
  """FLOP/s of an n^3 matmul in ``dtype`` (float32 accumulation), the best of 5 runs."""
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))
  jax.block_until_ready(f(a, a))
  best = float("inf")
  for _ in range(5):
    start = time.perf_counter()
    jax.block_until_ready(f(a, a))
    best = min(best, time.perf_counter() - start)
  return 2 * n**3 / best


def forward_flops(cfg: dict[str, Any]) -> float:
  """Matmul FLOPs of one image's forward pass (the formula in the module docstring)."""
  if cfg.get("z_dim", 0):
    raise ValueError(f"z_dim={cfg['z_dim']}: the bench counts models without the REPA projector (z_dim=0).")
  d, depth, p, c = cfg["hidden_size"], cfg["depth"], cfg["patch_size"], cfg["in_channels"]
  n = (cfg["input_size"] // p) ** 2
  hidden = int(d * cfg["mlp_ratio"])
  mlp = 3 * d * int(2 / 3 * hidden) if cfg["use_swiglu"] else 2 * d * hidden
  p_tok = 2 * p * p * c * d + depth * (4 * d * d + mlp)  # patch embedding and final linear, qkv + out, MLP
  p_cond = FREQ_DIM * d + d * d + depth * 6 * d * d + 2 * d * d  # timestep MLP, block and final adaLN
  return 2 * (n * p_tok + p_cond) + 4 * depth * n * n * d


def make_batch(batch: int, channels: int, num_classes: int, seed: int = 0) -> dict[str, np.ndarray]:
  """Latents x1, noise x0 (B, H, W, C), logit-normal t (B,) and labels y (B,), as host arrays."""
  rng = np.random.default_rng(seed)
  shape = (batch, INPUT_SIZE, INPUT_SIZE, channels)
  return dict(x1=rng.normal(size=shape).astype(np.float32), x0=rng.normal(size=shape).astype(np.float32),
              t=(1 / (1 + np.exp(-rng.normal(size=batch)))).astype(np.float32),
              y=rng.integers(0, num_classes, batch).astype(np.int32))


def optimizer(params: Any) -> optax.GradientTransformation:
  """The reference's AdamW on trainable parameters; the fixed position table gets no update."""
  labels = jax.tree.map(lambda trainable: "train" if trainable else "frozen", dit.trainable_mask(params))
  return optax.multi_transform({"train": optax.adamw(2e-4, b1=0.9, b2=0.95, weight_decay=0.0),
                                "frozen": optax.set_to_zero()}, labels)


def jax_cases(cfg: dict[str, Any], data: dict[str, np.ndarray], sample_steps: int,
              with_sampling: bool = True) -> dict[str, Callable[[], Any]]:
  """{case name: run()} of the JAX model ``DiT(**cfg)`` on ``data``; each case compiled before it is returned."""
  model = dit.DiT(**cfg)
  batch = {k: jnp.asarray(v) for k, v in data.items()}
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), batch["x1"][:1], batch["t"][:1],
                                             batch["y"][:1])["params"])
  tx = optimizer(params)
  key = jax.random.key(1)

  def train_step(params, opt_state, batch, key):
    x1, x0, t, y = batch["x1"], batch["x0"], batch["t"], batch["y"]

    def loss_fn(p):
      xt = t[:, None, None, None] * x1 + (1 - t[:, None, None, None]) * x0
      v = model.apply({"params": p}, xt, t, y, train=True, rngs={"dropout": key})
      return jnp.mean(jnp.square(v - (x1 - x0)))

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  state = [params, tx.init(params)]
  step = jax.jit(train_step, donate_argnums=(0, 1)).lower(*state, batch, key).compile()

  def run_step():
    state[0], state[1], loss = step(*state, batch, key)
    return loss

  cases = {"train step": run_step}
  if with_sampling:
    cases["sampling"] = sampler(model, sample_steps, state, data["y"])
    jax.block_until_ready(cases["sampling"]())  # compiles
  return cases


def sampler(model: nn.Module, steps: int, state: list, labels: np.ndarray) -> Callable[[], Any]:
  """run() drawing samples 0..B-1 for ``labels`` (B,) as training and tools.sample draw them: Euler ODE, unguided.

  ``sampling.draw.draw`` on one device: the noise of each sample made on the host, then one compiled program.
  """
  mesh = parallel.make_mesh(devices=jax.devices()[:1])
  indices, options = np.arange(len(labels)), {"num_steps": steps}
  return lambda: draw.draw(model, state[0], indices, labels, 0, options, mesh=mesh)["latents"]


def torch_kwargs(cfg: dict[str, Any]) -> dict[str, Any]:
  """``TorchDiT`` arguments of the architecture of ``DiT(**cfg)``."""
  shared = ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "mlp_ratio",
            "class_dropout_prob", "num_classes", "use_qknorm", "use_swiglu", "use_rope", "use_rmsnorm",
            "encoder_depth", "projector_dim")
  return dict({k: cfg[k] for k in shared}, learn_sigma=False, z_dims=[cfg["z_dim"]] if cfg["z_dim"] else [])


def torch_cases(cfg: dict[str, Any], data: dict[str, np.ndarray], sample_steps: int) -> dict[str, Callable[[], Any]]:
  """The same cases for ``bench/torch_dit.py`` built with the same architecture."""
  import torch  # pylint: disable=g-import-not-at-top
  import torch_dit  # pylint: disable=g-import-not-at-top

  torch.manual_seed(0)
  model = torch_dit.TorchDiT(**torch_kwargs(cfg))
  opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4, betas=(0.9, 0.95),
                          weight_decay=0.0)
  nchw = {k: torch.from_numpy(np.ascontiguousarray(v.transpose(0, 3, 1, 2))) for k, v in data.items() if v.ndim == 4}
  x1, x0 = nchw["x1"], nchw["x0"]
  t, y = torch.from_numpy(data["t"]), torch.from_numpy(data["y"]).long()

  def run_step() -> float:
    model.train()
    opt.zero_grad(set_to_none=True)
    tb = t[:, None, None, None]
    loss = torch.mean((model(tb * x1 + (1 - tb) * x0, t, y)[0] - (x1 - x0)) ** 2)
    loss.backward()
    opt.step()
    return float(loss.detach())

  def run_sampling() -> float:
    model.eval()
    ts = torch.linspace(0, 1, sample_steps + 1)
    x = x0.clone()
    with torch.inference_mode():
      for i in range(sample_steps):
        x = x + (ts[i + 1] - ts[i]) * model(x, ts[i].expand(len(x)), y)[0]
    return float(x[0, 0, 0, 0])

  return {"train step": run_step, "sampling": run_sampling}


def cpu_bench(args: argparse.Namespace) -> None:
  """Train step and sampling of each size, JAX then PyTorch, in float32."""
  peaks = [matmul_peak(jnp.float32, 2048)]
  rows = []  # (name, seconds, FLOPs, peak)
  for name in args.sizes.split(","):
    size, patch = name.split("/")
    cfg = dit.dit_config(size, int(patch), input_size=INPUT_SIZE, z_dim=0, dtype=jnp.float32)
    data = make_batch(args.batch, cfg["in_channels"], cfg["num_classes"])
    per_image = forward_flops(cfg)
    flops = {"train step": 3 * args.batch * per_image, "sampling": args.sample_steps * args.batch * per_image}
    frameworks = [("JAX", jax_cases)] + ([] if args.skip_torch else [("PyTorch", torch_cases)])
    for framework, make_cases in frameworks:
      for case, run in make_cases(cfg, data, args.sample_steps).items():
        seconds = (median_time(run, args.steps) if case == "train step" else
                   median_time(run, args.sample_runs, warmup=1))  # compiled ahead: one run warms the allocator
        peaks.append(matmul_peak(jnp.float32, 2048))
        rows.append((f"DiT-{name} {case}, {framework}", seconds, flops[case], max(peaks[-2:])))
        print(f"  (DiT-{name} {case}, {framework}: {seconds:.3f} s)", flush=True)
  print(f"float32 matmul peaks {', '.join(f'{p / 1e9:.0f}' for p in peaks)} GFLOP/s (before the first case and "
        "after each)")
  times = {r[0]: r[1] for r in rows}
  for label, seconds, flops, peak in rows:
    ratio = ""
    if label.endswith("JAX") and label.replace("JAX", "PyTorch") in times:
      ratio = f"  JAX {times[label.replace('JAX', 'PyTorch')] / seconds:.2f}x as fast as PyTorch"
    print(f"  {label:34s} {seconds:8.3f} s  {args.batch / seconds:8.2f} images/s  {flops / 1e9:8.1f} GFLOP  "
          f"{100 * flops / seconds / peak:5.1f}% of {peak / 1e9:.0f} GFLOP/s{ratio}")


def gpu_bench(args: argparse.Namespace) -> None:
  """DiT-L/1 bfloat16 train step MFU with XLA's and cuDNN's attention."""
  kind = jax.devices()[0].device_kind
  if "H100" in kind or "H200" in kind:
    peak, source = HOPPER_BF16_PEAK, f"the {kind}'s dense bf16 peak (H100/H200 SXM)"
  else:
    peak, source = matmul_peak(jnp.bfloat16, 8192), f"a measured 8192^3 bf16 matmul on {kind}"
  print(f"GPU: DiT-L/1 bfloat16 train step, batch {args.gpu_batch}; MFU against {peak / 1e12:.0f} TFLOP/s, "
        f"{source}")
  data = make_batch(args.gpu_batch, 4, 1000)
  for impl in ("xla", "cudnn"):
    cfg = dit.dit_config("L", 1, input_size=INPUT_SIZE, z_dim=0, dtype=jnp.bfloat16, attention_impl=impl)
    flops = 3 * args.gpu_batch * forward_flops(cfg)
    seconds = median_time(jax_cases(cfg, data, args.sample_steps, with_sampling=False)["train step"], args.steps)
    print(f"  attention_impl={impl:5s} {seconds * 1e3:8.1f} ms  {args.gpu_batch / seconds:8.0f} images/s  "
          f"{flops / 1e12:7.2f} TFLOP  MFU {100 * flops / seconds / peak:5.1f}%", flush=True)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--sizes", default="S/2,B/2", help="comma-separated DiT sizes, e.g. S/2,B/2")
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--steps", type=int, default=10, help="timed train steps")
  parser.add_argument("--sample_runs", type=int, default=3, help="timed sampling runs")
  parser.add_argument("--sample_steps", type=int, default=50, help="Euler steps per sample")
  parser.add_argument("--skip_torch", action="store_true", help="time the JAX model only")
  parser.add_argument("--gpu_batch", type=int, default=128, help="images per DiT-L/1 step on a GPU")
  args = parser.parse_args()
  if not args.skip_torch:
    # OpenMP threads that spin while they wait collapse on a shared machine (a DiT-S/2 forward took 0.98 s
    # against 0.27 s passive, at load 6 on 2 cores); OMP_WAIT_POLICY=ACTIVE in the environment restores spinning.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch  # pylint: disable=g-import-not-at-top  (after the variable: OpenMP reads it once)
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    print(f"PyTorch {torch.__version__}: {torch.get_num_threads()} threads, "
          f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}")
  kept = host_memory.setup()  # as the entry points
  print(f"DiT at input {INPUT_SIZE}, batch {args.batch}, {jax.device_count()} {jax.default_backend()} device(s), "
        f"jax {jax.__version__}, freed host memory kept: {kept}; {args.sample_steps} Euler steps per sample")
  if jax.default_backend() == "gpu":
    gpu_bench(args)
  else:
    cpu_bench(args)


if __name__ == "__main__":
  main()

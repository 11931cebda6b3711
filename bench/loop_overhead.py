"""Cost of the shared training loop over the bare jitted step, on CPU, in one run.

Both run the toy task's step (a small FSQ autoencoder, batch 16 at 32x32):

* bare: the jitted step alone on one pre-made batch, in a Python loop;
* loop: ``ifsq_jax.train.loop.run`` with everything on (data pipeline, the
  non-finite guard, logging every 10 steps, an async checkpoint every 100 steps,
  metrics.jsonl and TensorBoard).

Prints steps/s of each (after compilation) and the loop's overhead (aim: < 5%).

Usage: ``python bench/loop_overhead.py [--steps 400]``
"""

from __future__ import annotations

import argparse
import json
import pathlib
import tempfile
import time

import flax.linen as nn
import jax
import numpy as np

from ifsq_jax import parallel
from ifsq_jax.train import loop, toy


def config(steps: int):
  c = toy.default_config()
  c.train.num_steps = steps
  c.train.log_every = 10
  c.checkpoint.every = 100
  c.data.image_size = 32
  c.model.width = 64
  c.model.mlp_width = 256
  return c


def bare_rates(cfg, steps: int, chunk: int = 10) -> list[float]:
  """steps/s of the bare jitted step, per chunk of ``chunk`` steps."""
  mesh = parallel.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
  trainer = toy.ToyTrainer(cfg, mesh)
  key = jax.random.key(0)
  state = jax.jit(lambda k: nn.meta.unbox(trainer.init_state(k)))(key)
  fn = trainer.train_steps()["train"]
  step = jax.jit(lambda st, b, k: fn(st, b, jax.random.fold_in(k, st.step), {}), donate_argnums=(0,))
  s = cfg.data.image_size
  rng = np.random.default_rng(0)
  batch = parallel.global_batch(
      {"image": rng.uniform(-1, 1, (cfg.train.global_batch_size, s, s, 3)).astype(np.float32),
       "label": np.zeros((cfg.train.global_batch_size,), np.int32)}, mesh)
  for _ in range(chunk):  # compile and warm up
    state, metrics = step(state, batch, key)
  jax.block_until_ready(metrics)
  rates = []
  for _ in range(steps // chunk):
    start = time.perf_counter()
    for _ in range(chunk):
      state, metrics = step(state, batch, key)
    jax.block_until_ready(metrics)
    rates.append(chunk / (time.perf_counter() - start))
  return rates


def loop_rates(cfg, workdir: pathlib.Path) -> list[float]:
  """steps/s of the shared loop per logging interval, the first (compilation) dropped."""
  loop.run(toy.ToyTrainer, cfg, workdir, schema=toy.default_config())
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [r["steps_per_sec"] for r in records if "steps_per_sec" in r][1:]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--steps", type=int, default=400)
  args = parser.parse_args()
  cfg = config(args.steps)
  # Bare, loop, bare again: the machine's drift hits both sides.
  bare = bare_rates(cfg, args.steps // 2)
  with tempfile.TemporaryDirectory() as tmp:
    looped = loop_rates(cfg, pathlib.Path(tmp))
  bare += bare_rates(cfg, args.steps // 2)
  print(f"toy step (batch {cfg.train.global_batch_size}, {cfg.data.image_size}x{cfg.data.image_size}), "
        f"{jax.device_count()} {jax.default_backend()} device(s), jax {jax.__version__}, {args.steps} steps each")
  for name, rates in (("bare jitted step", bare), ("shared loop", looped)):
    print(f"  {name:18s} median {np.median(rates):7.2f} steps/s  mean {len(rates) / np.sum(1 / np.asarray(rates)):7.2f}")
  print("  (loop: data pipeline, non-finite guard, logging every 10 steps, async checkpoint every 100)")
  print(f"loop overhead: median {100 * (np.median(bare) / np.median(looped) - 1):.1f}%, "
        f"mean {100 * (np.mean(1 / np.asarray(looped)) / np.mean(1 / np.asarray(bare)) - 1):.1f}% (aim < 5%)")

if __name__ == "__main__":
  main()

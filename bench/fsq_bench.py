"""Throughput of FSQ quantize-plus-indices on CPU, side by side with its peers.

Measures in one run, on the same 2^24 float32 inputs (levels 17, 17, 17, 17):

* ifsq_jax: the jitted ``quantize`` + ``codes_to_indices`` (iFSQ bound, and the
  original tanh bound for a like-for-like comparison);
* vector-quantize-pytorch's FSQ forward (tanh bound, codes and indices), torch on
  CPU with as many threads as XLA uses (all cores);
* a plain copy of the same array (jitted, a fresh output buffer each call).

It prints elements per second and the two ratios: ifsq_jax over the torch peer
(aim: >= 10x) and ifsq_jax time over the copy time (aim: <= 2.5x).

Usage: ``python bench/fsq_bench.py [--log2-n 24] [--repeats 20]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from ifsq_jax import FSQ

LEVELS = (17, 17, 17, 17)


def timeit(fn, repeats: int) -> tuple[float, float]:
  """(best, median) seconds of ``fn()`` after one warm-up call."""
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return min(times), statistics.median(times)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--log2-n", type=int, default=24, help="log2 of the number of float32 inputs")
  parser.add_argument("--repeats", type=int, default=20)
  args = parser.parse_args()

  import torch  # pylint: disable=g-import-not-at-top
  from vector_quantize_pytorch import FSQ as TorchFSQ  # pylint: disable=g-import-not-at-top

  n = 2**args.log2_n
  threads = os.cpu_count() or 1
  torch.set_num_threads(threads)
  x_np = np.random.default_rng(0).standard_normal((n // len(LEVELS), len(LEVELS)), dtype=np.float32)
  x = jax.device_put(x_np)

  def jax_fn(fsq):
    @jax.jit
    def step(z):
      codes = fsq.quantize(z)
      return codes, fsq.codes_to_indices(codes)
    return lambda: jax.block_until_ready(step(x))

  copy = jax.jit(jnp.copy)
  peer = TorchFSQ(levels=list(LEVELS))
  x_t = torch.from_numpy(x_np)[None]  # (1, N, d): the peer's (batch, sequence, dim) layout

  def torch_fn():
    with torch.no_grad():
      peer(x_t)

  # The peer and ours agree on what they compute (the tests check it exactly).
  ours_tanh = jax.device_get(jax_fn(FSQ(LEVELS, bound="tanh"))())
  with torch.no_grad():
    peer_codes, peer_idx = peer(x_t[:, :4096])
  assert np.array_equal(ours_tanh[1][:4096], peer_idx[0].numpy())

  results = {
      "ifsq_jax iFSQ (jit)": timeit(jax_fn(FSQ(LEVELS, bound="ifsq")), args.repeats),
      "ifsq_jax FSQ tanh (jit)": timeit(jax_fn(FSQ(LEVELS, bound="tanh")), args.repeats),
      "vector-quantize-pytorch FSQ": timeit(torch_fn, max(3, args.repeats // 4)),
      "plain copy (jit)": timeit(lambda: jax.block_until_ready(copy(x)), args.repeats),
  }
  print(f"FSQ quantize + indices, {n} float32 elements (2^{args.log2_n}), levels {LEVELS}, "
        f"{threads} CPU threads, jax {jax.__version__}, torch {torch.__version__}")
  for name, (best, median) in results.items():
    print(f"  {name:30s} best {best * 1e3:8.2f} ms  median {median * 1e3:8.2f} ms  {n / best / 1e6:9.1f} M elem/s")
  ours = results["ifsq_jax iFSQ (jit)"][0]
  ours_tanh_t = results["ifsq_jax FSQ tanh (jit)"][0]
  peer_t = results["vector-quantize-pytorch FSQ"][0]
  copy_t = results["plain copy (jit)"][0]
  print(f"speed-up over vector-quantize-pytorch: iFSQ {peer_t / ours:.1f}x, tanh {peer_t / ours_tanh_t:.1f}x "
        "(aim >= 10x)")
  print(f"time over a plain copy: iFSQ {ours / copy_t:.2f}x, tanh {ours_tanh_t / copy_t:.2f}x (aim <= 2.5x)")


if __name__ == "__main__":
  main()

"""Throughput of the evaluation networks on CPU, and the memory of a streaming FID accumulation.

* FID features: InceptionV3FID on 256x256 images (resized to 299 inside), batch 16;
* LPIPS (VGG16 and AlexNet) on 256x256 image pairs, batch 16;
* FID statistics of 10,000 images accumulated batch by batch: peak extra host
  memory (tracemalloc) against the size of keeping all the features.

The Inception weights are random here (speed does not depend on their values;
the pretrained file cannot be downloaded in this environment); LPIPS uses the
bundled pretrained weights.

Usage: ``python bench/metrics_bench.py [--batches 5]``
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

import jax
import numpy as np

from ifsq_jax import eval as ev
from ifsq_jax.nets import inception, lpips


def images_per_sec(fn, args, batch: int, batches: int) -> float:
  jax.block_until_ready(fn(*args))  # compile
  start = time.perf_counter()
  for _ in range(batches):
    out = fn(*args)
  jax.block_until_ready(out)
  return batch * batches / (time.perf_counter() - start)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--batches", type=int, default=5)
  args = parser.parse_args()
  b, size = 16, 256
  rng = np.random.default_rng(0)
  x01 = rng.uniform(0, 1, (b, size, size, 3)).astype(np.float32)
  y = rng.uniform(-1, 1, (b, size, size, 3)).astype(np.float32)
  print(f"CPU, {jax.device_count()} device(s), jax {jax.__version__}, batch {b}, {size}x{size}")

  net = inception.InceptionV3FID()
  variables = jax.jit(net.init)(jax.random.key(0), x01[:1])
  fid_fn = jax.jit(net.apply)
  print(f"  FID Inception features  {images_per_sec(fid_fn, (variables, x01), b, args.batches):7.1f} images/s")
  for name in ("vgg16", "alexnet"):
    params = lpips.load_params(name)
    fn = jax.jit(lpips.LPIPS(name).apply)
    rate = images_per_sec(fn, (params, y, y[::-1]), b, args.batches)
    print(f"  LPIPS {name:8s}          {rate:7.1f} image pairs/s")

  n, chunk = 10_000, 500
  tracemalloc.start()
  stats = ev.FeatureStats(inception.FEATURES)
  for i in range(n // chunk):
    stats.update(np.random.default_rng(i).standard_normal((chunk, inception.FEATURES), dtype=np.float32))
  _ = stats.sigma
  _, peak = tracemalloc.get_traced_memory()
  tracemalloc.stop()
  def mib(images):
    return images * inception.FEATURES * 4 / 2**20

  print(f"  FID statistics of {n} images: peak {peak / 2**20:.1f} MiB of host memory while streaming; it does not "
        f"grow with the count (the float64 accumulator is {(stats.outer.nbytes + stats.sum.nbytes) / 2**20:.1f} MiB). "
        f"Keeping the features instead: {mib(n):.0f} MiB for {n}, {mib(50_000):.0f} MiB for 50,000 images.")


if __name__ == "__main__":
  main()

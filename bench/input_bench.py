r"""The image input pipeline on ImageNet-like JPEGs: the single-threaded reader it replaced vs worker processes.

  python bench/input_bench.py [--images 400] [--size 256] [--steps 12] [--batch 32]

Writes ``--images`` synthetic photos (ImageNet's common sizes, 500 x 375 and
similar, JPEG quality 90, textured so that they compress like photos) into a
temporary image folder, then measures, one after the other in this process, the
examples per second of:

* ``legacy``: the reader before worker processes, re-created here: the whole
  image decoded to an array, converted back to PIL, resized whole, cropped,
  float32, one example after another in one thread;
* ``workers=0``: today's pipeline in one background thread (reduced-scale JPEG
  decoding, only the crop resampled, uint8);
* ``workers=1``, ``workers=2``, ...: worker processes.

for the DiT transform (ADM random crop) and the tokenizer's (resize, crop,
flip). Prints ``key: value`` lines: rates and the ratios the pipeline is judged
by (2 workers / 1 worker, 1 worker / legacy).
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import platform
import tempfile
import time

import numpy as np
from PIL import Image

from ifsq_jax.data import pipeline, sources, transforms

SIZES = ((500, 375), (375, 500), (500, 333), (500, 400), (400, 300), (640, 480), (500, 500), (333, 500))


def write_jpegs(root: str, count: int, classes: int = 8, seed: int = 0) -> None:
  """``count`` photo-like JPEGs in ``root/<class>/``: smooth colour fields, edges and grain."""
  rng = np.random.default_rng(seed)
  for i in range(count):
    w, h = SIZES[i % len(SIZES)]
    coarse = rng.uniform(0, 255, (h // 24 + 2, w // 24 + 2, 3)).astype(np.uint8)
    image = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), np.float32)
    yy, xx = np.mgrid[:h, :w]
    image += 40 * np.sin(xx[..., None] / rng.uniform(3, 12) + yy[..., None] / rng.uniform(3, 12))
    image += rng.normal(0, 12, image.shape)
    folder = os.path.join(root, f"class{i % classes}")
    os.makedirs(folder, exist_ok=True)
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(os.path.join(folder, f"{i:05d}.jpg"), quality=90)


def legacy_example(transform_name: str, size: int):
  """The per-example work before worker processes: full decode, array -> PIL, whole resize, crop, float32."""

  def adm(pil, rng):
    lo, hi = size, math.ceil(size / 0.8)
    smaller = int(rng.integers(lo, hi + 1))
    while min(*pil.size) >= 2 * smaller:
      pil = pil.resize(tuple(x // 2 for x in pil.size), resample=Image.BOX)
    scale = smaller / min(*pil.size)
    return np.asarray(pil.resize(tuple(round(x * scale) for x in pil.size), resample=Image.BICUBIC))

  def tokenizer(pil, rng):
    del rng
    w, h = pil.size
    scale = size / min(w, h)
    return np.asarray(pil.resize((max(size, round(w * scale)), max(size, round(h * scale))), resample=Image.BILINEAR))

  resize = adm if transform_name.startswith("adm") else tokenizer

  def fn(raw, rng):
    image, label = raw  # decoded whole by the source (source[i])
    arr = resize(Image.fromarray(image), rng)
    top = int(rng.integers(0, arr.shape[0] - size + 1))
    left = int(rng.integers(0, arr.shape[1] - size + 1))
    arr = arr[top:top + size, left:left + size]
    if rng.random() < 0.5:
      arr = arr[:, ::-1]
    return {"image": arr.astype(np.float32) / 127.5 - 1.0, "label": np.int32(label)}
  return fn


class _Decoded:
  """A source whose reads decode the whole image (the reader before ``open``)."""

  def __init__(self, source):
    self.source, self.name, self.num_classes = source, source.name, source.num_classes

  def __len__(self):
    return len(self.source)

  def __getitem__(self, i):
    return self.source[i]


def rate(source, example_fn, batch: int, steps: int, workers: int, legacy: bool = False) -> float:
  """Examples per second over ``steps`` batches after two warm-up batches."""
  p = pipeline.Pipeline(source, example_fn, batch, seed=0, prefetch=0 if legacy else 2, workers=workers)
  try:
    for s in range(2):
      p.get(s)
    start = time.perf_counter()
    for s in range(2, 2 + steps):
      p.get(s) if not legacy else p.batch(s)
    return steps * batch / (time.perf_counter() - start)
  finally:
    p.close()


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--images", type=int, default=400)
  parser.add_argument("--size", type=int, default=256)
  parser.add_argument("--steps", type=int, default=12)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
  parser.add_argument("--rounds", type=int, default=3)
  args = parser.parse_args()
  cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")),
             platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
  print(f"cpu: {cpu} ({len(os.sched_getaffinity(0))} cores)")
  with tempfile.TemporaryDirectory() as root:
    write_jpegs(root, args.images)
    source = sources.ImageFolderSource(root, "train")
    sizes = [os.path.getsize(f) for f, _ in source.files]
    print(f"images: {len(source)} JPEGs, quality 90, mean {np.mean(sizes) / 1e3:.0f} kB")
    print(f"rounds: {args.rounds} (each mode once per round, in turn; medians below: the host's speed drifts)")
    for name in ("adm_random_crop", "resize_crop_flip"):
      example = pipeline.image_example(transforms.TRANSFORMS[name], args.size)
      modes = {"legacy": lambda: rate(_Decoded(source), legacy_example(name, args.size), args.batch, args.steps, 0,
                                      legacy=True)}
      for w in [0] + list(args.workers):
        modes[f"workers={w}"] = functools.partial(rate, source, example, args.batch, args.steps, w)
      runs = {m: [] for m in modes}
      for _ in range(args.rounds):
        for m, fn in modes.items():
          runs[m].append(fn())
      rates = {m: float(np.median(v)) for m, v in runs.items()}
      for m, r in rates.items():
        print(f"{name} {m} examples/s: {r:.1f}")
      if "workers=1" in rates:
        print(f"{name} 1 worker / legacy: {rates['workers=1'] / rates['legacy']:.2f}")
        if "workers=2" in rates:
          print(f"{name} 2 workers / 1 worker: {rates['workers=2'] / rates['workers=1']:.2f}")

if __name__ == "__main__":
  main()

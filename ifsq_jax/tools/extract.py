r"""Encode a dataset (and its horizontal flips) with a trained tokenizer, for the DiT and AR trainers.

  python -m ifsq_jax.tools.extract --tokenizer TOKENIZER_DIR --out OUT_DIR \
      [--data embedded|image_folder|tfds] [--path DIR] [--tfds_name imagenet2012 --data_dir DIR] \
      [--split train] [--image_size 256] [--shard_size 1024] [--batch 64] [--no_flip]

Images are center-cropped (ADM's ``center_crop_arr``) to ``image_size``. The output
is ``shard-SSSSS-of-NNNNN.npz`` files of ``shard_size`` examples in dataset order,
each with ``indices`` (n, h, w) (or (n, h, w, G) with factorized groups) int32,
``codes`` (n, h, w, d) float16 for FSQ (exact: k / (L // 2)), float32 otherwise, ``labels``
(n,) int32, ``index`` (n,) the dataset positions, and with flips
``indices_flip`` / ``codes_flip`` of the mirrored images; plus ``meta.json``.

Resumable: a shard is written to a temporary name and renamed when complete, and
shards that exist are skipped, so a killed run continues where it stopped.
Several processes (``jax.distributed``) split the shards: process p writes shards
p, p + P, p + 2P, ...
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Sequence

import jax
import numpy as np

from ifsq_jax import config_lib
from ifsq_jax.kernels.cpu import host_memory
from ifsq_jax.data import pipeline as pipeline_lib
from ifsq_jax.tools import cli
from ifsq_jax.data import sources, transforms
from ifsq_jax.models.pretrained import load_tokenizer


def shard_name(shard: int, count: int) -> str:
  return f"shard-{shard:05d}-of-{count:05d}.npz"


def extract(tokenizer_dir: str, out: str, data_config, split: str = "train", image_size: int = 256,
            shard_size: int = 1024, batch: int = 64, flip: bool = True) -> list[str]:
  """Writes the shards this process owns that do not exist yet; returns the paths written."""
  tok = load_tokenizer(tokenizer_dir)
  source = pipeline_lib.build_source(data_config, split)
  count = math.ceil(len(source) / shard_size)
  os.makedirs(out, exist_ok=True)
  if jax.process_index() == 0:
    meta = {"tokenizer": os.path.abspath(tokenizer_dir), "source": source.name, "examples": len(source),
            "image_size": image_size, "shard_size": shard_size, "shards": count, "flip": flip,
            "num_classes": getattr(source, "num_classes", 0), "levels": list(tok.config.levels),
            "bottleneck": tok.config.bottleneck}
    with open(os.path.join(out, "meta.json"), "w") as f:
      json.dump(meta, f, indent=2)
  fsq = tok.config.bottleneck in ("ifsq", "fsq")
  written = []
  for shard in range(jax.process_index(), count, jax.process_count()):
    path = os.path.join(out, shard_name(shard, count))
    if os.path.exists(path):
      continue
    positions = np.arange(shard * shard_size, min((shard + 1) * shard_size, len(source)))
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("indices", "codes", "labels", "indices_flip", "codes_flip")}
    for start in range(0, len(positions), batch):
      images, labels = [], []
      for i in positions[start:start + batch]:
        image, label = source[int(i)]
        images.append(transforms.center_crop(image, image_size))
        labels.append(label)
      x = np.stack(images)
      parts["labels"].append(np.asarray(labels, np.int32))
      views = (("", x), ("_flip", x[:, :, ::-1])) if flip else (("", x),)
      for suffix, view in views:
        codes = tok.encode(view)
        parts["codes" + suffix].append(np.asarray(codes, np.float16 if fsq else np.float32))
        if fsq:  # indices follow from the codes exactly
          parts["indices" + suffix].append(np.asarray(tok.config.fsq.codes_to_indices(codes), np.int32))
        elif tok.config.bottleneck == "vq":
          parts["indices" + suffix].append(np.asarray(tok.encode_to_indices(view), np.int32))
    arrays = {k: np.concatenate(v) for k, v in parts.items() if v}
    arrays["index"] = positions.astype(np.int64)
    tmp = path + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    written.append(path)
  return written


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--tokenizer", required=True, help="converted tokenizer dir or training work dir")
  parser.add_argument("--out", required=True)
  parser.add_argument("--data", default="embedded", choices=config_lib.DATASETS)
  parser.add_argument("--path", default="", help="image folder root (--data image_folder)")
  parser.add_argument("--tfds_name", default="imagenet2012")
  parser.add_argument("--data_dir", default="")
  parser.add_argument("--manual_dir", default="")
  parser.add_argument("--split", default="train")
  parser.add_argument("--image_size", type=int, default=256)
  parser.add_argument("--shard_size", type=int, default=1024)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--no_flip", action="store_true")
  cli.add_distributed_flags(parser)
  args = parser.parse_args(argv)
  host_memory.setup()  # before JAX starts its threads and reads XLA_FLAGS
  cli.initialize_distributed(args)
  for name in ("image_size", "shard_size", "batch"):
    if getattr(args, name) < 1:
      parser.error(f"--{name}={getattr(args, name)} must be >= 1")
  data = config_lib.base_config().data
  data.name, data.path, data.tfds_name = args.data, args.path, args.tfds_name
  data.data_dir, data.manual_dir = args.data_dir, args.manual_dir
  try:
    written = extract(args.tokenizer, args.out, data, args.split, args.image_size, args.shard_size, args.batch,
                      not args.no_flip)
  except (sources.DataError, FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"Wrote {len(written)} shards to {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

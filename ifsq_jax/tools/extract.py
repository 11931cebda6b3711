r"""Encode a dataset (and its horizontal flips) with a trained tokenizer, for the DiT and AR trainers.

  python -m ifsq_jax.tools.extract --tokenizer TOKENIZER_DIR --out OUT_DIR \
      [--data embedded|image_folder|idx|tfds] [--path DIR] [--tfds_name imagenet2012 --data_dir DIR] \
      [--split train] [--image_size 256] [--shard_size 1024] [--batch 64] [--no_flip]

  python -m ifsq_jax.tools.extract --convert OUT_DIR   # shards of an older extraction (.npz)

Images are center-cropped (ADM's ``center_crop_arr``) to ``image_size``. The output
(``--out``: a local directory or a ``gs://`` URL) is ``shard-SSSSS-of-NNNNN.npy``
files of ``shard_size`` examples in dataset order: each is one uncompressed
array of per-example records (a structured dtype; one example is one contiguous
read) with fields ``indices`` (h, w) (or (h, w, G) with factorized groups)
int32, ``codes`` (h, w, d) float16 for FSQ (exact: k / (L // 2)), float32
otherwise, ``labels`` int32, ``index`` int64 the dataset position, and with
flips ``indices_flip`` / ``codes_flip`` of the mirrored images
(``np.load(shard)["codes"]`` is the (n, h, w, d) array); plus ``meta.json``
(sizes, codebook, tokenizer, classes). An undecodable image is left out of its
shard and listed in ``shard-SSSSS-of-NNNNN.skipped.json``. Read the shards with
:class:`ifsq_jax.data.code_shards.CodeShardSource`.

Resumable: a shard is written to a temporary name and renamed when complete, and
shards that exist are skipped, so a killed run continues where it stopped.
Several processes (``jax.distributed``) split the shards: process p writes shards
p, p + P, p + 2P, ...

Older versions wrote ``shard-*.npz`` files, which a random read has to load
whole; the reader refuses them. ``--convert DIR`` rewrites them in place as
``.npy`` shards (each written under a temporary name, its ``.npz`` removed only
once the ``.npy`` is complete: resumable, run it again after an interruption).
An extraction resumed into a directory of ``.npz`` shards converts the shards
it owns instead of encoding them again.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from typing import Sequence

from etils import epath
import jax
import numpy as np

from ifsq_jax import config_lib, paths
from ifsq_jax.kernels.cpu import host_memory
from ifsq_jax.data import pipeline as pipeline_lib
from ifsq_jax.tools import cli
from ifsq_jax.data import code_shards, sources, transforms
from ifsq_jax.models.pretrained import load_tokenizer


shard_name = code_shards.shard_name

# meta.json fields that must agree when an output directory is extracted into again.
_SAME_EXTRACTION = ("source", "examples", "image_size", "shard_size", "shards", "flip", "bottleneck", "levels",
                    "codes_shape", "index_shape")


def _check_same_extraction(out: epath.Path, meta: dict) -> None:
  path = out / code_shards.META
  if not path.exists():
    return
  old = json.loads(path.read_text())
  differ = [f"{k}: {old[k]!r} there, {meta[k]!r} now" for k in _SAME_EXTRACTION
            if k in old and k in meta and old[k] != meta[k]]
  if differ:
    raise ValueError(f"{out} holds codes of another extraction ({'; '.join(differ)}); extract into a new --out "
                     "directory.")


def extract(tokenizer_dir: str, out: epath.PathLike, data_config, split: str = "train", image_size: int = 256,
            shard_size: int = 1024, batch: int = 64, flip: bool = True) -> list[str]:
  """Writes the shards this process owns that do not exist yet; returns the paths written.

  Undecodable images (:class:`~ifsq_jax.data.sources.DecodeError`) are left out of
  their shard and recorded beside it in ``shard-*.skipped.json`` (rows and the
  skipped dataset positions with the error), with a warning naming them.
  A ``.npz`` shard of an older version of this tool counts as written: it is
  converted in place (:func:`ifsq_jax.data.code_shards.convert_npz_shard`).
  """
  tok = load_tokenizer(tokenizer_dir)
  source = pipeline_lib.build_source(data_config, split)
  count = math.ceil(len(source) / shard_size)
  fsq = tok.config.bottleneck in ("ifsq", "fsq")
  has_indices = fsq or tok.config.bottleneck == "vq"
  view = jax.ShapeDtypeStruct((1, image_size, image_size, 3), np.float32)
  codes_shape = tuple(jax.eval_shape(tok.encode, view).shape[1:])  # (h, w, D)
  index_shape = tuple(jax.eval_shape(tok.encode_to_indices, view).shape[1:]) if has_indices else None
  meta = {"tokenizer": str(paths.absolute(tokenizer_dir)), "source": source.name, "split": split,
          "examples": len(source), "image_size": image_size, "shard_size": shard_size, "shards": count,
          "flip": flip, "num_classes": getattr(source, "num_classes", 0), "levels": list(tok.config.levels),
          "bottleneck": tok.config.bottleneck, "codes_shape": list(codes_shape),
          "codes_dtype": "float16" if fsq else "float32",
          "index_shape": list(index_shape) if index_shape else None,
          "index_sizes": [int(s) for s in tok.config.index_sizes] if has_indices else None}
  out = epath.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  _check_same_extraction(out, meta)
  if jax.process_index() == 0:
    paths.write_text(out / code_shards.META, json.dumps(meta, indent=2))
  empty = {"codes": np.zeros((0,) + codes_shape, np.float16 if fsq else np.float32), "labels": np.zeros((0,), np.int32)}
  if has_indices:
    empty["indices"] = np.zeros((0,) + index_shape, np.int32)
  for k in list(empty):
    if flip and k != "labels":
      empty[k + "_flip"] = empty[k]
  written = []
  for shard in range(jax.process_index(), count, jax.process_count()):
    if (out / shard_name(shard, count)).exists():
      continue
    if code_shards.convert_npz_shard(out, shard, count):
      logging.info("Converted %s of an earlier extraction to the .npy layout.", shard_name(shard, count))
      continue
    positions = np.arange(shard * shard_size, min((shard + 1) * shard_size, len(source)))
    parts: dict[str, list[np.ndarray]] = {k: [] for k in empty}
    kept, skipped = [], []
    for start in range(0, len(positions), batch):
      images, labels = [], []
      for i in positions[start:start + batch]:
        try:
          image, label = source[int(i)]
        except sources.DecodeError as e:
          skipped.append({"index": int(i), "error": str(e)})
          continue
        images.append(transforms.to_float(transforms.center_crop(image, image_size)))
        labels.append(label)
        kept.append(int(i))
      if not images:
        continue
      x = np.stack(images)
      parts["labels"].append(np.asarray(labels, np.int32))
      views = (("", x), ("_flip", x[:, :, ::-1])) if flip else (("", x),)
      for suffix, view in views:
        codes = tok.encode(view)
        parts["codes" + suffix].append(np.asarray(codes, np.float16 if fsq else np.float32))
        if fsq:  # indices follow from the codes exactly
          parts["indices" + suffix].append(np.asarray(tok.config.fsq.codes_to_indices(codes), np.int32))
        elif has_indices:
          parts["indices" + suffix].append(np.asarray(tok.encode_to_indices(view), np.int32))
    arrays = {k: np.concatenate(v) if v else empty[k] for k, v in parts.items()}
    arrays["index"] = np.asarray(kept, np.int64)
    # The side file goes first: a shard that exists always has its row count right.
    side = out / code_shards.skipped_name(shard, count)
    if skipped:
      paths.write_text(side, json.dumps({"rows": len(kept), "skipped": skipped}, indent=2))
      logging.warning("Skipped %d undecodable image(s) in %s: %s", len(skipped), shard_name(shard, count),
                      "; ".join(e["error"] for e in skipped[:3]) + (" ..." if len(skipped) > 3 else ""))
    elif side.exists():
      side.unlink()
    written.append(str(code_shards.write_shard(out, shard, count, arrays)))
  return written


def skipped_images(paths: Sequence[str]) -> int:
  """How many undecodable images the shards at ``paths`` left out (from their ``.skipped.json`` side files)."""
  total = 0
  for path in paths:
    path = epath.Path(path)
    side = path.parent / (path.name.removesuffix(".npy").removesuffix(".npz") + ".skipped.json")
    if side.exists():
      total += len(json.loads(side.read_text())["skipped"])
  return total


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--tokenizer", help="converted tokenizer dir or training work dir")
  parser.add_argument("--out")
  parser.add_argument("--convert", metavar="DIR", default="",
                      help="convert the .npz shards of an older extraction in DIR to .npy shards, in place, and exit")
  parser.add_argument("--data", default="embedded", choices=config_lib.DATASETS)
  parser.add_argument("--path", default="", help="image folder root (--data image_folder) or IDX directory (--data idx)")
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
  if args.convert:
    if args.tokenizer or args.out:
      parser.error("--convert DIR takes no --tokenizer / --out")
    try:
      converted = code_shards.convert_npz(args.convert)
    except sources.DataError as e:
      print(f"error: {e}", file=sys.stderr)
      return 1
    print(f"Converted {len(converted)} shards in {args.convert} to the .npy layout")
    return 0
  if not args.tokenizer or not args.out:
    parser.error("--tokenizer and --out are required (or --convert DIR)")
  host_memory.setup()  # before JAX starts its threads and reads XLA_FLAGS
  cli.initialize_distributed(args)
  for name in ("image_size", "shard_size", "batch"):
    if getattr(args, name) < 1:
      parser.error(f"--{name}={getattr(args, name)} must be >= 1")
  data = config_lib.add_image_data(config_lib.base_config()).data
  data.name, data.path, data.tfds_name = args.data, args.path, args.tfds_name
  data.data_dir, data.manual_dir = args.data_dir, args.manual_dir
  try:
    written = extract(args.tokenizer, args.out, data, args.split, args.image_size, args.shard_size, args.batch,
                      not args.no_flip)
  except (sources.DataError, FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  skipped = skipped_images(written)
  print(f"Wrote {len(written)} shards to {args.out}"
        + (f"; skipped {skipped} undecodable images (listed in shard-*.skipped.json)" if skipped else ""))
  return 0


if __name__ == "__main__":
  sys.exit(main())

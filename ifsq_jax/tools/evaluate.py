r"""Reconstruction metrics of a trained tokenizer on a validation split, written as JSON.

  python -m ifsq_jax.tools.evaluate --tokenizer WORKDIR_OR_DIR [--out FILE.json] \
      [--data embedded|image_folder|tfds] [--path DIR] [--tfds_name imagenet2012 --data_dir DIR] \
      [--split validation] [--image_size 256] [--batch 64] [--max_examples N] \
      [--inception CONVERTED_DIR] [--raw]

EMA weights by default (``--raw`` for the trained weights). Images are
center-cropped (ADM's ``center_crop_arr``) to ``image_size``. The JSON holds
``images``, ``l1``, ``psnr``, ``ssim``, ``lpips_alex``, ``fd_vgg16``, ``rfid``
(with ``--inception``, a directory from ``python -m ifsq_jax.convert inception``)
and, for FSQ / VQ, code usage over the whole split (``code_usage``,
``codes_used``, ``code_entropy_bits``, ``code_perplexity``, FSQ ``level_usage``
and ``channel_entropy_bits``); see :mod:`ifsq_jax.eval.reconstruction`.

With a training work dir the dataset and image size default to the run's own.
The output defaults to ``<tokenizer>/eval_<split>.json``; an existing file is
kept as ``<name>.<n>``. The tokenizer, the output and the data may be ``gs://...``.

Sharding: each batch is split over this process's devices; several processes
(``jax.distributed``: ``--num_processes``, ``--process_id``,
``--coordinator_address``) take contiguous slices of the split and their totals
are summed exactly before process 0 writes the JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Sequence

import jax
import ml_collections
from etils import epath

from ifsq_jax import config_lib, parallel, paths
from ifsq_jax.kernels.cpu import host_memory
from ifsq_jax.data import pipeline as pipeline_lib
from ifsq_jax.tools import cli
from ifsq_jax.data import sources
from ifsq_jax.eval.reconstruction import ReconstructionMetrics, evaluate_split
from ifsq_jax.models.pretrained import LoadedTokenizer, load_tokenizer


def evaluate(tok: LoadedTokenizer, source: sources.Source, image_size: int, batch: int = 64,
             max_examples: int = 0, inception: tuple[Any, Any] | None = None) -> dict[str, Any]:
  """Metrics of ``tok`` on ``source``; every process calls it and gets the totals.

  Args:
    tok: The tokenizer.
    source: Random-access images (uint8 HWC) with labels.
    image_size: Center-crop size.
    batch: Images per process per step (rounded up to divide over the devices).
    max_examples: Evaluate the first ``max_examples`` images (0: all).
    inception: ``(module, variables)`` of the FID Inception, for rFID.

  Returns:
    The dict of :meth:`ifsq_jax.eval.reconstruction.ReconstructionMetrics.result`.
  """
  cfg = tok.config
  mesh = parallel.make_mesh(-1, 1, 1)
  variables = jax.device_put(tok.variables, parallel.replicated(mesh))
  has_indices = cfg.bottleneck in ("ifsq", "fsq", "vq")
  fsq = cfg.fsq if cfg.bottleneck in ("ifsq", "fsq") else None

  @jax.jit
  def reconstruct(v, x):
    recon, out = tok.model.apply(v, x)
    return recon, out.codes if fsq is not None else None, out.indices if has_indices else None

  metrics = ReconstructionMetrics(cfg.index_sizes, fsq=fsq, inception=inception)
  return evaluate_split(lambda x: reconstruct(variables, x), mesh, source, image_size, metrics, batch, max_examples)


def _data_config(args, run_config: ml_collections.ConfigDict | None) -> ml_collections.ConfigDict:
  data = config_lib.add_image_data(config_lib.base_config()).data if run_config is None else run_config.data
  for flag, key in (("data", "name"), ("path", "path"), ("tfds_name", "tfds_name"), ("data_dir", "data_dir"),
                    ("manual_dir", "manual_dir")):
    value = getattr(args, flag)
    if value is not None:
      data[key] = value
  return data


def _run_config(path: str) -> ml_collections.ConfigDict | None:
  root = epath.Path(path)
  for candidate in (root, root.parent.parent):
    if (candidate / "config.json").exists() and not (candidate / "params.safetensors").exists():
      return ml_collections.ConfigDict(json.loads((candidate / "config.json").read_text()))
  return None


def _write(path: epath.Path, result: dict[str, Any]) -> None:
  if path.exists():  # never lose an earlier evaluation
    n = 1
    while path.parent.joinpath(f"{path.name}.{n}").exists():
      n += 1
    path.rename(path.parent / f"{path.name}.{n}")
  paths.write_text(path, json.dumps(result, indent=2))


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--tokenizer", required=True, help="training work dir, checkpoint dir or converted dir")
  parser.add_argument("--out", default=None, help="JSON file (default <tokenizer>/eval_<split>.json)")
  parser.add_argument("--data", default=None, choices=config_lib.DATASETS)
  parser.add_argument("--path", default=None, help="image folder root (--data image_folder)")
  parser.add_argument("--tfds_name", default=None)
  parser.add_argument("--data_dir", default=None)
  parser.add_argument("--manual_dir", default=None)
  parser.add_argument("--split", default="validation")
  parser.add_argument("--image_size", type=int, default=None, help="default: the run's, else 256")
  parser.add_argument("--batch", type=int, default=64, help="images per process per step")
  parser.add_argument("--max_examples", type=int, default=0, help="0: the whole split")
  parser.add_argument("--inception", default=None, help="converted FID Inception dir, for rFID")
  parser.add_argument("--raw", action="store_true", help="trained weights instead of the EMA weights")
  cli.add_distributed_flags(parser)
  args = parser.parse_args(argv)
  host_memory.setup()  # before JAX starts its threads and reads XLA_FLAGS
  cli.initialize_distributed(args)
  for name in ("image_size", "batch"):
    if getattr(args, name) is not None and getattr(args, name) < 1:
      parser.error(f"--{name}={getattr(args, name)} must be >= 1")
  if args.max_examples < 0:
    parser.error(f"--max_examples={args.max_examples} must be >= 0 (0: the whole split)")
  run_config = _run_config(args.tokenizer)
  image_size = args.image_size or (run_config.data.image_size if run_config is not None else 256)
  start = time.time()
  try:
    tok = load_tokenizer(args.tokenizer, ema=not args.raw)
    inception = None
    if args.inception:
      from ifsq_jax.convert import inception as inception_convert  # pylint: disable=g-import-not-at-top
      inception = inception_convert.load(args.inception)
    source = pipeline_lib.build_source(_data_config(args, run_config), args.split)
    result = evaluate(tok, source, image_size, args.batch, args.max_examples, inception)
  except (sources.DataError, FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  result = {"tokenizer": args.tokenizer, "weights": "raw" if args.raw else "ema", "split": args.split,
            "image_size": image_size, **result, "seconds": round(time.time() - start, 1)}
  if jax.process_index() == 0:
    out = epath.Path(args.out) if args.out else epath.Path(args.tokenizer) / f"eval_{args.split}.json"
    _write(out, result)
    print(json.dumps(result, indent=2))
    print(f"Wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

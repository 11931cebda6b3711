r"""Sample a trained generator (DiT or LlamaGen) in resumable shards, packed for ADM's evaluator.

  python -m ifsq_jax.tools.sample --model DIR --out OUT_DIR [--tokenizer DIR] [--num 50000] \
      [--labels balanced|uniform] [--seed 0] [--batch 64] [--shard_size 1000] [--png] \
      [DiT: --steps 250 --method euler|heun --mode ode|sde --shift 0 --cfg_scale 1 --cfg_interval 0,1
            --cfg_channels 0 --latent_scale S]
      [LlamaGen: --cfg_scale 2 --cfg_interval 0,1 --temperature 1 --top_k 0 --top_p 1 --group_sizes 2,2]
      [--num_processes P --process_id p] [--coordinator_address HOST:PORT|auto]

``--model`` is a training work dir (its EMA weights, tokenizer, latent scale and
token groups are read from it) or a converted directory (then name the tokenizer,
and for DiT the latent scale). Labels are class-balanced by default: a seeded
permutation of ``i % num_classes``, so every class has N / C samples
(``uniform`` draws them independently). ``--cfg_interval lo,hi`` guides the
evaluations at sampling progress p with ``lo <= p < hi`` (DiT: the flow time;
LlamaGen: token n / N); ``-1`` means always (:mod:`ifsq_jax.sampling.guidance`).

Output: ``shard-SSSSS-of-NNNNN.npz`` (``arr_0`` uint8 (n, H, W, 3), ``labels``,
``index``), each written under a temporary name and renamed when complete, and
once every shard exists, ``samples_NxHxWx3.npz`` with ``arr_0`` (N, H, W, 3) uint8
and ``arr_1`` the labels, the layout of ADM's sample batches (streamed into the
file, never held in memory whole); ``--png`` also writes ``png/IIIIII.png``.
``meta.json`` records the settings; running again with other settings into the same
directory is an error, so shards of two runs never mix. Every path may be
``gs://...`` (:mod:`ifsq_jax.paths`).

Samples are drawn by :mod:`ifsq_jax.sampling.draw`, as in-training evaluation
draws them. Randomness is a function of (seed, sample index) and the batch layout (fixed by
``--shard_size``, ``--batch`` and the number of local devices, which rounds the
batch up): DiT's initial noise for sample i is drawn from ``(seed, i)``, and a
batch starting at sample i samples with the key ``fold_in(key(seed), i)``
(LlamaGen's row r draws with ``fold_in`` of that key and r). So no two samples
share randomness, whatever the number of processes, and a killed run resumed at
its first missing shard writes exactly what an uninterrupted run writes (finished
shards are never rewritten). Processes with the same number of devices write
the same images as one process would.

Processes split the shards (process p writes shards p, p + P, ...); each samples
on its own devices, so they need no coordinator. Process 0 waits for the others'
shards and packs them. Under ``jax.distributed`` the process index and count are
taken from JAX: ``--coordinator_address HOST:PORT`` (with ``--num_processes`` and
``--process_id``) initialises it, as ``ifsq_jax.main`` does, and
``--coordinator_address auto`` lets JAX detect a TPU pod or SLURM job. Processes
that finish first wait for the rest in JAX's shutdown barrier, for up to
``SHUTDOWN_WAIT_S`` (JAX's default of 5 minutes could end them with a timeout
error while process 0 still samples its last shard and packs).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import sys
import time
import zipfile
from typing import Any, Sequence

import jax
import numpy as np
from etils import epath
from PIL import Image

from ifsq_jax import parallel, paths
from ifsq_jax.eval import fid
from ifsq_jax.models import loading
from ifsq_jax.models.dit import DiT
from ifsq_jax.models.llamagen import LlamaGen
from ifsq_jax.models.pretrained import LoadedTokenizer, load_tokenizer
from ifsq_jax.sampling import draw, flow

LABEL_KINDS = ("balanced", "uniform")
META = "meta.json"
SHUTDOWN_WAIT_S = 6 * 3600  # JAX's default (300 s) is shorter than a shard of a large model plus the packing


def shard_name(shard: int, count: int) -> str:
  return f"shard-{shard:05d}-of-{count:05d}.npz"


def make_labels(num: int, num_classes: int, seed: int, kind: str = "balanced") -> np.ndarray:
  """(num,) int32 labels: a seeded permutation of ``i % num_classes`` (balanced) or independent uniform draws."""
  rng = np.random.default_rng([seed, 0x1abe1])
  if kind == "balanced":
    return rng.permutation(np.arange(num) % num_classes).astype(np.int32)
  if kind == "uniform":
    return rng.integers(0, num_classes, num).astype(np.int32)
  raise ValueError(f"labels={kind!r} is not valid; use one of {LABEL_KINDS}.")


class Generator:
  """A trained generator with its tokenizer: ``images(indices, labels)`` -> uint8 (B, H, W, 3).

  Samples are drawn by :func:`ifsq_jax.sampling.draw.draw` (the path of
  in-training evaluation too), so their randomness is that module's.

  Args:
    module: DiT or LlamaGen.
    params: Its params.
    tokenizer: The tokenizer its codes or indices belong to.
    options: Sampler options (:func:`ifsq_jax.sampling.draw.options`; see ``main``'s flags).
    latent_scale: DiT only: the scale its codes were trained at.
    seed: The run's seed.
    devices: Devices the batch is split over.
  """

  def __init__(self, module: DiT | LlamaGen, params: Any, tokenizer: LoadedTokenizer, options: dict[str, Any],
               latent_scale: float | None, seed: int, devices: Sequence[Any]):
    self.module, self.tokenizer, self.seed = module, tokenizer, seed
    self.options = draw.options(module, options)
    self.mesh = parallel.make_mesh(devices=devices)
    self.params = parallel.replicate(params, self.mesh)
    self.latent_scale = latent_scale
    self.decoder = draw.Decoder(tokenizer.model, parallel.replicate(tokenizer.variables, self.mesh), latent_scale)
    self.kind = "dit" if isinstance(module, DiT) else "llamagen"

  def images(self, indices: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """uint8 images (B, H, W, 3) of samples ``indices`` (B,) with ``labels`` (B,); B a multiple of the devices."""
    out = draw.draw(self.module, self.params, indices, labels, self.seed, self.options, mesh=self.mesh,
                    decoder=self.decoder)
    return fid.to_uint8(parallel.to_host(out["images"]))


def _run_config(model_dir: epath.PathLike) -> dict[str, Any] | None:
  path = epath.Path(model_dir) / "config.json"
  if loading.is_converted(model_dir) or not path.exists():
    return None
  return json.loads(path.read_text())


def open_generator(model_dir: str, options: dict[str, Any], *, tokenizer: str = "", latent_scale: float = 0.0,
                   group_sizes: Sequence[int] = (), seed: int = 0, devices: Sequence[Any] | None = None) -> Generator:
  """The generator in ``model_dir`` (work dir or converted) with its tokenizer, ready to sample."""
  module, params = loading.load_model(model_dir)
  run = _run_config(model_dir)
  tokenizer = tokenizer or (run or {}).get("tokenizer", "")
  if not tokenizer:
    raise ValueError(f"{model_dir} is a converted model: name its tokenizer with --tokenizer DIR.")
  tok = load_tokenizer(tokenizer)
  if isinstance(module, LlamaGen):
    groups = tuple(group_sizes) or tuple(((run or {}).get("tokens") or {}).get("group_sizes") or ())
    if groups:
      tok = draw.regroup(tok, groups)
    if tuple(tok.config.index_sizes) != tuple(module.vocab_sizes):
      raise ValueError(f"the tokenizer {tokenizer} gives indices of {tuple(tok.config.index_sizes)} codes, the model "
                       f"predicts {tuple(module.vocab_sizes)}; split FSQ indices with --group_sizes (e.g. 2,2).")
    scale = None
  else:
    scale = latent_scale or _workdir_latent_scale(model_dir)
    if not scale:
      raise ValueError(f"{model_dir} is a converted DiT: pass the latent scale its codes were trained at with "
                       "--latent_scale (a work dir keeps it in latent.json).")
  return Generator(module, params, tok, options, scale, seed, devices or jax.local_devices())


def _workdir_latent_scale(model_dir: epath.PathLike) -> float:
  path = epath.Path(model_dir) / "latent.json"
  if not path.exists():
    return 0.0
  return float(json.loads(path.read_text())["latent_scale"])


def _check_meta(out: epath.PathLike, meta: dict[str, Any]) -> None:
  path = epath.Path(out) / META
  meta = json.loads(json.dumps(meta))  # as read back: tuples are lists
  if path.exists():
    old = json.loads(path.read_text())
    options = old.get("options") or {}
    if "steps" in options:  # the DiT's num_steps, as meta.json of earlier versions names it
      options["num_steps"] = options.pop("steps")
    differ = [f"{k}: {old.get(k)!r} there, {meta[k]!r} now" for k in meta if old.get(k) != meta[k]]
    if differ:
      raise ValueError(f"{out} holds samples of other settings ({'; '.join(differ)}); sample into a new --out "
                       "directory.")
    return
  paths.write_text(path, json.dumps(meta, indent=2))


def write_shards(gen: Generator, out: epath.PathLike, labels: np.ndarray, *, shard_size: int, batch: int, png: bool = False,
                 process_id: int = 0, num_processes: int = 1, max_shards: int | None = None) -> list[int]:
  """Writes this process's missing shards (p, p + P, ...); returns the shards written.

  ``max_shards`` stops after that many (a deliberate interruption, for tests).
  """
  out = epath.Path(out)
  n = len(labels)
  count = math.ceil(n / shard_size)
  per_call = draw.per_call(batch, shard_size, gen.mesh)  # fixed by --batch and --shard_size: the batch layout
  mine = [s for s in range(process_id, count, num_processes)]
  todo = [s for s in mine if not (out / shard_name(s, count)).exists()]
  logging.info("Process %d of %d: %d of its %d shards to write (%d images each)", process_id, num_processes,
               len(todo), len(mine), shard_size)
  written, start_time, done_images = [], time.time(), 0
  for s in todo[:max_shards]:
    lo, hi = s * shard_size, min(n, (s + 1) * shard_size)
    images = np.concatenate([gen.images(idx, y)[:keep] for idx, y, keep in draw.calls(lo, hi, per_call, labels)])
    with paths.atomic_open(out / shard_name(s, count)) as f:
      np.savez(f, arr_0=images, labels=labels[lo:hi], index=np.arange(lo, hi))
    if png:
      (out / "png").mkdir(parents=True, exist_ok=True)
      for i, image in zip(range(lo, hi), images):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        paths.write_bytes(out / "png" / f"{i:06d}.png", buffer.getvalue())
    written.append(s)
    done_images += hi - lo
    rate = done_images / (time.time() - start_time)
    left = sum(min(n, (t + 1) * shard_size) - t * shard_size for t in todo[len(written):])
    logging.info("shard %d/%d written | %.2f images/s | ETA %s", s + 1, count, rate,
                 time.strftime("%Hh%Mm%Ss", time.gmtime(left / max(rate, 1e-9))))
  return written


def pack(out: epath.PathLike, num: int, shard_size: int) -> str:
  """``samples_NxHxWx3.npz`` (``arr_0`` images, ``arr_1`` labels) from the shards, streamed shard by shard."""
  out = epath.Path(out)
  count = math.ceil(num / shard_size)
  shards = [out / shard_name(s, count) for s in range(count)]
  missing = [p for p in shards if not p.exists()]
  if missing:
    raise FileNotFoundError(f"{len(missing)} of {count} shards are missing (first: {missing[0]}); run the sampler "
                            "again to write them.")
  with shards[0].open("rb") as file, np.load(file) as first:
    shape = (num,) + first["arr_0"].shape[1:]
  name = out / ("samples_" + "x".join(map(str, shape)) + ".npz")
  labels = []
  # A bucket's file is written as a stream (no seeking back): zipfile then writes each member's sizes after it.
  with paths.atomic_open(name) as file, zipfile.ZipFile(file, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
    with zf.open("arr_0.npy", "w", force_zip64=True) as f:
      np.lib.format.write_array_header_2_0(f, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
                                               "fortran_order": False, "shape": shape})
      for p in shards:
        with p.open("rb") as shard_file, np.load(shard_file) as shard:
          f.write(np.ascontiguousarray(shard["arr_0"], np.uint8).tobytes())
          labels.append(shard["labels"])
    with zf.open("arr_1.npy", "w") as f:
      np.lib.format.write_array(f, np.concatenate(labels).astype(np.int64))
  return str(name)


def initialize_distributed(coordinator_address: str, num_processes: int | None, process_id: int | None) -> None:
  """``jax.distributed.initialize`` at ``coordinator_address`` (``auto``: detected from the cluster)."""
  if coordinator_address == "auto":
    jax.distributed.initialize(shutdown_timeout_seconds=SHUTDOWN_WAIT_S)
  else:
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               shutdown_timeout_seconds=SHUTDOWN_WAIT_S)
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def _floats(text: str) -> tuple[float, ...]:
  return tuple(float(x) for x in text.split(","))


def _ints(text: str) -> tuple[int, ...]:
  return tuple(int(x) for x in text.split(",") if x.strip())


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", required=True, help="generator work dir or converted directory")
  parser.add_argument("--out", required=True)
  parser.add_argument("--tokenizer", default="", help="tokenizer dir (default: the work dir's config.tokenizer)")
  parser.add_argument("--num", type=int, default=50_000)
  parser.add_argument("--labels", default="balanced", choices=LABEL_KINDS)
  parser.add_argument("--num_classes", type=int, default=0, help="label range (default: the model's classes)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--batch", type=int, default=64, help="images per sampler call (all local devices)")
  parser.add_argument("--shard_size", type=int, default=1000)
  parser.add_argument("--png", action="store_true")
  parser.add_argument("--steps", type=int, default=250, help="DiT: sampler steps")
  parser.add_argument("--method", default="euler", choices=flow.METHODS)
  parser.add_argument("--mode", default="ode", choices=flow.MODES)
  parser.add_argument("--shift", type=float, default=0.0)
  parser.add_argument("--cfg_scale", type=float, default=None, help="default: 1 for DiT, 2 for LlamaGen")
  parser.add_argument("--cfg_interval", type=_floats, default=(0.0, 1.0),
                      help="lo,hi: guided iff lo <= p < hi for sampling progress p in [0, 1) (DiT: flow time; "
                           "LlamaGen: token n / N); -1: always")
  parser.add_argument("--cfg_channels", type=int, default=0, help="DiT: 0 guides every channel; 3 the reference's")
  parser.add_argument("--latent_scale", type=float, default=0.0, help="DiT from a converted directory")
  parser.add_argument("--temperature", type=float, default=1.0)
  parser.add_argument("--top_k", type=int, default=0)
  parser.add_argument("--top_p", type=float, default=1.0)
  parser.add_argument("--group_sizes", type=_ints, default=(), help="LlamaGen: FSQ index groups, e.g. 2,2")
  parser.add_argument("--num_processes", type=int, default=None)
  parser.add_argument("--process_id", type=int, default=None)
  parser.add_argument("--coordinator_address", default=None,
                      help="host:port of process 0: start jax.distributed (with --num_processes and --process_id); "
                           "'auto' detects a TPU pod or SLURM job")
  parser.add_argument("--max_shards", type=int, default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", force=True)  # imports set a handler
  if args.coordinator_address:
    if args.coordinator_address != "auto" and (args.num_processes is None or args.process_id is None):
      parser.error(f"--coordinator_address={args.coordinator_address} needs --num_processes and --process_id "
                   "(or --coordinator_address=auto on a TPU pod or SLURM job).")
    initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
    num_processes, process_id = jax.process_count(), jax.process_index()
  else:
    num_processes = args.num_processes or jax.process_count()
    process_id = jax.process_index() if args.process_id is None else args.process_id
  problems = [f"{name}={value} must be >= 1" for name, value in
              (("--num", args.num), ("--batch", args.batch), ("--shard_size", args.shard_size),
               ("--steps", args.steps), ("--num_processes", num_processes)) if value < 1]
  if not 0 <= process_id < num_processes:
    problems.append(f"--process_id={process_id} must be in [0, {num_processes})")
  if problems:
    parser.error("; ".join(problems))
  module, _ = loading.load_model(args.model)
  kind = "dit" if isinstance(module, DiT) else "llamagen"
  cfg_scale = args.cfg_scale if args.cfg_scale is not None else (1.0 if kind == "dit" else 2.0)
  options = {"cfg_scale": cfg_scale, "cfg_interval": args.cfg_interval}
  if kind == "dit":
    options.update(num_steps=args.steps, method=args.method, mode=args.mode, shift=args.shift,
                   cfg_channels=args.cfg_channels)
  else:
    options.update(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
  try:
    options = draw.options(module, options)
  except ValueError as e:
    parser.error(str(e))
  num_classes = args.num_classes or module.num_classes
  if not 1 <= num_classes <= module.num_classes:
    parser.error(f"--num_classes={num_classes} must be in [1, {module.num_classes}] (the model's classes).")
  try:
    gen = open_generator(args.model, options, tokenizer=args.tokenizer, latent_scale=args.latent_scale,
                         group_sizes=args.group_sizes, seed=args.seed)
  except (FileNotFoundError, ValueError) as e:
    parser.error(str(e))
  out = epath.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  meta = {"model": str(paths.absolute(args.model)), "kind": kind, "num": args.num, "labels": args.labels,
          "num_classes": num_classes, "seed": args.seed, "batch": args.batch, "shard_size": args.shard_size,
          "options": options, "latent_scale": gen.latent_scale}
  try:
    _check_meta(out, meta)
  except ValueError as e:
    parser.error(str(e))
  labels = make_labels(args.num, num_classes, args.seed, args.labels)
  write_shards(gen, out, labels, shard_size=args.shard_size, batch=args.batch, png=args.png,
               process_id=process_id, num_processes=num_processes, max_shards=args.max_shards)
  if process_id != 0:
    return 0
  count = math.ceil(args.num / args.shard_size)
  while sum((out / shard_name(s, count)).exists() for s in range(count)) < count:
    if args.max_shards is not None:
      logging.info("Stopped after --max_shards=%d; run again to continue.", args.max_shards)
      return 0
    logging.info("Waiting for the other processes' shards ...")
    time.sleep(10)
  logging.info("Wrote %s", pack(out, args.num, args.shard_size))
  return 0


if __name__ == "__main__":
  sys.exit(main())

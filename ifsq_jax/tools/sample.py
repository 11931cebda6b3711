r"""Sample a trained generator (DiT or LlamaGen) in resumable shards, packed for ADM's evaluator.

  python -m ifsq_jax.tools.sample --model DIR --out OUT_DIR [--step N] [--tokenizer DIR] [--num 50000] \
      [--labels balanced|uniform] [--seed 0] [--batch 64] [--shard_size 1000] [--png] \
      [DiT: --steps 250 --method euler|heun --mode ode|sde --shift 0 --cfg_scale 1 --cfg_interval 0,1
            --cfg_channels 0 --latent_scale S]
      [LlamaGen: --cfg_scale 2 --cfg_interval 0,1 --temperature 1 --top_k 0 --top_p 1 --group_sizes 2,2]
      [--num_processes P --process_id p] [--coordinator_address HOST:PORT|auto]

``--model`` is a training work dir (the EMA weights of its newest step, or of
``--step``; its tokenizer, latent scale and token groups are read from it), one
of its step directories, or a converted directory (then name the tokenizer, and
for DiT the latent scale). Labels are class-balanced by default: a seeded
permutation of ``i % num_classes``, so every class has N / C samples
(``uniform`` draws them independently). ``--cfg_interval lo,hi`` guides the
evaluations at sampling progress p with ``lo <= p < hi`` (DiT: the flow time;
LlamaGen: token n / N); ``-1`` means always (:mod:`ifsq_jax.sampling.guidance`).

Output: ``shard-SSSSS-of-NNNNN.npz`` (``arr_0`` uint8 (n, H, W, 3), ``labels``,
``index``), each written under a temporary name and renamed when complete, and
once every shard exists, ``samples_NxHxWx3.npz`` with ``arr_0`` (N, H, W, 3) uint8
and ``arr_1`` the labels, the layout of ADM's sample batches (streamed into the
file, never held in memory whole); ``--png`` also writes ``png/IIIIII.png``, each
before its shard's rename (missing ones of committed shards are rebuilt from them).
Every option is checked, and the sampler's program traced, before anything is
written. ``meta.json`` records everything that decides the samples (checkpoint
path and step, params and tokenizer fingerprints, token groups, latent scale,
sampler options, number, labels, seed, image shape, batch layout, package
version); a run into a directory whose ``meta.json`` differs is one error naming
the fields, so shards of two runs never mix. Every path may be ``gs://...``
(:mod:`ifsq_jax.paths`).

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
``--coordinator_address auto`` lets JAX detect a TPU pod or SLURM job (see
:func:`initialize_distributed` for the CPU collectives). Processes
that finish first wait for the rest in JAX's shutdown barrier, for up to
``SHUTDOWN_WAIT_S`` (JAX's default of 5 minutes could end them with a timeout
error while process 0 still samples its last shard and packs).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.metadata
import io
import json
import logging
import math
import os
import sys
import time
import zipfile
from typing import Any, Sequence

import jax
import numpy as np
from etils import epath
from PIL import Image

from ifsq_jax import checkpoint, parallel, paths
from ifsq_jax.eval import fid
from ifsq_jax.models import loading, saved
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
    self.source: dict[str, Any] = {}  # where the weights came from (open_generator fills it), for meta.json

  def trace(self, batch: int) -> tuple[int, ...]:
    """Traces one call of ``batch`` samples without running it; returns the image shape (H, W, 3).

    Raises the sampler's error for options it refuses only while tracing, before anything is written.
    """
    idx, y = np.arange(batch), np.zeros(batch, np.int32)
    out = draw.draw(self.module, self.params, idx, y, self.seed, self.options, mesh=self.mesh, decoder=self.decoder,
                    abstract=True)
    return tuple(out["images"].shape[1:])

  def images(self, indices: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """uint8 images (B, H, W, 3) of samples ``indices`` (B,) with ``labels`` (B,); B a multiple of the devices."""
    out = draw.draw(self.module, self.params, indices, labels, self.seed, self.options, mesh=self.mesh,
                    decoder=self.decoder)
    return fid.to_uint8(parallel.to_host(out["images"]))


class ModelError(ValueError):
  """``--model`` (or ``--step``) names no generator this tool can open: the message says what was found."""


@dataclasses.dataclass(frozen=True)
class Resolved:
  """The generator a run samples, resolved once at its start.

  Attributes:
    path: ``--model`` made absolute.
    workdir: The training work dir (None: a converted directory).
    step: The checkpoint step read from the work dir (None: a converted directory).
    load_path: What :func:`ifsq_jax.models.loading.load_model` opens: that step's directory, or the converted one.
  """

  path: str
  workdir: str | None
  step: int | None
  load_path: str


VALID_MODELS = ("a DiT or LlamaGen training work dir (config.json + checkpoints/), one of its step directories, or "
                "a directory written by python -m ifsq_jax.convert dit or llamagen (params.safetensors + config.json)")


def _listing(path: epath.Path) -> str:
  try:
    names = sorted(p.name for p in path.iterdir())
  except OSError:
    return "nothing readable"
  if not names:
    return "an empty directory"
  return ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")


def _saved_steps(workdir: epath.Path) -> list[int]:
  directory = workdir / "checkpoints"
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.exists() else []


def resolve_model(model: str, step: int | None = None) -> Resolved:
  """The directory and checkpoint step ``--model`` (with ``--step``) names; the newest step unless ``step`` is given.

  Raises:
    ModelError: ``model`` is missing or is none of :data:`VALID_MODELS`, or ``step`` is not saved; the message
      names what was found and what is valid.
  """
  root = paths.absolute(model)
  if not root.exists():
    raise ModelError(f"--model {model} does not exist; give {VALID_MODELS}.")
  if saved.exists(str(root)):
    kind = saved.kind(str(root))
    if kind not in loading.MODELS:
      raise ModelError(f"--model {model} holds converted weights of kind={kind!r}; give {VALID_MODELS}.")
    if step is not None:
      raise ModelError(f"--step={step} picks a checkpoint of a work dir, but --model {model} is a converted "
                       f"{kind} directory (one set of weights); leave --step out.")
    return Resolved(str(root), None, None, str(root))
  workdir = next((d for d in (root, root.parent, root.parent.parent) if (d / "config.json").exists()), None)
  if workdir is None:
    raise ModelError(f"--model {model} holds {_listing(root)}; give {VALID_MODELS}.")
  try:
    task = json.loads((workdir / "config.json").read_text()).get("task")
  except (OSError, ValueError, AttributeError) as e:
    raise ModelError(f"--model {model}: {workdir / 'config.json'} cannot be read as a run config ({e}); give "
                     f"{VALID_MODELS}.") from None
  if task not in loading.MODELS:
    raise ModelError(f"--model {model} is a work dir of task {task!r}; give {VALID_MODELS}.")
  if (root / "state").exists():  # one step directory: that step
    named = int(root.name) if root.name.isdigit() else None
    if step is not None and step != named:
      raise ModelError(f"--model {model} is the directory of step {named}, but --step={step}.")
    return Resolved(str(root), str(workdir), named, str(root))
  steps = _saved_steps(workdir)
  if step is None:
    try:
      newest = checkpoint.resolve_checkpoint(workdir)
    except FileNotFoundError:
      raise ModelError(f"--model {model} is a {task} work dir with no checkpoint under {workdir / 'checkpoints'}; "
                       "train it first, or give a converted directory.") from None
    step = int(newest.name)
  elif step not in steps:
    raise ModelError(f"--step={step} is not saved in {workdir / 'checkpoints'}; its steps are {steps}.")
  return Resolved(str(root), str(workdir), step, str(checkpoint.step_directory(workdir, step)))


def fingerprint(tree: Any) -> str:
  """sha256 of a params tree: every leaf's path, dtype, shape and bytes, in the tree's (sorted-key) order.

  Hashing the weights themselves (not file names or times) says whether two runs
  sample the same weights, wherever the files lie; it reads each byte once, about
  a second per GB, which is little beside sampling 50,000 images.
  """
  digest = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    leaf = np.ascontiguousarray(np.asarray(leaf))
    digest.update(f"{jax.tree_util.keystr(path)}|{leaf.dtype.str}|{leaf.shape}|".encode())
    digest.update(leaf.tobytes())
  return "sha256:" + digest.hexdigest()


def package_version() -> str:
  try:
    return importlib.metadata.version("ifsq_jax")
  except importlib.metadata.PackageNotFoundError:
    return "unknown (not installed)"


def _run_config(workdir: str | None) -> dict[str, Any]:
  if workdir is None:
    return {}
  return json.loads((epath.Path(workdir) / "config.json").read_text())


def open_generator(model_dir: str | Resolved, options: dict[str, Any], *, tokenizer: str = "",
                   latent_scale: float = 0.0, group_sizes: Sequence[int] = (), seed: int = 0,
                   devices: Sequence[Any] | None = None, loaded: tuple[Any, Any] | None = None) -> Generator:
  """The generator of ``model_dir`` (a path: its newest step; or :func:`resolve_model`'s step) and its tokenizer.

  ``loaded``: its (module, params) when already read (a large checkpoint is read once).
  """
  resolved = model_dir if isinstance(model_dir, Resolved) else resolve_model(model_dir)
  module, params = loaded or loading.load_model(resolved.load_path)
  run = _run_config(resolved.workdir)
  tokenizer = tokenizer or run.get("tokenizer", "")
  if not tokenizer:
    raise ValueError(f"{resolved.path} is a converted model: name its tokenizer with --tokenizer DIR.")
  tok = load_tokenizer(tokenizer)
  if isinstance(module, LlamaGen):
    groups = tuple(group_sizes) or tuple((run.get("tokens") or {}).get("group_sizes") or ())
    if groups:
      tok = draw.regroup(tok, groups)
    if tuple(tok.config.index_sizes) != tuple(module.vocab_sizes):
      raise ValueError(f"the tokenizer {tokenizer} gives indices of {tuple(tok.config.index_sizes)} codes, the model "
                       f"predicts {tuple(module.vocab_sizes)}; split FSQ indices with --group_sizes (e.g. 2,2).")
    scale = None
  else:
    scale = latent_scale or _workdir_latent_scale(resolved.workdir)
    if not scale:
      raise ValueError(f"{resolved.path} is a converted DiT: pass the latent scale its codes were trained at with "
                       "--latent_scale (a work dir keeps it in latent.json).")
  gen = Generator(module, params, tok, options, scale, seed, devices or jax.local_devices())
  gen.source = {"model": resolved.path, "workdir": resolved.workdir, "step": resolved.step,
                "params_fingerprint": fingerprint(params), "tokenizer": str(paths.absolute(tokenizer)),
                "tokenizer_fingerprint": fingerprint(tok.variables),
                "group_sizes": list(tok.config.group_sizes or ()) if isinstance(module, LlamaGen) else None}
  return gen


def _workdir_latent_scale(workdir: str | None) -> float:
  path = epath.Path(workdir) / "latent.json" if workdir else None
  if path is None or not path.exists():
    return 0.0
  return float(json.loads(path.read_text())["latent_scale"])


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
  """``field: old there, new now`` for every field (nested with dots) that differs."""
  out = []
  for k in sorted(set(old) | set(new)):
    a, b = old.get(k, "<absent>"), new.get(k, "<absent>")
    if isinstance(a, dict) and isinstance(b, dict):
      out += [f"{k}.{d}" for d in _differences(a, b)]
    elif a != b:
      out.append(f"{k}: {a!r} there, {b!r} now")
  return out


def _check_meta(out: epath.PathLike, meta: dict[str, Any], pinned: bool = False) -> None:
  """Writes ``meta.json``, or checks that the one in ``out`` records exactly ``meta``.

  Args:
    out: The output directory.
    meta: Everything that decides the samples (see ``main``).
    pinned: Whether ``--step`` was given (else a work dir's newest step was taken).

  Raises:
    ValueError: ``out`` holds samples of other settings, naming every field that differs and how to go on.
  """
  path = epath.Path(out) / META
  meta = json.loads(json.dumps(meta))  # as read back: tuples are lists
  if path.exists():
    old = json.loads(path.read_text())
    if (not pinned and meta.get("workdir") and old.get("workdir") == meta["workdir"]
        and old.get("step") is not None and old.get("step") != meta.get("step")):
      raise ValueError(f"{out} holds samples of step {old['step']} of {meta['workdir']}, whose newest step is now "
                       f"{meta['step']}: continue that run with --step {old['step']}, or sample step {meta['step']} "
                       "into a new --out directory.")
    differ = _differences(old, meta)
    if differ:
      raise ValueError(f"{out} holds samples of other settings ({'; '.join(differ)}); sample into a new --out "
                       "directory (or run again with the settings recorded in its meta.json).")
    return
  path.parent.mkdir(parents=True, exist_ok=True)
  paths.write_text(path, json.dumps(meta, indent=2))


def _duration(seconds: float) -> str:
  """``1d 02h03m04s`` (days once past 24 h; ``time.strftime`` would wrap them)."""
  seconds = int(round(seconds))
  days, rest = divmod(seconds, 86400)
  text = f"{rest // 3600:02d}h{rest % 3600 // 60:02d}m{rest % 60:02d}s"
  return f"{days}d {text}" if days else text


def png_path(out: epath.PathLike, index: int) -> epath.Path:
  return epath.Path(out) / "png" / f"{index:06d}.png"


def _write_pngs(out: epath.Path, first: int, images: np.ndarray, missing_only: bool = False) -> int:
  """PNGs of samples ``first ..`` (each written atomically); returns how many were written."""
  (out / "png").mkdir(parents=True, exist_ok=True)
  written = 0
  for i, image in enumerate(images, first):
    if missing_only and png_path(out, i).exists():
      continue
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    paths.write_bytes(png_path(out, i), buffer.getvalue())
    written += 1
  return written


def _rebuild_pngs(out: epath.Path, shards: Sequence[int], count: int, n: int, shard_size: int) -> None:
  """Writes the PNGs missing for committed ``shards`` from the shard files (a run without --png, or a crash)."""
  for s in shards:
    lo, hi = s * shard_size, min(n, (s + 1) * shard_size)
    if all(png_path(out, i).exists() for i in range(lo, hi)):
      continue
    with (out / shard_name(s, count)).open("rb") as f, np.load(f) as shard:
      written = _write_pngs(out, lo, shard["arr_0"], missing_only=True)
    logging.info("shard %d: rebuilt %d missing PNGs from the shard", s, written)


def write_shards(gen: Generator, out: epath.PathLike, labels: np.ndarray, *, shard_size: int, batch: int,
                 png: bool = False, process_id: int = 0, num_processes: int = 1, max_shards: int | None = None,
                 pause_in_commit: tuple[int, float] | None = None) -> list[int]:
  """Writes this process's missing shards (p, p + P, ...); returns the shards written.

  A shard is committed by renaming its complete temporary file; with ``png`` its
  PNGs are written before that rename, and those missing for shards committed
  earlier (a run without ``--png``) are rebuilt from the shard files first, so
  a committed shard always has its PNGs.

  Args:
    max_shards: Stop after that many (a deliberate interruption, for tests).
    pause_in_commit: (shard, seconds): sleep that long with that shard's temporary file written, before its rename
      (for tests that kill the process in the middle of a shard).
  """
  out = epath.Path(out)
  n = len(labels)
  count = math.ceil(n / shard_size)
  per_call = draw.per_call(batch, shard_size, gen.mesh)  # fixed by --batch and --shard_size: the batch layout
  mine = [s for s in range(process_id, count, num_processes)]
  todo = [s for s in mine if not (out / shard_name(s, count)).exists()]
  logging.info("Process %d of %d: %d of its %d shards to write (%d images each)", process_id, num_processes,
               len(todo), len(mine), shard_size)
  if png:
    _rebuild_pngs(out, [s for s in mine if s not in todo], count, n, shard_size)
  written, start_time, done_images = [], time.time(), 0
  for s in todo[:max_shards]:
    lo, hi = s * shard_size, min(n, (s + 1) * shard_size)
    images = np.concatenate([gen.images(idx, y)[:keep] for idx, y, keep in draw.calls(lo, hi, per_call, labels)])
    if png:
      _write_pngs(out, lo, images)
    with paths.atomic_open(out / shard_name(s, count)) as f:
      np.savez(f, arr_0=images, labels=labels[lo:hi], index=np.arange(lo, hi))
      if pause_in_commit and pause_in_commit[0] == s:
        f.flush()
        time.sleep(pause_in_commit[1])
    written.append(s)
    done_images += hi - lo
    rate = done_images / (time.time() - start_time)
    left = sum(min(n, (t + 1) * shard_size) - t * shard_size for t in todo[len(written):])
    logging.info("shard %d/%d written | %.2f images/s | ETA %s", s + 1, count, rate,
                 _duration(left / max(rate, 1e-9)))
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
  """``jax.distributed.initialize`` at ``coordinator_address`` (``auto``: detected from the cluster).

  Sampling never needs a collective across processes (each process samples on
  its own devices), so the CPU client keeps in-process collectives
  (``jax_cpu_collectives_implementation=None``): with JAX's default under
  ``jax.distributed`` (gloo), the collectives *inside* a process's own program
  would also run as gloo over TCP, one rank per local CPU device, and a wedged
  rank would stall the process (GPU and TPU clients are not affected by this option).
  """
  jax.config.update("jax_cpu_collectives_implementation", None)
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
  parser.add_argument("--step", type=int, default=None,
                      help="work dir: the checkpoint step to sample (default: the newest; to resume a run after a newer "
                           "step was saved, the step its meta.json records)")
  parser.add_argument("--max_shards", type=int, default=None, help=argparse.SUPPRESS)
  parser.add_argument("--pause_in_commit", type=_floats, default=None, help=argparse.SUPPRESS)  # tests: shard,seconds
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", force=True)  # imports set a handler
  # Everything that can be checked is checked before anything is written (meta.json, the output directory).
  if args.coordinator_address != "auto" and (args.num_processes is None) != (args.process_id is None):
    parser.error(f"--num_processes={args.num_processes} and --process_id={args.process_id}: give both or neither "
                 "(without --process_id every process would be process 0, and they would write the same shards).")
  if args.coordinator_address and args.coordinator_address != "auto" and args.num_processes is None:
    parser.error(f"--coordinator_address={args.coordinator_address} needs --num_processes and --process_id "
                 "(or --coordinator_address=auto on a TPU pod or SLURM job).")
  problems = [f"{name}={value} must be >= 1" for name, value in
              (("--num", args.num), ("--batch", args.batch), ("--shard_size", args.shard_size),
               ("--steps", args.steps), ("--num_processes", args.num_processes)) if value is not None and value < 1]
  if args.num_processes is not None and args.process_id is not None and not 0 <= args.process_id < args.num_processes:
    problems.append(f"--process_id={args.process_id} must be in [0, {args.num_processes})")
  if problems:
    parser.error("; ".join(problems))
  try:
    resolved = resolve_model(args.model, args.step)
  except ModelError as e:
    parser.error(str(e))
  if args.coordinator_address:
    initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
    num_processes, process_id = jax.process_count(), jax.process_index()
  else:
    num_processes = args.num_processes or 1
    process_id = args.process_id or 0
  try:
    module, params = loading.load_model(resolved.load_path)
  except (FileNotFoundError, ValueError) as e:  # checkpoint errors are ValueErrors
    parser.error(f"--model {args.model}: {e}")
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
    gen = open_generator(resolved, options, tokenizer=args.tokenizer, latent_scale=args.latent_scale,
                         group_sizes=args.group_sizes, seed=args.seed, loaded=(module, params))
    per_call = draw.per_call(args.batch, args.shard_size, gen.mesh)
    image_shape = gen.trace(per_call)  # a sampler option refused only while tracing fails here, not mid-run
  except (FileNotFoundError, ValueError) as e:
    parser.error(str(e))
  # Everything that decides the samples: a resume must match it exactly.
  meta = {"package_version": package_version(), "kind": kind, **gen.source,
          "architecture": _fields(module), "latent_scale": gen.latent_scale, "options": options, "num": args.num,
          "labels": args.labels, "num_classes": num_classes, "seed": args.seed, "image_shape": image_shape,
          "batch": args.batch, "shard_size": args.shard_size, "per_call": per_call,
          "batch_devices": parallel.batch_devices(gen.mesh)}
  out = epath.Path(args.out)
  try:
    _check_meta(out, meta, pinned=args.step is not None)
  except ValueError as e:
    parser.error(str(e))
  labels = make_labels(args.num, num_classes, args.seed, args.labels)
  write_shards(gen, out, labels, shard_size=args.shard_size, batch=args.batch, png=args.png,
               process_id=process_id, num_processes=num_processes, max_shards=args.max_shards,
               pause_in_commit=args.pause_in_commit and (int(args.pause_in_commit[0]), args.pause_in_commit[1]))
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


def _fields(module: DiT | LlamaGen) -> dict[str, Any]:
  """The module's hyper-parameters as JSON values (the dtype by name)."""
  out = {}
  for f in dataclasses.fields(module):
    if f.name in ("parent", "name"):
      continue
    value = getattr(module, f.name)
    out[f.name] = value if isinstance(value, (bool, int, float, str, tuple, list, type(None))) else str(value)
  return out


if __name__ == "__main__":
  sys.exit(main())

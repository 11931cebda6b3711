"""Speed of the 50,000-sample evaluation: sampling as ``tools.sample`` does it, features as ``tools.fid`` does.

Random-init models at the paper's shapes (256 x 256 images; the f16-d4 iFSQ
tokenizer of ``configs/ifsq_f16_d4.py``: 16 x 16 x 4 codes, levels 17^4), on one
device, through the tool's own code path: a ``tools.sample.Generator`` (the
sampler and the tokenizer decode in one compiled program, the host-side noise
and the uint8 conversion) driven by ``tools.sample.write_shards``, which also
writes the shard file. Cases:

* DiT-S/1 on 16 x 16 x 4 latents (256 tokens, the paper's DiT-L/1 grid), the
  paper's and the tool's sampler: ``--steps`` Euler ODE steps, for each of the
  ``--dit_cfg`` guidance scales (1.0 is the paper's and the tool's default; a
  scale above 1 runs the model on twice the rows).
* LlamaGen-B on 16 x 16 tokens of one 83,521-way index (``configs/llamagen_l.py``),
  KV-cache decoding with guidance ``--llamagen_cfg`` (the paper's 2.0), temperature
  1, no top-k / top-p.
* With DiT, the tokenizer decode alone (``LoadedTokenizer.decode``, codes (B, 16,
  16, 4) -> images (B, 256, 256, 3)), timed after each DiT sampler call so that
  both see the same load of a shared machine; the DiT extrapolation uses it.
* ``tools.fid.FeatureExtractor`` on uint8 256 px images (random Inception weights
  with the classifier; resized to 299 as ADM does) in batches of
  ``--feature_batch`` (the tool's 64; at most ``--num_images``, as the tool pads
  a short batch): the Inception outputs (pool, spatial, logits) with the VGG16
  features of ``fd_vgg16``, and the VGG16 features alone; the Inception's share
  is the difference.

Each case runs once first (compiling), then ``--num_images`` images are timed
in calls of ``--batch``. What is printed as measured was run; the rest is
extrapolated: the time for 50,000 images, at the images/s of the table (the
cost of a call does not depend on the image index), and for DiT from
``--steps`` to the tool's 250 steps as ``decode + 250 * (call - decode) /
steps`` per call (everything but the decode counted as per-step cost, which
errs on the slow side). Images/s depend on the batch (LlamaGen's decoding
reads every weight once per token for the whole batch): a measurement at a
smaller batch than the tool's 64 understates what the tool reaches.

Usage: ``python bench/sample_bench.py [--num_images 1000] [--batch 64] [--steps 250]
[--dit_cfg 1.0,1.5] [--llamagen_cfg 2.0] [--feature_batch 64] [--dtype float32|bfloat16]
[--cases dit,llamagen,features]``
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import statistics
import tempfile
import time
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llamagen_bench import init_params as llamagen_params
from llamagen_bench import model_fields as llamagen_fields
from ifsq_jax.convert import torch_io
from ifsq_jax.kernels.cpu import host_memory
from ifsq_jax.models import dit
from ifsq_jax.models.llamagen import LlamaGen
from ifsq_jax.models.pretrained import LoadedTokenizer
from ifsq_jax.models.tokenizer import Tokenizer, TokenizerConfig
from ifsq_jax.nets import inception
from ifsq_jax.eval import features
from ifsq_jax.tools import sample

TOOL_STEPS = 250  # python -m ifsq_jax.tools.sample --steps default (the paper's evaluation)
PAPER_IMAGES = 50_000
IMAGE_SIZE = 256
CASES = ("dit", "llamagen", "features")


def processor() -> str:
  """The CPU's model name (/proc/cpuinfo) and the cores this process may use."""
  name = "unknown CPU"
  try:
    with open("/proc/cpuinfo") as f:
      name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
  except OSError:
    pass
  return f"{name}, {len(os.sched_getaffinity(0))} cores"


def random_variables(init: Any, seed: int) -> Any:
  """Variables of the shapes ``init()`` gives, drawn in numpy (a compiled init of a large convnet is slow on CPU).

  Kernels He-normal, norm scales and variances 1, everything else 0: the speed
  does not depend on the values, as long as they stay finite.
  """
  rng = np.random.default_rng(seed)

  def draw(path, s):
    name = path[-1].key
    if name == "kernel":
      return rng.normal(0, math.sqrt(2 / math.prod(s.shape[:-1])), s.shape).astype(np.float32)
    return (np.ones if name in ("scale", "var") else np.zeros)(s.shape, np.float32)

  return jax.tree_util.tree_map_with_path(draw, jax.eval_shape(lambda: nn.meta.unbox(init())))


def random_tokenizer(dtype: Any) -> LoadedTokenizer:
  """The paper's f16-d4 iFSQ tokenizer (``TokenizerConfig()`` defaults), random weights."""
  config = TokenizerConfig()
  x = jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3))
  variables = random_variables(lambda: Tokenizer(config).init(jax.random.key(0), x), seed=0)
  return LoadedTokenizer(config, {"params": variables["params"]}, dtype=dtype)


def dit_generator(tok: LoadedTokenizer, steps: int, cfg_scale: float, dtype: Any, devices) -> sample.Generator:
  """DiT-S/1 at 16 x 16 x 4 with the tool's default sampler options but ``steps`` and ``cfg_scale``."""
  module = dit.DiT(**dit.dit_config("S", 1, z_dim=0), dtype=dtype)
  params = nn.meta.unbox(jax.jit(module.init)(jax.random.key(1, impl="rbg"), *dit.example_inputs(module))["params"])
  options = {"num_steps": steps, "method": "euler", "mode": "ode", "shift": 0.0, "cfg_scale": cfg_scale,
             "cfg_interval": [0.0, 1.0], "cfg_channels": 0}
  return sample.Generator(module, params, tok, options, latent_scale=1.0, seed=0, devices=devices)


def llamagen_generator(tok: LoadedTokenizer, cfg_scale: float, dtype: Any, devices) -> sample.Generator:
  """LlamaGen-B on 16 x 16 tokens of 83,521 codes with the tool's default options but ``cfg_scale``."""
  fields = llamagen_fields("B", 16, tuple(tok.config.index_sizes), dtype=dtype)
  options = {"cfg_scale": cfg_scale, "cfg_interval": [0.0, 1.0], "temperature": 1.0, "top_k": 0, "top_p": 1.0}
  return sample.Generator(LlamaGen(**fields), llamagen_params(fields), tok, options, latent_scale=None, seed=0,
                          devices=devices)


class Timing(NamedTuple):
  """Seconds of one case: the compiling first call, the timed images, and each sampler call."""

  first: float
  total: float  # num_images through write_shards, without the decodes timed between calls
  calls: list[float]
  decodes: list[float]  # the tokenizer decode alone, timed after each call (DiT: the extrapolation's split)
  per_call: int


def time_sampling(gen: sample.Generator, num_images: int, batch: int, decode_between: bool) -> Timing:
  """``num_images`` through ``tools.sample.write_shards``, after one compiling call.

  With ``decode_between``, the tokenizer decode of one call's codes is timed
  after each sampler call (outside the total), so that the two are measured
  under the same load of a shared machine.
  """
  labels = sample.make_labels(num_images, 1000, seed=0)
  devices = len(gen.mesh.devices.flat)
  per_call = -(-min(batch, num_images) // devices) * devices  # as write_shards rounds it
  codes = jnp.zeros((per_call, 16, 16, gen.tokenizer.config.embed_dim), jnp.float32)
  start = time.perf_counter()
  gen.images(np.arange(per_call), labels[np.minimum(np.arange(per_call), num_images - 1)])
  if decode_between:
    jax.block_until_ready(gen.tokenizer.decode(codes))
  first = time.perf_counter() - start
  calls, decodes = [], []
  images = gen.images

  def timed_images(indices, call_labels):
    start = time.perf_counter()
    out = images(indices, call_labels)  # returns host uint8 arrays: the call has finished
    calls.append(time.perf_counter() - start)
    if decode_between:
      start = time.perf_counter()
      jax.block_until_ready(gen.tokenizer.decode(codes))
      decodes.append(time.perf_counter() - start)
    return out

  gen.images = timed_images
  try:
    with tempfile.TemporaryDirectory() as out:
      start = time.perf_counter()
      sample.write_shards(gen, out, labels, shard_size=num_images, batch=batch)
      total = time.perf_counter() - start - sum(decodes)
  finally:
    del gen.images  # the method again
  return Timing(first, total, calls, decodes, per_call)


def time_features(num_images: int, batch: int) -> dict[str, float]:
  """Seconds for ``num_images`` uint8 256 px images through the tool's extractor: with and without the Inception."""
  variables = random_variables(lambda: inception.InceptionV3FID().init(
      jax.random.key(2), jnp.zeros((1, inception.SIZE, inception.SIZE, 3)), outputs=inception.OUTPUTS), seed=2)
  images = np.random.default_rng(0).integers(0, 256, (num_images, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
  out = {}
  with tempfile.TemporaryDirectory() as d:
    torch_io.save_converted(d, variables, {"kind": "inception"})
    extractor = features.FeatureExtractor(d, batch=batch)
    for name, with_inception in (("all", True), ("vgg16", False)):
      extractor(images[:1], inception=with_inception)  # compiles
      start = time.perf_counter()
      for i in range(0, num_images, batch):
        extractor(images[i:i + batch], inception=with_inception)
      out[name] = time.perf_counter() - start
  return out


def _hours(seconds: float) -> str:
  return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--num_images", type=int, default=1000, help="images timed per case")
  parser.add_argument("--batch", type=int, default=64, help="images per sampler call (the tool's --batch)")
  parser.add_argument("--steps", type=int, default=TOOL_STEPS, help="DiT Euler steps run")
  parser.add_argument("--dit_cfg", default="1.0,1.5", help="comma-separated DiT guidance scales")
  parser.add_argument("--llamagen_cfg", type=float, default=2.0)
  parser.add_argument("--feature_batch", type=int, default=64, help="images per feature step (tools.fid --batch)")
  parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                      help="model and tokenizer compute dtype (default: bfloat16 on accelerators, else float32)")
  parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {CASES}")
  args = parser.parse_args()
  cases = args.cases.split(",")
  unknown = sorted(set(cases) - set(CASES))
  if unknown or min(args.num_images, args.batch, args.steps, args.feature_batch) < 1:
    parser.error(f"--cases {unknown} unknown (valid: {CASES}) or a count below 1")
  host_memory.setup()
  device = jax.local_devices()[0]
  where = processor() if device.platform == "cpu" else device.device_kind
  dtype = jnp.dtype(args.dtype or ("float32" if device.platform == "cpu" else "bfloat16"))
  print(f"{where}; jax {jax.__version__}, one {device.platform} device, {dtype.name}; {args.num_images} images per "
        f"case in calls of {args.batch}; DiT at {args.steps} steps", flush=True)
  tok = random_tokenizer(dtype)
  make = {}
  if "dit" in cases:
    for scale in (float(x) for x in args.dit_cfg.split(",")):
      make[f"DiT-S/1 Euler ODE, cfg {scale:g}"] = functools.partial(dit_generator, tok, args.steps, scale)
  if "llamagen" in cases:
    make[f"LlamaGen-B KV cache, cfg {args.llamagen_cfg:g}"] = functools.partial(llamagen_generator, tok,
                                                                               args.llamagen_cfg)
  rows = []  # (case, measured, at the tool's defaults)
  for name, build in make.items():
    dit_case = name.startswith("DiT")
    t = time_sampling(build(dtype, [device]), args.num_images, args.batch, decode_between=dit_case)
    seconds = lambda values: ", ".join(f"{v:.1f}" for v in values)
    decodes = f"; decode alone {seconds(t.decodes)} s" if t.decodes else ""
    print(f"  ({name}: first call {t.first:.1f} s with compilation; {len(t.calls)} calls of {t.per_call}: "
          f"{seconds(t.calls)} s{decodes})", flush=True)
    rate = args.num_images / t.total
    measured, kind = f"{rate:8.3f} images/s" + (f" at {args.steps} steps" if dit_case else ""), "measured"
    if dit_case and args.steps != TOOL_STEPS:
      decode = statistics.median(t.decodes)
      per_step = max(statistics.median([c - d for c, d in zip(t.calls, t.decodes)]), 0.0) / args.steps
      rate, kind = t.per_call / (decode + TOOL_STEPS * per_step), "extrapolated"
    rows.append((name, measured, f"{rate:8.3f} images/s ({kind}), 50,000 in {_hours(PAPER_IMAGES / rate)}"))
    if dit_case and not any(r[0].startswith("tokenizer") for r in rows):
      rate = t.per_call / statistics.median(t.decodes)
      rows.insert(0, (f"tokenizer decode, {t.per_call} per call", f"{rate:8.3f} images/s",
                      f"{rate:8.3f} images/s (measured), 50,000 in {_hours(PAPER_IMAGES / rate)}"))
  if "features" in cases:
    t = time_features(args.num_images, min(args.feature_batch, args.num_images))
    for name, seconds, kind in (("tools.fid features (Inception + VGG16)", t["all"], "measured"),
                                ("  VGG16 only (fd_vgg16)", t["vgg16"], "measured"),
                                ("  Inception only (difference)", t["all"] - t["vgg16"], "derived")):
      rate = args.num_images / max(seconds, 1e-9)
      measured = f"{rate:8.2f} images/s" if kind == "measured" else ""
      rows.append((name, measured, f"{rate:8.2f} images/s ({kind}), 50,000 in {_hours(PAPER_IMAGES / rate)}"))
  print(f"\n{'case':42s} | {'measured':34s} | at the tool's defaults ({TOOL_STEPS} DiT steps)")
  print(f"{'-' * 42}-+-{'-' * 34}-+-{'-' * 50}")
  for case, measured, extrapolated in rows:
    print(f"{case:42s} | {measured:34s} | {extrapolated}")


if __name__ == "__main__":
  main()

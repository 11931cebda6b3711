"""Drawing samples of a trained generator: the one path of in-training evaluation, ``tools.sample`` and the benches.

:func:`draw` maps (model, params, sample indices, labels, seed, options) to
samples; :func:`draw_range` draws a range of sample indices in calls of a fixed
size and brings them to the host. The model picks the sampler: a
:class:`~ifsq_jax.models.dit.DiT` integrates the flow (:mod:`ifsq_jax.sampling.flow`),
a :class:`~ifsq_jax.models.llamagen.LlamaGen` decodes tokens with its KV cache
(:mod:`ifsq_jax.sampling.autoregressive`). With a :class:`Decoder` (the
tokenizer) the samples are decoded to images in the same compiled program.

**Randomness.** A call draws samples ``indices`` (B,) with the *batch key*
``fold_in(key(seed), indices[0])``:

* DiT: the initial noise of sample i is numpy's PCG64 seeded with
  ``(seed, i)`` (standard normal, float32, (h, w, C)), so an ODE sample
  depends on (seed, i) alone; the SDE draws its noise from the batch key.
* LlamaGen: row r of the call draws with ``fold_in(batch key, r)``.

So samples depend on the seed, the index and the batch layout (which indices
share a call; :func:`per_call` and the callers fix it), never on the devices or
processes: one process and several with the same layout give the same samples.

**Options** (:func:`options` fills the defaults, refuses unknown names and
checks the values). DiT: ``num_steps``, ``method``, ``mode``, ``shift``,
``cfg_scale``, ``cfg_channels`` (0: every channel) and ``cfg_interval``;
LlamaGen: ``cfg_scale``, ``cfg_interval``, ``temperature``, ``top_k``,
``top_p``. ``cfg_interval`` has one meaning for both
(:mod:`ifsq_jax.sampling.guidance`). The names are those of a generator
config's ``sample`` fields.

B batch, N tokens, G sub-token groups, h w latent size, C latent channels, H W image size.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Iterator, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ifsq_jax import parallel
from ifsq_jax.models.dit import DiT
from ifsq_jax.models.llamagen import LlamaGen
from ifsq_jax.models.pretrained import LoadedTokenizer
from ifsq_jax.sampling import autoregressive, flow, guidance

FLOW_OPTIONS = {"num_steps": 250, "method": "euler", "mode": "ode", "shift": 0.0, "cfg_scale": 1.0,
                "cfg_channels": 0, "cfg_interval": guidance.ALWAYS}
AR_OPTIONS = {"cfg_scale": 1.0, "cfg_interval": guidance.ALWAYS, "temperature": 1.0, "top_k": 0, "top_p": 1.0}


def _defaults(model: nn.Module) -> dict[str, Any]:
  if isinstance(model, DiT):
    return FLOW_OPTIONS
  if isinstance(model, LlamaGen):
    return AR_OPTIONS
  raise ValueError(f"model is a {type(model).__name__}; samples are drawn from a DiT or a LlamaGen.")


def options(model: DiT | LlamaGen, given: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """The sampler options of ``model``: ``given`` over the defaults, checked (see the module docstring).

  Returns:
    A dict of plain Python values (``cfg_interval`` a ``(lo, hi)`` tuple), fit for JSON.

  Raises:
    ValueError: naming an unknown option or a value outside its valid range.
  """
  defaults = _defaults(model)
  given = dict(given or {})
  unknown = sorted(set(given) - set(defaults))
  if unknown:
    raise ValueError(f"{type(model).__name__} sampling has no options {unknown}; its options are {sorted(defaults)}.")
  out = {**defaults, **given}
  out["cfg_interval"] = guidance.interval(out["cfg_interval"])
  for k in ("cfg_scale", "shift", "temperature", "top_p"):
    if k in out:
      out[k] = float(out[k])
  if isinstance(model, DiT):
    channels = model.in_channels
    if not isinstance(out["cfg_channels"], (int, np.integer)) or not 0 <= out["cfg_channels"] <= channels:
      raise ValueError(f"cfg_channels={out['cfg_channels']!r} must be an integer in [0, {channels}] (0: every "
                       "channel; 3: the reference's channels 0-2).")
    flow.validate_options(num_steps=out["num_steps"], method=out["method"], mode=out["mode"], shift=out["shift"],
                          cfg_interval=out["cfg_interval"])
  else:
    autoregressive.validate_options(cfg_scale=out["cfg_scale"], cfg_interval=out["cfg_interval"],
                                    temperature=out["temperature"], top_k=out["top_k"], top_p=out["top_p"])
  return out


@dataclasses.dataclass(frozen=True)
class Decoder:
  """The tokenizer that turns samples into images.

  Attributes:
    model: The tokenizer's Linen module (a static part of the program).
    variables: Its variables, best already on the devices (an argument of the program, never a constant).
    latent_scale: DiT only: the scale its latents were trained at (codes = latents / scale); a float or a
      scalar array.
  """

  model: nn.Module
  variables: Any
  latent_scale: Any = None


def regroup(tokenizer: LoadedTokenizer, group_sizes: tuple[int, ...]) -> LoadedTokenizer:
  """The tokenizer with its FSQ indices split into ``group_sizes`` channel groups (same network, same codes).

  Index groups change only the index arithmetic (codes <-> indices), not the
  network, so one trained tokenizer serves single and factorized LlamaGens, as
  the reference's ``factorized_bits`` override does.
  """
  tc = tokenizer.config
  if tc.bottleneck not in ("ifsq", "fsq"):
    raise ValueError(f"index groups split FSQ indices, but this tokenizer has a {tc.bottleneck!r} bottleneck.")
  try:
    regrouped = dataclasses.replace(tc, group_sizes=tuple(group_sizes))
    regrouped.fsq  # pylint: disable=pointless-statement  (builds the quantizer: checks the groups)
  except ValueError as e:
    raise ValueError(f"group sizes {tuple(group_sizes)} do not fit the tokenizer's {len(tc.levels)} FSQ channels "
                     f"(levels {tuple(tc.levels)}): {e}") from None
  return LoadedTokenizer(regrouped, tokenizer.variables, tokenizer.model.dtype)


def batch_key(seed: int, indices: np.ndarray) -> jax.Array:
  """The key of a call drawing samples ``indices``: ``fold_in(key(seed), indices[0])``."""
  return jax.random.fold_in(jax.random.key(seed), int(indices[0]))


def initial_noise(seed: int, indices: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  """(B,) + shape float32 standard normal: row b from PCG64 seeded with (seed, indices[b]) alone."""
  return np.stack([np.random.default_rng([seed, int(i)]).standard_normal(shape, np.float32) for i in indices])


def per_call(batch: int, limit: int, mesh: jax.sharding.Mesh) -> int:
  """Samples per sampler call: ``min(batch, limit)`` rounded up to a multiple of the devices of the batch."""
  return parallel.round_up(min(batch, limit), parallel.batch_devices(mesh))


@functools.lru_cache(maxsize=32)
def _program(model: nn.Module, opts: tuple[tuple[str, Any], ...], tokenizer: nn.Module | None,
             mesh: jax.sharding.Mesh):
  """jit: (params, noise, labels (B,), batch key, tokenizer variables, latent scale) -> samples (see draw)."""
  o = dict(opts)

  def run(params, noise, labels, key, variables, scale):
    if isinstance(model, DiT):
      velocity = lambda x, t, y: model.apply({"params": params}, x, t, y)
      z = flow.sample(velocity, noise, labels, num_steps=o["num_steps"], method=o["method"], mode=o["mode"],
                      shift=o["shift"], cfg_scale=o["cfg_scale"], null_label=model.num_classes,
                      cfg_channels=o["cfg_channels"] or None, cfg_interval=o["cfg_interval"], key=key)
      out = {"latents": z}
      if tokenizer is not None:
        out["images"] = tokenizer.apply(variables, (z / scale).astype(jnp.float32), method=lambda m, c: m.decode(c))
    else:
      tokens = autoregressive.generate(model, params, labels, key, cfg_scale=o["cfg_scale"],
                                       cfg_interval=o["cfg_interval"], temperature=o["temperature"],
                                       top_k=o["top_k"], top_p=o["top_p"])
      out = {"tokens": tokens}
      if tokenizer is not None:
        g = model.grid_size
        indices = tokens.reshape((tokens.shape[0], g, g) + tokens.shape[2:])  # (B, g, g) or (B, g, g, G)
        out["images"] = tokenizer.apply(variables, indices, method=lambda m, i: m.decode_indices(i))
    if "images" in out:
      out["images"] = out["images"].astype(jnp.float32)
    # Batch-sharded outputs: each process holds its rows, and parallel.to_host gathers them.
    return {k: jax.lax.with_sharding_constraint(v, parallel.batch_sharding(mesh, v.ndim)) for k, v in out.items()}

  return jax.jit(run)


def draw(model: DiT | LlamaGen, params: Any, indices: np.ndarray, labels: np.ndarray, seed: int,
         sample_options: Mapping[str, Any], *, mesh: jax.sharding.Mesh,
         rules: Any = parallel.DEFAULT_RULES, decoder: Decoder | None = None,
         abstract: bool = False) -> dict[str, Any]:
  """Samples ``indices`` (B,) with ``labels`` (B,) of a run seeded ``seed`` (see the module docstring).

  Args:
    model: A DiT or a LlamaGen.
    params: Its params (the "params" collection), best already on the devices.
    indices: (B,) global sample indices; B a multiple of ``parallel.batch_devices(mesh)``.
    labels: (B,) int class labels, the same host array on every process.
    seed: The run's sampling seed.
    sample_options: Sampler options (checked by :func:`options`).
    mesh: Devices the batch is split over.
    rules: Logical-axis rules of the mesh.
    decoder: The tokenizer to decode the samples with; None keeps latents or tokens.
    abstract: Only trace the program (its errors raised, nothing computed) and return ``jax.ShapeDtypeStruct`` s.

  Returns:
    Batch-sharded global arrays: DiT ``latents`` (B, h, w, C) float32, LlamaGen ``tokens`` (B, N) int32
    ((B, N, G) factorized); with a decoder also ``images`` (B, H, W, 3) float32 in about [-1, 1], not clipped.
  """
  indices = np.asarray(indices)
  opts = options(model, sample_options)
  devices = parallel.batch_devices(mesh)
  if indices.ndim != 1 or len(indices) % devices or np.shape(labels) != indices.shape:
    raise ValueError(f"indices {indices.shape} and labels {np.shape(labels)} must be (B,) with B a multiple of the "
                     f"{devices} devices of the batch.")
  noise = None
  if isinstance(model, DiT):
    noise = parallel.global_array(initial_noise(seed, indices, (model.input_size, model.input_size,
                                                                 model.in_channels)), mesh)
  tokenizer = variables = scale = None
  if decoder is not None:
    tokenizer, variables = decoder.model, decoder.variables
    if isinstance(model, DiT):
      if decoder.latent_scale is None:
        raise ValueError("decoding DiT samples needs the latent scale its codes were trained at "
                         "(Decoder.latent_scale).")
      scale = jnp.asarray(decoder.latent_scale, jnp.float32)  # an argument: one program for every scale
  program = _program(model, tuple(sorted(opts.items())), tokenizer, mesh)
  with parallel.sharding_context(mesh, rules):
    run = program.eval_shape if abstract else program
    return run(params, noise, parallel.global_array(np.asarray(labels, np.int32), mesh), batch_key(seed, indices),
               variables, scale)


def lower(model: DiT | LlamaGen, params: Any, batch: int, sample_options: Mapping[str, Any], *,
          mesh: jax.sharding.Mesh, rules: Any = parallel.DEFAULT_RULES, decoder: Decoder | None = None):
  """The program :func:`draw` runs for calls of ``batch`` samples, lowered ahead (``--compile_only``).

  ``params`` and ``decoder.variables`` may be ``jax.ShapeDtypeStruct`` trees
  (with shardings); the noise and labels are batch-sharded as :func:`draw` places them.
  """
  opts = options(model, sample_options)
  rows = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=parallel.batch_sharding(mesh, len(shape)))
  noise = None
  if isinstance(model, DiT):
    noise = rows((batch, model.input_size, model.input_size, model.in_channels), jnp.float32)
  tokenizer = variables = scale = None
  if decoder is not None:
    tokenizer, variables = decoder.model, decoder.variables
    scale = jax.ShapeDtypeStruct((), jnp.float32) if isinstance(model, DiT) else None
  program = _program(model, tuple(sorted(opts.items())), tokenizer, mesh)
  with parallel.sharding_context(mesh, rules):
    return program.lower(params, noise, rows((batch,), jnp.int32), batch_key(0, np.zeros(1, int)), variables, scale)


def calls(start: int, stop: int, batch: int, labels: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
  """The calls that draw samples ``start .. stop - 1``: ``batch`` consecutive indices each, from ``start``.

  The last call is filled up past ``stop`` so that every call has the same
  shape; its padding rows take the label of the last index of ``labels``.

  Args:
    start: The first sample index.
    stop: One past the last.
    batch: Samples per call, a multiple of the batch devices (:func:`per_call`).
    labels: (L,) the labels of every sample index, L >= stop.

  Yields:
    (indices (batch,), their labels (batch,) int32, how many leading rows are samples before ``stop``).
  """
  labels = np.asarray(labels)
  for first in range(start, stop, batch):
    idx = np.arange(first, first + batch)
    yield idx, labels[np.minimum(idx, len(labels) - 1)].astype(np.int32), min(batch, stop - first)


def draw_range(model: DiT | LlamaGen, params: Any, labels: np.ndarray, start: int, stop: int, seed: int,
               sample_options: Mapping[str, Any], *, batch: int, mesh: jax.sharding.Mesh,
               rules: Any = parallel.DEFAULT_RULES, decoder: Decoder | None = None) -> dict[str, np.ndarray]:
  """Samples ``start .. stop - 1`` (sample i with ``labels[i]``) in the :func:`calls` of ``batch`` indices.

  Args:
    labels: (L,) labels of every sample index (L >= stop).
    batch: Samples per call, a multiple of the batch devices (:func:`per_call`).
    (the rest as :func:`draw`)

  Returns:
    What :func:`draw` returns, as host arrays of ``stop - start`` rows on every process.
  """
  out: dict[str, list[np.ndarray]] = {}
  for idx, y, keep in calls(start, stop, batch, labels):
    samples = draw(model, params, idx, y, seed, sample_options, mesh=mesh, rules=rules, decoder=decoder)
    for k, v in samples.items():
      out.setdefault(k, []).append(parallel.to_host(v)[:keep])
  return {k: np.concatenate(v) for k, v in out.items()}

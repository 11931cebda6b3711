"""Autoregressive sampling of LlamaGen with its KV cache: prefill, then every position in one compiled loop.

The official ``llamagen/models/generate.py`` (single tokens) and ``generate_group.py`` (factorized
tokens), driven as ``llamagen/inference.py`` drives them, in one jitted program:

* **Decoding.** :meth:`LlamaGen.prefill` writes the class token at position 0 and gives the logits of
  token 0; then a ``lax.fori_loop`` over positions 1..N-1 feeds token n-1 through
  :meth:`LlamaGen.decode_step` and draws token n. The cache is preallocated and its index is a scalar,
  so the step is traced once and every shape is static. A model with ``scan_layers`` decodes with its
  layers unrolled (its stacked params sliced inside the program): under ``nn.scan`` the stacked cache
  is the scan's input and output, and every step would rewrite all of it.
* **Factorized tokens** (G sub-tokens per position): after the trunk step, sub-token g is drawn from
  :meth:`LlamaGen.decode_subtoken` given sub-tokens 0..g-1 of the position, g = 0..G-1 in order (a Python
  loop inside the position loop). The sub-token state is a fresh zero (B, G) array per position (the
  model reruns the G-long mini-sequence rather than caching it), so nothing is reallocated.
* **Classifier-free guidance** (``cfg_scale != 1``): the batch is doubled once, at prefill, with null
  labels, and ``logits = u + s (c - u)`` on the raw logits, before temperature and filtering, as the
  reference does (on log-probabilities it would be the same distribution: they differ from logits by
  a per-row constant). Both halves of a pair receive the same drawn token. Token n is guided iff
  ``lo <= n / N < hi`` for ``cfg_interval = (lo, hi)`` (the meaning the DiT's flow time shares,
  :mod:`ifsq_jax.sampling.guidance`); outside, the conditional logits are used unguided, as the
  reference does (it still runs the doubled batch: the unconditional half's cache must hold every token
  for later guided positions). The reference's integer ``cfg_interval = k`` guides tokens 0..k+1 (the
  prefill always, then decode steps i <= k, which draw token i + 1), i.e. ``(0, (k + 2) / N)``; its -1
  (all tokens) is accepted here and means ``(0, 1)``, other integers are refused. Its
  ``generate_group`` ignores the interval, which is honoured here for every sub-token of a guided
  position. The reference skips guidance for any ``cfg_scale <= 1``; here any
  scale other than 1 guides (a scale in (0, 1) moves towards the unconditional model).
* **Drawing** (the reference's ``sample``): ``logits / max(T, 1e-5)``, then top-k (``top_k > 0``: logits
  below the k-th largest become -inf; k is clipped to the vocabulary), then top-p (``top_p < 1``:
  nucleus filtering that keeps the most probable tokens up to and including the first whose
  cumulative probability exceeds p), then a categorical draw (Gumbel-max: the distribution of
  ``softmax`` + ``multinomial``). Ties at the top-k or top-p cut-off are all kept. ``top_k = 1`` is
  greedy argmax, with no randomness.

Differences from the reference's ``generate_group`` (its bugs, not reproduced): its
greedy path fails (``top_k(...)`` called on an int) and its ``sample_logits`` argument is ignored, while
here ``top_k=1`` is greedy for factorized models too; its temperature has no 1e-5 floor (T = 0 divides
by zero), here it has the same floor as ``generate``; it guides every position whatever
``cfg_interval``, here the interval applies.

**Randomness per row, not per device or process.** The reference's ``inference.py`` seeds every rank
with the same seed and so draws the same samples on every GPU. Here row r of the (global) batch draws
its token at step t (``t = n G + g`` for sub-token g of position n) with the key
``fold_in(fold_in(key, r), t)`` (``jax.vmap`` over rows), so rows never share randomness and a row's
sample depends only on the key, its row index, its label and the params: the same on 1 device and on
a batch sharded over 8 devices or several processes. Pass global arrays
(``jax.make_array_from_process_local_data``) and the same key on every process; for successive
batches fold the batch number into the key. (A process that calls this on a local batch must fold its
process index into its key, or its rows repeat another process's.)

Sharding: the doubled batch interleaves pairs, ``[y_0, null, y_1, null, ...]``, rather than the
reference's ``[labels | null]``: a row and its unconditional twin then sit on the same device of a
batch-sharded mesh, and guidance needs no communication.

B batch, N tokens (grid * grid, raster order), G sub-token groups (1 for single tokens), V vocabulary
(V_g of group g), D width.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ifsq_jax.models.llamagen import LlamaGen
from ifsq_jax.parallel import BATCH, VOCAB, constrain
from ifsq_jax.sampling import guidance

MIN_TEMPERATURE = 1e-5  # the reference's floor: logits / max(T, 1e-5)


def filter_logits(logits: jax.Array, *, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
  """Top-k then top-p (nucleus) filtering: logits outside become -inf.

  Args:
    logits: (B, V) float (already divided by the temperature).
    top_k: Keep logits >= the k-th largest (0: no top-k; k is clipped to V).
    top_p: Keep the most probable tokens, in order of probability, up to and including the first
      whose cumulative probability (of the top-k-filtered softmax) exceeds ``top_p``; 1: no top-p.

  Returns:
    (B, V) float32.
  """
  logits = logits.astype(jnp.float32)
  if top_k > 0:
    # The min of the top k, not its last column: XLA turns top_k + slice into a full sort (70x slower on CPU).
    kth = jnp.min(jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0], axis=-1, keepdims=True)  # (B, 1)
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1.0:
    ordered = -jnp.sort(-logits, axis=-1)  # (B, V) descending
    cumulative = jnp.cumsum(jax.nn.softmax(ordered, axis=-1), axis=-1)
    # Token i of the order is kept iff the mass before it is <= p (the first one always); a prefix, so a
    # threshold on the logit replaces the reference's scatter back to vocabulary order.
    kept = 1 + jnp.sum(cumulative[:, :-1] <= top_p, axis=-1)  # (B,)
    cutoff = jnp.take_along_axis(ordered, kept[:, None] - 1, axis=-1)  # (B, 1)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return logits


def sample_logits(logits: jax.Array, keys: jax.Array, *, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0) -> jax.Array:
  """One token per row as the reference's ``sample``; ``top_k=1`` is argmax.

  Args:
    logits: (B, V) float.
    keys: (B,) PRNG keys, one per row.
    temperature: Divides the logits (floored at 1e-5).
    top_k: See :func:`filter_logits`; 1 = greedy.
    top_p: See :func:`filter_logits`.

  Returns:
    (B,) int32.
  """
  if top_k == 1:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = filter_logits(logits / max(temperature, MIN_TEMPERATURE), top_k=top_k, top_p=top_p)
  return jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)


def guided_positions(num_tokens: int, cfg_interval: Any) -> np.ndarray:
  """(N,) bool: token n is guided iff ``lo <= n / N < hi`` (:func:`ifsq_jax.sampling.guidance.guided`)."""
  return np.asarray(guidance.guided(np.arange(num_tokens) / num_tokens, cfg_interval), bool)


def _unrolled(module: LlamaGen, params: Any) -> tuple[LlamaGen, Any]:
  """The module with unrolled layers, and its params (stacked layers sliced; a no-op without ``scan_layers``).

  Under ``nn.scan`` the stacked cache is the scan's input and output, so every decoding step rewrites
  the whole cache (2.6x slower at N = 256 on CPU); unrolled blocks update one position in place. The
  slices are a one-time copy of the layer params inside the program.
  """
  if not module.scan_layers:
    return module, params
  out = {k: v for k, v in params.items() if k not in ("layers", "factorized_blocks")}
  for name in ("layers", "factorized_blocks"):
    if name in params:
      depth = jax.tree.leaves(params[name])[0].shape[0]
      out.update({f"{name}_{i}": jax.tree.map(lambda x, i=i: x[i], params[name]) for i in range(depth)})
  return module.clone(scan_layers=False), out


def validate_options(*, cfg_scale: float, cfg_interval: Any, temperature: float, top_k: int,
                     top_p: float) -> None:
  """Raises ValueError naming a sampling option outside its valid range (see :func:`generate`)."""
  if cfg_scale < 0:
    raise ValueError(f"cfg_scale={cfg_scale} must be >= 0 (1 = no guidance).")
  guidance.interval(cfg_interval)
  if temperature < 0:
    raise ValueError(f"temperature={temperature} must be >= 0 (it is floored at {MIN_TEMPERATURE}).")
  if not isinstance(top_k, (int, np.integer)) or top_k < 0:
    raise ValueError(f"top_k={top_k!r} must be an integer >= 0 (0 = no top-k, 1 = greedy).")
  if not 0.0 <= top_p <= 1.0:
    raise ValueError(f"top_p={top_p} must be in [0, 1] (1 = no nucleus filtering).")


def _validate(module, labels, cfg_scale, cfg_interval, temperature, top_k, top_p, null_label) -> None:
  if not isinstance(module, LlamaGen):
    raise ValueError(f"module is a {type(module).__name__}; generate samples a LlamaGen.")
  if labels.ndim != 1 or not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(f"labels have shape {labels.shape} and dtype {labels.dtype}; pass (B,) integer class labels.")
  validate_options(cfg_scale=cfg_scale, cfg_interval=cfg_interval, temperature=temperature, top_k=top_k, top_p=top_p)
  if null_label is not None and not 0 <= null_label <= module.num_classes:
    raise ValueError(f"null_label={null_label} must be in [0, {module.num_classes}] (the null class is "
                     f"{module.num_classes}).")


def generate(module: LlamaGen, params: Any, labels: jax.Array, key: jax.Array, *, cfg_scale: float = 1.0,
             cfg_interval: Any = guidance.ALWAYS, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, null_label: int | None = None, return_logits: bool = False) -> Any:
  """Samples token sequences for ``labels`` (see the module docstring); jitted, options static.

  Runs as one compiled program (prefill, then a ``lax.fori_loop`` over positions); a caller may jit
  it too. Call it inside :func:`ifsq_jax.parallel.sharding_context` with batch-sharded ``labels`` to
  sample over a mesh.

  Args:
    module: The LlamaGen.
    params: Its params (the "params" collection, unboxed).
    labels: (B,) int class labels in [0, num_classes).
    key: PRNG key of the whole (global) batch; row r uses ``fold_in(key, r)``.
    cfg_scale: Guidance scale s: ``u + s (c - u)`` on the logits; 1 runs the plain batch.
    cfg_interval: (lo, hi): token n is guided iff ``lo <= n / N < hi``, the conditional logits elsewhere;
      ``-1`` or (0, 1): every token (:mod:`ifsq_jax.sampling.guidance`).
    temperature: Divides the logits (floored at 1e-5).
    top_k: Keep the k largest logits (0: all; 1: greedy argmax).
    top_p: Nucleus filtering after top-k (1: none).
    null_label: The unconditional label (default ``module.num_classes``, the null row).
    return_logits: Also return the logits each token was drawn from (guided, before temperature and
      filtering): (B, N, V) float32, memory B * N * V floats, meant for tests and analysis.

  Returns:
    tokens (B, N) int32, or (B, N, G) for a factorized model; with ``return_logits`` a pair
    (tokens, logits), logits (B, N, V) or a tuple of G arrays (B, N, V_g) for a factorized model.
  """
  labels = labels if isinstance(labels, jax.Array) else np.asarray(labels)
  _validate(module, labels, cfg_scale, cfg_interval, temperature, top_k, top_p, null_label)
  return _generate(module, params, labels, key, cfg_scale=float(cfg_scale),
                   cfg_interval=guidance.interval(cfg_interval), temperature=float(temperature),
                   top_k=int(top_k), top_p=float(top_p),
                   null_label=module.num_classes if null_label is None else int(null_label),
                   return_logits=bool(return_logits))


@functools.partial(jax.jit, static_argnums=0, static_argnames=("cfg_scale", "cfg_interval", "temperature", "top_k",
                                                                "top_p", "null_label", "return_logits"))
def _generate(module: LlamaGen, params: Any, labels: jax.Array, key: jax.Array, *, cfg_scale: float,
              cfg_interval: tuple[float, float], temperature: float, top_k: int, top_p: float, null_label: int,
              return_logits: bool) -> Any:
  module, params = _unrolled(module, params)
  b, num_tokens, groups = labels.shape[0], module.seq_len, len(module.vocab_sizes)
  guided = cfg_scale != 1.0
  mask = guided_positions(num_tokens, cfg_interval)
  row_keys = jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.arange(b))  # (B,)

  def double(x):
    """(B, ...) -> (2B, ...) with row b twice in a row: the layout of the doubled batch."""
    return constrain(jnp.repeat(x, 2, axis=0), (BATCH,) + (None,) * (x.ndim - 1)) if guided else x

  def combine(logits, n):
    """(B', V) model logits of position n -> (B, V) logits to draw from."""
    if not guided:
      return logits
    pairs = logits.reshape(b, 2, logits.shape[-1])
    cond, uncond = pairs[:, 0], pairs[:, 1]
    out = uncond + cfg_scale * (cond - uncond)
    if not mask.all():
      out = jnp.where(jnp.asarray(mask)[n], out, cond)
    return constrain(out, (BATCH, VOCAB))

  def draw(logits, step):
    keys = jax.vmap(jax.random.fold_in, (0, None))(row_keys, step)
    return sample_logits(logits, keys, temperature=temperature, top_k=top_k, top_p=top_p)

  def position(out, n):
    """The trunk's output at position n -> (tokens (B, G), logits per group ((B, V_g), ...))."""
    if not module.factorized:
      logits = combine(out, n)
      return draw(logits, n)[:, None], (logits,)
    subtokens = jnp.zeros((out.shape[0], groups), jnp.int32)  # this position's sub-tokens, filled in order
    drawn, all_logits = [], []
    for g in range(groups):
      logits = combine(module.apply({"params": params}, out, subtokens, g, method=LlamaGen.decode_subtoken), n)
      token = draw(logits, n * groups + g)
      subtokens = subtokens.at[:, g].set(double(token))
      drawn.append(token)
      all_logits.append(logits)
    return jnp.stack(drawn, axis=-1), tuple(all_logits)

  def write(buffer, value, n):
    """buffer (B, N, ...) with value (B, ...) at position n."""
    return jax.lax.dynamic_update_slice_in_dim(buffer, value[:, None].astype(buffer.dtype), n, axis=1)

  labels_in = labels.astype(jnp.int32)
  if guided:
    labels_in = jnp.stack([labels_in, jnp.full_like(labels_in, null_label)], axis=1).reshape(2 * b)
  out, state = module.apply({"params": params}, constrain(labels_in, (BATCH,)), method=LlamaGen.prefill,
                            mutable=["cache"])
  first, first_logits = position(out, 0)
  tokens = write(constrain(jnp.zeros((b, num_tokens, groups), jnp.int32), (BATCH, None, None)), first, 0)
  buffers = ()
  if return_logits:
    buffers = tuple(write(constrain(jnp.zeros((b, num_tokens, v), jnp.float32), (BATCH, None, VOCAB)), l, 0)
                    for v, l in zip(module.vocab_sizes, first_logits))

  def body(n, carry):
    cache, tokens, buffers = carry
    previous = jax.lax.dynamic_index_in_dim(tokens, n - 1, axis=1, keepdims=False)  # (B, G)
    previous = previous if module.factorized else previous[:, 0]
    out, state = module.apply({"params": params, "cache": cache}, double(previous), method=LlamaGen.decode_step,
                              mutable=["cache"])
    drawn, logits = position(out, n)
    buffers = tuple(write(buf, l, n) for buf, l in zip(buffers, logits)) if return_logits else ()
    return state["cache"], write(tokens, drawn, n), buffers

  _, tokens, buffers = jax.lax.fori_loop(1, num_tokens, body, (state["cache"], tokens, buffers))
  if not module.factorized:
    tokens, buffers = tokens[..., 0], buffers[:1]
  if not return_logits:
    return tokens
  return tokens, (buffers if module.factorized else buffers[0])

"""Train state, optimizer, gradient accumulation and EMA: pure functions shared by all trainers.

B batch, M micro-batches.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes; checkpointed whole.

  Attributes:
    step: Steps taken (skipped non-finite steps included), int32 scalar.
    params: Trainable parameters (a trainer with two models keeps a dict).
    opt_state: Optimizer state (a dict when there are several optimizers).
    ema_params: Exponential moving average of ``params``.
    extra: Non-trainable model state, e.g. BatchNorm statistics (or None).
    nonfinite_run: Non-finite steps in a row, int32 scalar.
    nonfinite_total: Non-finite steps in all, int32 scalar.
  """

  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Any
  extra: Any = None
  nonfinite_run: jax.Array = flax.struct.field(default_factory=lambda: jnp.zeros((), jnp.int32))
  nonfinite_total: jax.Array = flax.struct.field(default_factory=lambda: jnp.zeros((), jnp.int32))


def create_state(params: Any, tx: optax.GradientTransformation, extra: Any = None) -> TrainState:
  """A fresh state (works on logically boxed params: the boxes carry over to opt_state and EMA)."""
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    ema_params=jax.tree.map(jnp.copy, params), extra=extra)


def make_optimizer(opt: ml_collections.ConfigDict, num_steps: int) -> optax.GradientTransformation:
  """AdamW with a weight-decay mask, global-norm clipping and a constant or warmup-cosine schedule."""
  if opt.schedule == "warmup_cosine":
    lr = optax.warmup_cosine_decay_schedule(0.0, opt.lr, max(opt.warmup_steps, 0), max(num_steps, opt.warmup_steps + 1),
                                            end_value=opt.lr * opt.min_lr_ratio)
  else:
    lr = optax.constant_schedule(opt.lr) if opt.warmup_steps == 0 else optax.linear_schedule(0.0, opt.lr, opt.warmup_steps)
  mask = None if opt.decay_mask == "all" else matrices_mask
  parts = [optax.clip_by_global_norm(opt.grad_clip_norm)] if opt.grad_clip_norm > 0 else []
  parts.append(optax.adamw(lr, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay, mask=mask))
  return optax.chain(*parts)


# Leaves that are never matrices, whatever their rank: a scanned stack of layers gives its norm scales and
# biases a leading layer axis.
_VECTOR_NAMES = ("scale", "bias")


def matrices_mask(params: Any) -> Any:
  """True for the weight matrices (rank >= 2, not a norm scale or bias, even when stacked over layers)."""
  def is_matrix(path, p):
    names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    return p.ndim >= 2 and not (names and names[-1] in _VECTOR_NAMES)

  return jax.tree_util.tree_map_with_path(is_matrix, params)


LossFn = Callable[[Any, dict[str, jax.Array], jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


def split_micro_batches(batch: Any, num_micro: int) -> Any:
  """(B, ...) leaves -> (M, B/M, ...): micro-batch i takes rows i, i + M, i + 2M, ...

  Strided rows keep every device on its own rows when the batch is sharded over
  devices (no resharding), whatever M.
  """
  def split(x):
    if x.shape[0] % num_micro:
      raise ValueError(f"a batch of {x.shape[0]} rows does not split into {num_micro} micro-batches.")
    return jnp.swapaxes(x.reshape((x.shape[0] // num_micro, num_micro) + x.shape[1:]), 0, 1)
  return jax.tree.map(split, batch)


def accumulate(fn: Callable[[Any, jax.Array, Any], tuple[Any, Any]], batch: Any, rng: jax.Array, num_micro: int,
               carry: Any = None) -> tuple[Any, Any]:
  """Means over ``num_micro`` micro-batches of what ``fn`` returns, in one ``lax.scan``.

  The shared gradient-accumulation helper of every trainer: ``fn`` computes
  whatever a step averages (loss, metrics, gradients, ...) on one micro-batch.
  With a per-example mean loss, mean gradients over micro-batches equal the
  full-batch gradient. ``carry`` threads state that changes from one
  micro-batch to the next (e.g. BatchNorm running statistics).

  Args:
    fn: (micro-batch, rng, carry) -> (tree to average, new carry).
    batch: Tree of (B, ...) arrays.
    rng: Key; micro-batch i uses ``fold_in(rng, i)``; with M = 1 the batch uses ``rng`` itself.
    num_micro: M, dividing B.
    carry: Initial carry (None for none).

  Returns:
    (mean of the averaged tree, final carry).
  """
  if num_micro == 1:
    return fn(batch, rng, carry)
  micro = split_micro_batches(batch, num_micro)

  def body(acc_carry, inputs):
    acc, c = acc_carry
    i, mb = inputs
    out, c = fn(mb, jax.random.fold_in(rng, i), c)
    return (jax.tree.map(jnp.add, acc, out), c), None

  first = jax.tree.map(lambda x: x[0], micro)
  shapes = jax.eval_shape(lambda: fn(first, rng, carry)[0])
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  (total, carry), _ = jax.lax.scan(body, (zeros, carry), (jnp.arange(num_micro), micro))
  return jax.tree.map(lambda a: a / num_micro, total), carry


def accumulate_gradients(loss_fn: LossFn, params: Any, batch: dict[str, jax.Array], rng: jax.Array,
                         num_micro: int) -> tuple[jax.Array, dict[str, jax.Array], Any]:
  """Mean loss, mean aux metrics and mean gradients over ``num_micro`` micro-batches (:func:`accumulate`).

  Args:
    loss_fn: (params, batch, rng) -> (scalar loss, dict of scalar metrics).
    params: Parameters.
    batch: Dict of (B, ...) arrays.
    rng: Key; micro-batch i uses ``fold_in(rng, i)`` (the full batch uses rng).
    num_micro: M, dividing B.
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def micro(mb, r, carry):
    (loss, aux), grads = grad_fn(params, mb, r)
    return (loss, aux, grads), carry

  (loss, aux, grads), _ = accumulate(micro, batch, rng, num_micro)
  return loss, aux, grads


def ema_update(ema: Any, params: Any, decay: float) -> Any:
  return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)


def apply_gradients(state: TrainState, grads: Any, tx: optax.GradientTransformation, ema_decay: float,
                    **replace: Any) -> TrainState:
  """One optimizer update, the EMA update and ``step + 1``."""
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                       ema_params=ema_update(state.ema_params, params, ema_decay), **replace)


def apply_if_finite(state: TrainState, loss: jax.Array, grad_norm: jax.Array,
                    update: Callable[[TrainState], TrainState]) -> tuple[TrainState, jax.Array]:
  """``update(state)`` when the loss and the gradients are finite, else ``state``; then ``step + 1``.

  The decision comes from the loss and the gradients' global norm (non-finite
  when any gradient is), before anything is updated, as ``optax.apply_if_finite``
  does. The update runs inside ``lax.cond``, so the compiled step holds one
  state, updated in place in the donated buffers; selecting between an old and
  a new state after the update (``jnp.where`` over every leaf) would keep both
  alive. A skipped step counts in ``nonfinite_run`` / ``nonfinite_total``.

  Args:
    state: The current state.
    loss: The step's scalar loss.
    grad_norm: The global norm of the step's gradients (all of them).
    update: state -> updated state (optimizer, EMA, statistics); its ``step``
      and non-finite counters are overwritten here.

  Returns:
    (new state, ``nonfinite`` as float32 1.0 or 0.0 for the metrics).
  """
  ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  new = jax.lax.cond(ok, update, lambda s: s, state)
  new = new.replace(step=state.step + 1, nonfinite_run=jnp.where(ok, 0, state.nonfinite_run + 1),
                    nonfinite_total=state.nonfinite_total + (~ok).astype(jnp.int32))
  return new, (~ok).astype(jnp.float32)

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
  mask = None if opt.decay_mask == "all" else (lambda params: jax.tree.map(lambda p: p.ndim >= 2, params))
  parts = [optax.clip_by_global_norm(opt.grad_clip_norm)] if opt.grad_clip_norm > 0 else []
  parts.append(optax.adamw(lr, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay, mask=mask))
  return optax.chain(*parts)


LossFn = Callable[[Any, dict[str, jax.Array], jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


def accumulate_gradients(loss_fn: LossFn, params: Any, batch: dict[str, jax.Array], rng: jax.Array,
                         num_micro: int) -> tuple[jax.Array, dict[str, jax.Array], Any]:
  """Mean loss, mean aux metrics and mean gradients over ``num_micro`` micro-batches.

  Micro-batch i takes rows i, i + M, i + 2M, ... of the batch, so every device
  keeps working on its own rows (no resharding); with a per-example mean loss
  the result equals the full-batch gradient.

  Args:
    loss_fn: (params, batch, rng) -> (scalar loss, dict of scalar metrics).
    params: Parameters.
    batch: Dict of (B, ...) arrays.
    rng: Key; micro-batch i uses ``fold_in(rng, i)`` (the full batch uses rng).
    num_micro: M, dividing B.
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if num_micro == 1:
    (loss, aux), grads = grad_fn(params, batch, rng)
    return loss, aux, grads

  def split(x):  # (B, ...) -> (M, B/M, ...)
    return jnp.swapaxes(x.reshape((x.shape[0] // num_micro, num_micro) + x.shape[1:]), 0, 1)

  micro = jax.tree.map(split, batch)

  def body(carry, inputs):
    i, mb = inputs
    (loss, aux), grads = grad_fn(params, mb, jax.random.fold_in(rng, i))
    return jax.tree.map(jnp.add, carry, (loss, aux, grads)), None

  zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(lambda: grad_fn(params, jax.tree.map(lambda x: x[0], micro), rng)))
  (loss, aux), grads = zeros
  (loss, aux, grads), _ = jax.lax.scan(body, (loss, aux, grads), (jnp.arange(num_micro), micro))
  scale = 1.0 / num_micro
  return loss * scale, jax.tree.map(lambda a: a * scale, aux), jax.tree.map(lambda g: g * scale, grads)


def ema_update(ema: Any, params: Any, decay: float) -> Any:
  return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)


def apply_gradients(state: TrainState, grads: Any, tx: optax.GradientTransformation, ema_decay: float,
                    **replace: Any) -> TrainState:
  """One optimizer update, the EMA update and ``step + 1``."""
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                       ema_params=ema_update(state.ema_params, params, ema_decay), **replace)


def all_finite(tree: Any) -> jax.Array:
  """True when every floating leaf is finite."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def guard_nonfinite(old: TrainState, new: TrainState, metrics: dict[str, jax.Array]) -> tuple[TrainState, dict]:
  """Keeps ``old`` (with step + 1) when the loss, gradients or new state are not finite.

  The trainer's metrics must hold ``loss`` and should hold ``grad_norm``.
  """
  ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics.get("grad_norm", 0.0)) & all_finite(new.params)
  kept = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
  run = jnp.where(ok, 0, old.nonfinite_run + 1)
  kept = kept.replace(step=old.step + 1, nonfinite_run=run, nonfinite_total=old.nonfinite_total + (~ok))
  return kept, {**metrics, "nonfinite": (~ok).astype(jnp.float32)}

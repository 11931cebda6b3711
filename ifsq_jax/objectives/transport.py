"""The flow-matching objective of the DiT generator (SiT's linear path, velocity prediction, REPA).

Convention (SiT, as the reference ``dit/transport``): ``x1`` is a data latent,
``x0 ~ N(0, I)`` noise, and **t = 0 is noise, t = 1 is data**:

    x_t = t x1 + (1 - t) x0,    u_t = x1 - x0.

Per sample, with ``v = model(x_t, t, y)``:

* ``mse = mean_{H,W,C} (v - u_t)^2``;
* ``cos = mean_{H,W} (1 - cos_C(v, u_t))``, cosine over channels (eps 1e-8 as ``F.cosine_similarity``);
* ``proj = -mean_{B,N} cos_D(zhat, z)``, the REPA term between the model's projected tokens and
  the frozen encoder's features, both normalised in float32;
* ``loss = mean_B mse + mean_B cos + proj_coef * proj`` (proj_coef 0.5 in the reference).

t is logit-normal (``sigmoid(N(mu, sigma^2))``, mu = 0, sigma = 1 in the reference) or uniform,
optionally remapped by a timestep shift ``s t / (1 + (s - 1) t)``: s > 1 moves t towards the
data end, s < 1 towards noise (the reference's ``shift_lg`` never reaches its transport, so
its training uses no shift). Every loss is computed in float32 whatever the model's dtype.

B batch, H W latent size, C latent channels, N tokens, D feature width.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from ifsq_jax import parallel

TIME_KINDS = ("lognorm", "uniform")
COSINE_EPS = 1e-8  # F.cosine_similarity's default
NORMALIZE_EPS = 1e-12  # F.normalize's default

# velocity_fn(x_t (B, H, W, C), t (B,), y (B,)) -> v (B, H, W, C) or (v, features (B, N, D)).
VelocityFn = Callable[[jax.Array, jax.Array, jax.Array], Any]


def shift_time(t: jax.Array, shift: float) -> jax.Array:
  """The timestep shift ``s t / (1 + (s - 1) t)``: a monotone map of [0, 1] onto itself, identity at s = 1."""
  if shift <= 0:
    raise ValueError(f"shift={shift} must be > 0 (1 = no shift).")
  return shift * t / (1.0 + (shift - 1.0) * t)


def sample_time(key: jax.Array, shape: tuple[int, ...], kind: str = "lognorm", mu: float = 0.0,
                sigma: float = 1.0, shift: float = 1.0) -> jax.Array:
  """Draws training times t in [0, 1] (float32), t = 1 being data.

  Args:
    key: PRNG key.
    shape: Output shape, usually ``(B,)``.
    kind: ``"lognorm"``: ``sigmoid(mu + sigma n)``, n ~ N(0, 1) (the reference's default);
      ``"uniform"``: U(0, 1) (``mu`` and ``sigma`` unused).
    mu: Location of the logit-normal.
    sigma: Scale of the logit-normal, > 0.
    shift: Timestep shift s > 0 applied after drawing (1 = none), see :func:`shift_time`.

  Returns:
    t of ``shape``, float32.
  """
  if kind not in TIME_KINDS:
    raise ValueError(f"time kind {kind!r} is not valid; use one of {TIME_KINDS}.")
  if sigma <= 0:
    raise ValueError(f"sigma={sigma} must be > 0.")
  if kind == "lognorm":
    t = jax.nn.sigmoid(mu + sigma * jax.random.normal(key, shape, jnp.float32))
  else:
    t = jax.random.uniform(key, shape, jnp.float32)
  return t if shift == 1.0 else shift_time(t, shift)


def _expand_time(t: jax.Array, x: jax.Array) -> jax.Array:
  """(B,) -> (B, 1, ..., 1), broadcastable against x (B, ...)."""
  return jnp.reshape(t, t.shape + (1,) * (x.ndim - t.ndim))


def interpolate(x0: jax.Array, x1: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The linear path: ``(x_t, u_t) = (t x1 + (1 - t) x0, x1 - x0)`` in float32.

  Args:
    x0: Noise (B, H, W, C).
    x1: Data (B, H, W, C).
    t: Times (B,), broadcast over H, W, C.
  """
  x0, x1 = x0.astype(jnp.float32), x1.astype(jnp.float32)
  tt = _expand_time(t.astype(jnp.float32), x1)
  return tt * x1 + (1.0 - tt) * x0, x1 - x0


def mse(pred: jax.Array, target: jax.Array) -> jax.Array:
  """Per-sample mean squared error (B, ...) -> (B,), float32."""
  d = pred.astype(jnp.float32) - target.astype(jnp.float32)
  return jnp.mean(jnp.square(d), axis=tuple(range(1, d.ndim)))


def _normalize(x: jax.Array, eps: float) -> jax.Array:
  """``x / max(|x|, eps)`` over the last axis in float32 (fp16 normalisation goes NaN in long runs).

  The clamp acts on the squared norm: the same value, but a finite gradient at x = 0
  (sqrt's infinite slope there would make it NaN), which the zero-initialised
  final layer of a DiT outputs at step 0.
  """
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(x), axis=-1, keepdims=True), eps * eps))


def _cosine(a: jax.Array, b: jax.Array, eps: float) -> jax.Array:
  """Cosine similarity over the last axis, each side's norm clamped to eps (torch's formula)."""
  return jnp.sum(_normalize(a, eps) * _normalize(b, eps), axis=-1)


def cosine_loss(pred: jax.Array, target: jax.Array) -> jax.Array:
  """Per-sample ``mean over tokens of 1 - cos(pred, target)``, cosine over channels (last axis).

  Args:
    pred: (B, H, W, C) predicted velocity.
    target: (B, H, W, C) target velocity.

  Returns:
    (B,) float32.
  """
  cos = _cosine(pred, target, COSINE_EPS)  # (B, H, W)
  return jnp.mean(1.0 - cos, axis=tuple(range(1, cos.ndim)))


def repa_loss(pred: jax.Array, target: jax.Array) -> jax.Array:
  """REPA alignment: ``-mean over batch and tokens of cos(pred, target)``, a float32 scalar.

  Args:
    pred: (B, N, D) the model's projected tokens.
    target: (B, N, D) the frozen encoder's features (no gradient flows into them).
  """
  if pred.shape != target.shape:
    raise ValueError(f"REPA prediction {pred.shape} and target {target.shape} must have the same (B, N, D) shape.")
  return -jnp.mean(_cosine(pred, jax.lax.stop_gradient(target), NORMALIZE_EPS))


def split_prediction(out: Any) -> tuple[jax.Array, jax.Array | None]:
  """A velocity_fn's output -> (velocity, REPA features or None); accepts ``v`` or ``(v, features)``."""
  if isinstance(out, (tuple, list)):
    if len(out) != 2:
      raise ValueError(f"velocity_fn returned {len(out)} values; return v or (v, repa_features).")
    return out[0], out[1]
  return out, None


def flow_matching_terms(velocity_fn: VelocityFn, x0: jax.Array, x1: jax.Array, t: jax.Array, y: jax.Array, *,
                        repa_target: jax.Array | None = None, proj_coef: float = 0.5,
                        use_cosine_loss: bool = True) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The flow-matching loss at given noise and times (see :func:`flow_matching_loss`)."""
  xt, ut = interpolate(x0, x1, t)
  v, features = split_prediction(velocity_fn(xt, t, y))
  if v.shape != ut.shape:
    raise ValueError(f"velocity_fn returned shape {v.shape}; expected the latent shape {ut.shape}.")
  zero = jnp.zeros((), jnp.float32)
  mse_b = mse(v, ut)
  cos = jnp.mean(cosine_loss(v, ut)) if use_cosine_loss else zero
  if repa_target is None:
    proj = zero
  elif features is None:
    raise ValueError("repa_target was given but velocity_fn returned no REPA features; "
                     "return (v, features), e.g. module.apply(..., return_repa=True).")
  else:
    proj = repa_loss(features, repa_target)
  loss = jnp.mean(mse_b) + cos + proj_coef * proj
  tf = t.astype(jnp.float32)
  terms = {"loss": loss, "mse": jnp.mean(mse_b), "cos": cos, "proj": proj,
           "t_mean": jnp.mean(tf), "t_min": jnp.min(tf), "t_max": jnp.max(tf)}
  return loss, terms


def flow_matching_loss(velocity_fn: VelocityFn, key: jax.Array, x1: jax.Array, y: jax.Array, *,
                       repa_target: jax.Array | None = None, proj_coef: float = 0.5, use_cosine_loss: bool = True,
                       time_kind: str = "lognorm", mu: float = 0.0, sigma: float = 1.0,
                       shift: float = 1.0) -> tuple[jax.Array, dict[str, jax.Array]]:
  """``mean mse + mean cos + proj_coef * proj`` on one batch, drawing x0 and t from ``key``.

  A trainer passes a closure over the model, for example
  ``lambda x, t, y: module.apply({"params": p}, x, t, y, train=True, return_repa=True,
  rngs={"dropout": dropout_key})``; its label dropout rng is the closure's business.

  Args:
    velocity_fn: ``(x_t (B, H, W, C), t (B,), y (B,)) -> v`` or ``(v, features (B, N, D))``.
    key: PRNG key for t and x0 (split here).
    x1: Data latents (B, H, W, C).
    y: Labels (B,), passed through to velocity_fn.
    repa_target: Encoder features (B, N, D), or None for no REPA term (then proj is 0).
    proj_coef: Weight of the REPA term.
    use_cosine_loss: Adds the channel-cosine term (the reference's default).
    time_kind: ``"lognorm"`` or ``"uniform"``, see :func:`sample_time`.
    mu: Logit-normal location.
    sigma: Logit-normal scale.
    shift: Timestep shift of the drawn t (1 = none).

  Returns:
    (loss, terms): the float32 scalar loss and float32 scalars ``loss``, ``mse``, ``cos``,
    ``proj`` (unweighted), ``t_mean``, ``t_min``, ``t_max``.
  """
  key_t, key_x0 = jax.random.split(key)
  t = sample_time(key_t, (x1.shape[0],), time_kind, mu, sigma, shift)
  x0 = jax.random.normal(key_x0, x1.shape, jnp.float32)
  x0 = parallel.constrain(x0, (parallel.BATCH,) + (None,) * (x1.ndim - 1))  # drawn where x1's rows live
  return flow_matching_terms(velocity_fn, x0, x1, t, y, repa_target=repa_target, proj_coef=proj_coef,
                             use_cosine_loss=use_cosine_loss)

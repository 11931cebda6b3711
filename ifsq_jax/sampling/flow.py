"""Flow samplers for the DiT generator: the probability-flow ODE and SiT's SDE, one compiled loop each.

Convention as the objective (``objectives/transport.py``): t = 0 is noise, t = 1 is data, and the
model predicts the velocity ``v(x, t) = E[x1 - x0 | x_t = x]`` of the linear path
``x_t = t x1 + (1 - t) x0``. Sampling integrates from t = 0 (the given noise) to t = 1.

**Time grid.** ``linspace(0, 1, N + 1)``, remapped by ``t' = s t / (1 + (s - 1) t)`` when the shift
s > 0 (the reference's ``timestep_shift``; 0 disables it, and s = 1 is the identity). s > 1 takes
large steps near the noise and small steps near the data, s < 1 the reverse.

**ODE** (``mode="ode"``, the reference's sampler): ``dx/dt = v(x, t)``.

* ``method="euler"``: ``x <- x + (t_{i+1} - t_i) v(x, t_i)``, N model calls, never at t = 1, exactly as
  the reference's fixed-grid torchdiffeq Euler.
* ``method="heun"``: Heun's second-order predictor-corrector,
  ``x <- x + h/2 (v(x, t_i) + v(x + h v(x, t_i), t_{i+1}))``. The corrector of the step into t = 1 would
  call the model at t = 1, where it is never trained (logit-normal t) and where the SDE's score is
  singular, so that last step is a plain Euler step (as EDM's Heun sampler does at sigma = 0); its
  local error is O(h^2), so the method stays second order. 2N - 1 model calls. (The reference
  passes its method name to torchdiffeq, whose fixed-grid solvers differ; its config uses Euler.)

**SDE** (``mode="sde"``, SiT's sampler). For data ``x1`` and ``x_t | x1 ~ N(t x1, (1 - t)^2 I)`` the score is
``s(x, t) = -(x - t E[x1 | x]) / (1 - t)^2``. With ``x = t E[x1|x] + (1 - t) E[x0|x]`` and
``v = E[x1|x] - E[x0|x]``, ``E[x1|x] = x + (1 - t) v``, hence

    s(x, t) = (t v - x) / (1 - t).

For any ``w(t) >= 0`` the SDE ``dx = [v + w s] dt + sqrt(2 w) dW`` has the same marginals as the ODE
(the extra drift ``w grad log p`` and the diffusion cancel in the Fokker-Planck equation).
``sde_diffusion`` picks w: ``"sigma"`` (default, SiT's sampling default) and ``"linear"`` are
``norm (1 - t)`` on this path, which makes ``w s = norm (t v - x)`` finite up to t = 1; ``"constant"`` is
``norm``. The grid is ``t1 * time_grid(N - 1, shift)`` with ``t1 = 1 - last_step_size``: N - 1
Euler-Maruyama steps ``x <- x + h drift(x, t) + sqrt(2 w(t) h) xi`` (``method="heun"``: SiT's stochastic
Heun, noise first, then a Heun step of the drift), then a deterministic last step from t1 to 1:

* ``"mean"`` (default): ``x + (1 - t1) (v + w s)(x, t1)``, the drift without noise;
* ``"euler"``: ``x + (1 - t1) v(x, t1) = E[x1 | x_t1]`` (SiT's "Tweedie" step is the same expression on
  the linear path);
* ``"none"``: the grid ends at t = 1 and nothing follows (the noise of the last step stays).

With Euler, N model calls (N - 1 for ``"none"``). The reference's SDE path passes the model's ``(v, zs)`` tuple to its
score function (a bug: it never ran); here the velocity alone is used, as was meant.

**Classifier-free guidance** (``cfg_scale != 1``): the velocity_fn is called once per evaluation on the
batch ``[x | x]`` with labels ``[y | null]`` and ``v = v_u + s (v_c - v_u)`` on every channel.
``cfg_channels=3`` reproduces the reference's ``forward_with_cfg``, which guides only channels 0..2
(inherited from DiT, whose 4 other channels were a learned variance) and keeps the conditional
prediction in the remaining channels: a bug of the reference, kept only for parity. An evaluation at
time t is guided iff ``lo <= t < hi`` for ``cfg_interval = (lo, hi)`` (:mod:`ifsq_jax.sampling.guidance`:
the meaning LlamaGen's token positions share; ``-1`` means always); outside it the conditional
prediction is used unguided and only the conditional half is evaluated. The model is never evaluated
at t = 1, so ``(start, 1)`` is the reference's ``cfg_interval_start = start`` (guided iff t >= start).

B batch, H W latent size, C latent channels, N steps.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from ifsq_jax import parallel
from ifsq_jax.eval.fid import to_uint8  # noqa: F401  re-exported: clip(127.5 x + 128, 0, 255) truncated
from ifsq_jax.objectives import transport
from ifsq_jax.sampling import guidance

METHODS = ("euler", "heun")
MODES = ("ode", "sde")
LAST_STEPS = ("mean", "euler", "none")
# w(t) of the SDE, before the norm factor; "sigma" is the noise coefficient 1 - t of the linear path.
SDE_DIFFUSIONS = {
    "sigma": lambda t: 1.0 - t,
    "linear": lambda t: 1.0 - t,
    "constant": lambda t: jnp.ones_like(t),
}

# velocity_fn(x (B, H, W, C), t (B,), y (B,)) -> v (B, H, W, C), or (v, anything) as a training closure returns.
VelocityFn = Callable[[jax.Array, jax.Array, jax.Array], Any]


def _grid64(num_steps: int, shift: float) -> np.ndarray:
  if not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
    raise ValueError(f"num_steps={num_steps!r} must be an integer >= 1.")
  if shift < 0:
    raise ValueError(f"shift={shift} must be >= 0 (0 = no shift).")
  t = np.linspace(0.0, 1.0, int(num_steps) + 1)
  if shift > 0:
    t = transport.shift_time(t, shift)
    t[-1] = 1.0  # the map fixes 1, but s / (1 + (s - 1)) need not round to it
  return t


def time_grid(num_steps: int, shift: float = 0.0) -> np.ndarray:
  """The N + 1 times ``linspace(0, 1, N + 1)``, shifted by ``s t / (1 + (s - 1) t)`` if s > 0; float32 (N + 1,).

  Computed in float64 and rounded once, so ``t_0 = 0`` and ``t_N = 1`` exactly.
  """
  return _grid64(num_steps, shift).astype(np.float32)


def _velocity(velocity_fn: VelocityFn, x: jax.Array, t: jax.Array, y: jax.Array) -> jax.Array:
  v, _ = transport.split_prediction(velocity_fn(x, t, y))
  if v.shape != x.shape:
    raise ValueError(f"velocity_fn returned shape {v.shape} for x of shape {x.shape}.")
  return v.astype(jnp.float32)


def _batch_axes(x: jax.Array) -> tuple[str | None, ...]:
  return (parallel.BATCH,) + (None,) * (x.ndim - 1)


def guided_velocity(velocity_fn: VelocityFn, x: jax.Array, t: jax.Array, y: jax.Array, *, cfg_scale: float,
                    null_label: int, cfg_channels: int | None = None) -> jax.Array:
  """Classifier-free guided velocity from one call on ``[x | x]`` with labels ``[y | null]``.

  Args:
    velocity_fn: The model, ``(x, t, y) -> v``.
    x: (B, H, W, C) current state.
    t: (B,) times.
    y: (B,) labels.
    cfg_scale: Guidance scale s: ``v = v_u + s (v_c - v_u)``.
    null_label: The label of the unconditional (null) class.
    cfg_channels: None guides every channel; k guides channels 0..k-1 only and keeps the conditional
      prediction in the others (``3`` is the reference's quirk).

  Returns:
    (B, H, W, C) float32.
  """
  b = x.shape[0]
  xx = parallel.constrain(jnp.concatenate([x, x]), _batch_axes(x))
  yy = jnp.concatenate([y, jnp.full_like(y, null_label)])
  v = _velocity(velocity_fn, xx, jnp.concatenate([t, t]), yy)
  v_c, v_u = v[:b], v[b:]
  guided = v_u + cfg_scale * (v_c - v_u)
  if cfg_channels is not None:
    guided = jnp.concatenate([guided[..., :cfg_channels], v_c[..., cfg_channels:]], axis=-1)
  return guided


def validate_options(*, num_steps: int, method: str, mode: str, shift: float,
                     cfg_interval: Any = guidance.ALWAYS) -> None:
  """Raises ValueError naming a sampler option outside its valid range (see :func:`sample`)."""
  if method not in METHODS:
    raise ValueError(f"method={method!r} is not valid; use one of {METHODS}.")
  if mode not in MODES:
    raise ValueError(f"mode={mode!r} is not valid; use one of {MODES}.")
  if not isinstance(num_steps, (int, np.integer)) or num_steps < (2 if mode == "sde" else 1):
    raise ValueError(f"num_steps={num_steps!r} must be an integer >= {2 if mode == 'sde' else 1} for mode={mode!r}.")
  if shift < 0:
    raise ValueError(f"shift={shift} must be >= 0 (0 = no shift).")
  guidance.interval(cfg_interval)


def _validate(noise, labels, num_steps, method, mode, shift, cfg_scale, null_label, cfg_channels, cfg_interval,
              key, sde_diffusion, sde_diffusion_norm, last_step, last_step_size) -> None:
  validate_options(num_steps=num_steps, method=method, mode=mode, shift=shift, cfg_interval=cfg_interval)
  if noise.ndim < 2 or labels.shape != noise.shape[:1]:
    raise ValueError(f"noise {noise.shape} must be (B, H, W, C) and labels {labels.shape} must be (B,).")
  if cfg_scale != 1.0 and null_label is None:
    raise ValueError(f"cfg_scale={cfg_scale} needs null_label (the unconditional class, num_classes for the DiT).")
  if cfg_channels is not None and not 1 <= cfg_channels <= noise.shape[-1]:
    raise ValueError(f"cfg_channels={cfg_channels} must be None or in [1, {noise.shape[-1]}] (the channels).")
  if mode == "sde":
    if key is None:
      raise ValueError("mode='sde' draws noise: pass key.")
    if sde_diffusion not in SDE_DIFFUSIONS:
      raise ValueError(f"sde_diffusion={sde_diffusion!r} is not valid; use one of {tuple(SDE_DIFFUSIONS)}.")
    if sde_diffusion_norm < 0:
      raise ValueError(f"sde_diffusion_norm={sde_diffusion_norm} must be >= 0.")
    if last_step not in LAST_STEPS:
      raise ValueError(f"last_step={last_step!r} is not valid; use one of {LAST_STEPS}.")
    if last_step != "none" and not 0.0 < last_step_size < 1.0:
      raise ValueError(f"last_step_size={last_step_size} must be in (0, 1).")


def sample(velocity_fn: VelocityFn, noise: jax.Array, labels: jax.Array, *, num_steps: int, method: str = "euler",
           mode: str = "ode", shift: float = 0.0, cfg_scale: float = 1.0, null_label: int | None = None,
           cfg_channels: int | None = None, cfg_interval: Any = guidance.ALWAYS,
           key: jax.Array | None = None, sde_diffusion: str = "sigma", sde_diffusion_norm: float = 1.0,
           last_step: str = "mean", last_step_size: float = 0.04) -> jax.Array:
  """Integrates the flow from noise (t = 0) to data (t = 1); the caller jits (options are static Python values).

  The time loop is one ``lax.fori_loop``; Heun's final Euler step and the SDE's last step follow it.

  Args:
    velocity_fn: The model, ``(x (B', H, W, C), t (B',), y (B',)) -> v`` (or ``(v, ...)``); B' = 2B with
      guidance.
    noise: (B, H, W, C) the state at t = 0 (any (B, ...) shape works).
    labels: (B,) int class labels.
    num_steps: Steps N of the grid (``time_grid``); >= 2 for the SDE.
    method: ``"euler"`` or ``"heun"``.
    mode: ``"ode"`` or ``"sde"``.
    shift: Timestep shift of the grid (0 = none).
    cfg_scale: Guidance scale; 1 calls the model once on the plain batch.
    null_label: Unconditional class label (needed when cfg_scale != 1).
    cfg_channels: None guides all channels; 3 reproduces the reference's 3-channel quirk.
    cfg_interval: (lo, hi): an evaluation at time t is guided iff ``lo <= t < hi``; ``-1`` or (0, 1):
      always (:mod:`ifsq_jax.sampling.guidance`).
    key: PRNG key of the SDE's noise (unused by the ODE).
    sde_diffusion: ``"sigma"``, ``"linear"`` or ``"constant"``, the form of w(t).
    sde_diffusion_norm: Factor of w(t).
    last_step: ``"mean"``, ``"euler"`` or ``"none"``: the SDE's deterministic last step.
    last_step_size: Size of that last step (1 - t1).

  Returns:
    (B, H, W, C) float32 latents at t = 1.
  """
  _validate(noise, labels, num_steps, method, mode, shift, cfg_scale, null_label, cfg_channels, cfg_interval,
            key, sde_diffusion, sde_diffusion_norm, last_step, last_step_size)
  axes = _batch_axes(noise)
  x = parallel.constrain(noise.astype(jnp.float32), axes)
  b = x.shape[0]
  interval = guidance.interval(cfg_interval)

  def velocity(x, t):
    """v at the scalar time t, guided inside the interval."""
    tb = jnp.full((b,), t, jnp.float32)
    plain = lambda x: _velocity(velocity_fn, x, tb, labels)
    if cfg_scale == 1.0:
      return plain(x)
    guided = lambda x: guided_velocity(velocity_fn, x, tb, labels, cfg_scale=cfg_scale, null_label=null_label,
                                       cfg_channels=cfg_channels)
    if guidance.always(interval):
      return guided(x)
    # A cond, not a select: outside the interval only the conditional half runs.
    return jax.lax.cond(guidance.guided(t, interval), guided, plain, x)

  w = lambda t: sde_diffusion_norm * SDE_DIFFUSIONS[sde_diffusion](t)

  def sde_drift(x, t):
    """v + w s with the score s = (t v - x) / (1 - t) of the linear path (t < 1 here)."""
    v = velocity(x, t)
    return v + w(t) * (t * v - x) / (1.0 - t)

  if mode == "ode":
    grid64, drift = _grid64(num_steps, shift), velocity
  else:
    t1 = 1.0 if last_step == "none" else 1.0 - last_step_size
    grid64, drift = t1 * _grid64(num_steps - 1, shift), sde_drift
  grid = jnp.asarray(grid64, jnp.float32)  # a constant of the program
  n = len(grid64) - 1

  def step(i, x, heun):
    t, t_next = grid[i], grid[i + 1]
    h = t_next - t
    dw = 0.0
    if mode == "sde":
      dw = jnp.sqrt(2.0 * w(t) * h) * jax.random.normal(jax.random.fold_in(key, i), x.shape, jnp.float32)
      dw = parallel.constrain(dw, axes)
      if heun:
        x = x + dw  # SiT's stochastic Heun: noise first, then a Heun step of the drift
    k1 = drift(x, t)
    if heun:
      x = x + 0.5 * h * (k1 + drift(x + h * k1, t_next))
    else:
      x = x + h * k1 + dw
    return parallel.constrain(x, axes)

  if method == "euler":
    x = jax.lax.fori_loop(0, n, lambda i, x: step(i, x, False), x)
  else:
    # The corrector never evaluates at t = 1: the step that ends there is an Euler step.
    heun_steps = n - 1 if grid64[-1] == 1.0 else n
    if heun_steps:
      x = jax.lax.fori_loop(0, heun_steps, lambda i, x: step(i, x, True), x)
    if heun_steps < n:
      x = step(n - 1, x, False)

  if mode == "sde" and last_step != "none":
    t1 = grid[-1]
    h = 1.0 - t1
    if last_step == "mean":
      x = x + h * sde_drift(x, t1)
    else:
      x = x + h * velocity(x, t1)
  return x

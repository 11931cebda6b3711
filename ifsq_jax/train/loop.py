"""The one training loop every task runs.

A task supplies a :class:`Trainer` (model, state, step functions, eval and image
hooks); :func:`run` does the rest: validation, mesh and shardings from abstract
shapes, resume or init, jitted steps that donate the state, the non-finite guard,
logging, evaluation, image grids, checkpoints, and a clean save on SIGTERM/SIGINT.

Randomness: one base key from ``config.seed``; step ``s`` uses
``fold_in(key, s)``, and batches are a pure function of (seed, step), so a
resumed run draws the same numbers and examples as an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from clu import parameter_overview
from etils import epath

from ifsq_jax import checkpoint, config_lib, parallel
from ifsq_jax.data import pipeline as pipeline_lib
from ifsq_jax.train import state as state_lib
from ifsq_jax.train import writers

StepFn = Callable[[state_lib.TrainState, dict[str, jax.Array], jax.Array], tuple[state_lib.TrainState, dict]]


class NonFiniteError(RuntimeError):
  """Too many non-finite steps in a row."""


class Trainer:
  """What a task provides to the loop. Subclasses override the methods below.

  Attributes:
    config: The run's config.
    mesh: The device mesh.
  """

  def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
    self.config = config
    self.mesh = mesh

  def init_state(self, rng: jax.Array) -> state_lib.TrainState:
    """A fresh state; parameters may be boxed with logical axis names."""
    raise NotImplementedError

  def train_steps(self) -> dict[str, StepFn]:
    """Pure step functions by name: (state, batch, base_key) -> (state, metrics with "loss")."""
    raise NotImplementedError

  def step_kind(self, step: int) -> str:
    """Which step function runs at ``step`` (the tokenizer alternates G and D steps)."""
    del step
    return "train"

  def evaluate(self, state: state_lib.TrainState, step: int) -> dict[str, float]:
    """Evaluation metrics (host floats); called every ``train.eval_every`` steps and at the end."""
    del state, step
    return {}

  def image_rows(self, state: state_lib.TrainState) -> list[np.ndarray]:
    """Rows of images in [-1, 1] for a PNG grid (e.g. originals above reconstructions)."""
    del state
    return []


class _SignalFlag:
  """Set by SIGTERM / SIGINT; the loop finishes its step, saves and exits.

  With several processes, every process must stop at the same step: each step
  they agree through the coordination service of ``jax.distributed`` (a barrier
  and a key per stopping process), not through a device collective, so the check
  never competes with the train step's own collectives.
  """

  _instances = 0  # every process creates its flags in the same order: an id shared by the processes

  def __init__(self):
    self.signum = None
    self._previous = {}
    self.run_id = _SignalFlag._instances
    _SignalFlag._instances += 1
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    del frame
    self.signum = signum
    logging.warning("Received %s: finishing the current step, saving a checkpoint and exiting.",
                    signal.Signals(signum).name)

  def requested(self, step: int) -> bool:
    """Whether any process received a signal; all processes must call it at the same steps."""
    flag = self.signum is not None
    if jax.process_count() > 1:
      flag = _any_process(flag, f"ifsq_jax/stop/{self.run_id}/{step}")
    return flag

  def restore(self):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def _coordination_client():
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  return distributed.global_state.client


def _any_process(flag: bool, tag: str, timeout_s: int = 3600) -> bool:
  """True on every process if ``flag`` is True on any; ``tag`` must be new for each call."""
  client = _coordination_client()
  if client is None:  # processes set up without jax.distributed's coordination service
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))
  if flag:
    client.key_value_set(f"{tag}/{jax.process_index()}", "1")
  client.wait_at_barrier(tag, timeout_s * 1000)
  return bool(client.key_value_dir_get(f"{tag}/"))


def _barrier(tag: str, timeout_s: int = 3600) -> None:
  """Waits until every process reaches ``tag`` (new for each call); a no-op for one process."""
  client = _coordination_client()
  if jax.process_count() > 1 and client is not None:
    client.wait_at_barrier(tag, timeout_s * 1000)


class _Steps:
  """The jitted step functions; with several processes each is compiled ahead of its first run.

  The CPU collectives (gloo) give a process 30 s to meet its peers the first time
  a program uses a group of devices. A program compiled on first call can take
  longer than that on a busy host, and compilation time differs between
  processes, so with several processes every step function is compiled, then all
  processes meet at a barrier, then it runs.
  """

  def __init__(self, steps: dict[str, Callable], run_id: int):
    self._steps = steps
    self._compiled = {}
    self._run_id = run_id

  def __call__(self, kind: str, state, batch, key):
    if jax.process_count() == 1:
      return self._steps[kind](state, batch, key)
    if kind not in self._compiled:
      self._compiled[kind] = self._steps[kind].lower(state, batch, key).compile()
      _barrier(f"ifsq_jax/compiled/{self._run_id}/{kind}")
    return self._compiled[kind](state, batch, key)


def _write_config(workdir: epath.Path, config: ml_collections.ConfigDict) -> None:
  if jax.process_index() != 0:
    return
  path = workdir / "config.json"
  text = config_lib.to_json(config)
  if path.exists() and path.read_text() != text:
    n = 1
    while (workdir / f"config.json.{n}").exists():
      n += 1
    path.rename(workdir / f"config.json.{n}")
    logging.warning("The config differs from the one this work dir was started with; the old one is now "
                    "config.json.%d.", n)
  path.write_text(text)


def _jit_step(fn: StepFn, shardings: Any, mesh) -> Callable:
  def guarded(state, batch, key):
    new, metrics = fn(state, batch, key)
    return state_lib.guard_nonfinite(state, new, metrics)
  return jax.jit(guarded, in_shardings=(shardings, None, parallel.replicated(mesh)),
                 out_shardings=(shardings, parallel.replicated(mesh)), donate_argnums=(0,))


def run(trainer_cls: type[Trainer], config: ml_collections.ConfigDict, workdir: epath.PathLike,
        schema: ml_collections.ConfigDict | None = None, devices: list | None = None) -> state_lib.TrainState:
  """Trains ``config.train.num_steps`` steps in ``workdir`` (resuming if it holds checkpoints).

  Args:
    trainer_cls: The task's Trainer.
    config: The run's config.
    workdir: Where config.json, metrics.jsonl, checkpoints/, tensorboard/ and images/ go.
    schema: The task's default config to validate against (default: no key check).
    devices: Devices of the mesh (default: all of them).

  Returns:
    The final train state.
  """
  workdir = epath.Path(workdir)
  devices = list(jax.devices() if devices is None else devices)
  config_lib.validate(config, schema if schema is not None else config, len(devices), jax.process_count())
  workdir.mkdir(parents=True, exist_ok=True)
  _write_config(workdir, config)
  m = config.mesh
  mesh = parallel.make_mesh(m.data, m.fsdp, m.tensor, devices)
  logging.info("Process %d of %d; %d local / %d global devices; mesh %s", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(), dict(mesh.shape))
  trainer = trainer_cls(config, mesh)
  t = config.train

  init_key, step_key = jax.random.split(jax.random.key(config.seed))
  boxed = jax.eval_shape(trainer.init_state, init_key)
  shardings = parallel.logical_shardings(boxed, mesh, m.rules)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          nn.meta.unbox(boxed), shardings)

  data = pipeline_lib.build_pipeline(config, config.data.train_split, train=True,
                                     process_index=jax.process_index(), process_count=jax.process_count())
  ckpt = checkpoint.Checkpointer(workdir / "checkpoints", keep=config.checkpoint.keep,
                                 async_save=config.checkpoint.async_save)
  restored = ckpt.restore_latest(abstract)
  if restored is not None:
    step, state, data_state = restored
    data.restore(data_state)
    writers.rewind_metrics(workdir, step)
    logging.info("Resumed from step %d in %s", step, ckpt.directory)
  else:
    step = 0
    state = jax.jit(lambda k: nn.meta.unbox(trainer.init_state(k)), out_shardings=shardings)(init_key)
    if config.checkpoint.init_from:
      params = checkpoint.restore_params(config.checkpoint.init_from, abstract.params)
      state = state.replace(params=params, ema_params=jax.tree.map(jnp.copy, params))
      logging.info("Initialised parameters from %s", config.checkpoint.init_from)
  logging.info("Parameters:\n%s", parameter_overview.get_parameter_overview(state.params, include_stats=False))

  flag = _SignalFlag()
  steps = _Steps({name: _jit_step(fn, shardings, mesh) for name, fn in trainer.train_steps().items()}, flag.run_id)
  writer = writers.create_writer(workdir)
  config_dict = config.to_dict()
  host = _HostMetrics(int(state.nonfinite_run), t.max_nonfinite_steps)
  examples_per_step = t.global_batch_size
  last_time, last_step = time.time(), step
  try:
    while step < t.num_steps:
      batch = parallel.global_batch(next(data), mesh)
      state, metrics = steps(trainer.step_kind(step), state, batch, step_key)
      step += 1
      host.add(step, metrics)  # fetched lazily: the device runs ahead
      stop = flag.requested(step)
      if step % t.log_every == 0 or step == t.num_steps or stop:
        scalars = host.flush()
        now = time.time()
        rate = (step - last_step) / max(now - last_time, 1e-9)
        writer.write_scalars(step, {**scalars, "steps_per_sec": rate, "examples_per_sec": rate * examples_per_step})
        logging.info("step %d/%d | %.2f steps/s | %.1f examples/s | ETA %s | loss %.5g", step, t.num_steps, rate,
                     rate * examples_per_step, writers.format_eta((t.num_steps - step) / max(rate, 1e-9)),
                     scalars.get("loss", float("nan")))
        last_time, last_step = now, step
      else:
        host.check()
      if host.exhausted:
        raise NonFiniteError(
            f"{host.run} non-finite steps in a row (config.train.max_nonfinite_steps={t.max_nonfinite_steps}) "
            f"at step {step}; stopping. Checkpoints in {ckpt.directory} hold only finite states "
            f"(newest: {ckpt.steps[-1] if ckpt.steps else 'none'}).")
      final = step == t.num_steps
      evaluate = (t.eval_every and step % t.eval_every == 0) or final
      images = (t.image_every and step % t.image_every == 0) or final
      save = step % config.checkpoint.every == 0 or final or stop
      if jax.process_count() > 1 and (evaluate or images or save):
        # Evaluation, image grids and saves run their own cross-process programs: they start together
        # (see _Steps) and never overlap a step still running.
        jax.block_until_ready((state, metrics))
        _barrier(f"ifsq_jax/after_step/{flag.run_id}/{step}")
      if evaluate:
        scalars = trainer.evaluate(state, step)
        if scalars:
          writer.write_scalars(step, {f"eval/{k}": v for k, v in scalars.items()})
          if final and jax.process_index() == 0:
            (workdir / "eval.json").write_text(json.dumps({"step": step, **scalars}, indent=2))
      if images:
        _write_images(trainer, state, step, workdir, writer)
      if save:
        ckpt.save(step, state, data.state(), config_dict)
      if stop:
        logging.warning("Stopped at step %d on request; checkpoint saved.", step)
        break
  finally:
    host.flush()
    ckpt.close()
    writer.flush()
    data.close()
    flag.restore()
  return state


def _write_images(trainer: Trainer, state, step: int, workdir: epath.Path, writer) -> None:
  rows = trainer.image_rows(state)
  if not rows:
    return
  grid = writers.image_grid(rows)
  if jax.process_index() == 0:
    writers.save_png(grid, workdir / "images" / f"step_{step:08d}.png")
  writer.write_images(step, {"images": grid[None]})


class _HostMetrics:
  """Averages step metrics on the host between log steps; tracks non-finite runs."""

  def __init__(self, run: int, max_run: int):
    self.run = run
    self.max_run = max_run
    self._pending: list[dict] = []
    self._sums: dict[str, float] = {}
    self._counts: dict[str, int] = {}

  def add(self, step: int, metrics: dict) -> None:
    self._pending.append(metrics)
    if len(self._pending) > 2:
      self._consume(self._pending.pop(0))

  def _consume(self, metrics: dict) -> None:
    values = jax.device_get(metrics)
    self.run = self.run + 1 if values.get("nonfinite", 0) > 0 else 0
    for k, v in values.items():  # each key is averaged over the steps that report it (G and D steps differ)
      v = np.asarray(v)
      if v.size == 1:
        self._sums[k] = self._sums.get(k, 0.0) + float(v)
        self._counts[k] = self._counts.get(k, 0) + 1

  def check(self) -> None:
    """Consumes everything but the newest step (keeps the device busy)."""
    while len(self._pending) > 1:
      self._consume(self._pending.pop(0))

  def flush(self) -> dict[str, float]:
    while self._pending:
      self._consume(self._pending.pop(0))
    out = {k: v / self._counts[k] for k, v in self._sums.items()}
    out.pop("nonfinite", None)
    out["nonfinite_steps"] = self._sums.get("nonfinite", 0.0)
    self._sums, self._counts = {}, {}
    return out

  @property
  def exhausted(self) -> bool:
    return self.run >= self.max_run

"""The one training loop every task runs.

A task supplies a :class:`Trainer`; :func:`run` does the rest: validation, mesh
and shardings from abstract shapes (all traced inside the mesh and the
logical-axis rules), resume, ``init_from`` or init, frozen networks placed on the
devices once, every step kind compiled ahead with its memory shown, jitted steps
that donate the state, logging, checkpoints, evaluation and image grids, and a
clean save on SIGTERM/SIGINT.

What a trainer owns: its config checks (:meth:`Trainer.validate`), its training
data (:meth:`Trainer.train_data`, a step-addressed :class:`~ifsq_jax.data.Pipeline`
with the task's per-example function), its frozen networks
(:meth:`Trainer.frozen`, passed to every step as a non-donated argument: arrays
captured in a closure would be baked into the compiled program as constants),
its step functions, and how a checkpoint initialises it (:meth:`Trainer.init_from`).

Randomness: one base key from ``config.seed`` (:func:`step_key`); the loop hands
step ``s`` the key ``fold_in(key, s)`` (trainers do not fold again), and batches are a pure
function of (seed, step), so a resumed run draws the same numbers and examples
as an uninterrupted one.

Non-finite steps: each step decides from its loss and gradients, before the
update, whether to apply it (:func:`~ifsq_jax.train.state.apply_if_finite`) and
reports ``nonfinite``; the loop stops after ``train.max_nonfinite_steps`` in a row.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import logging
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from clu import parameter_overview
from etils import epath

from ifsq_jax import checkpoint, config_lib, flops, multihost, parallel, shapes_only
from ifsq_jax.data import device_prefetch
from ifsq_jax.data import pipeline as pipeline_lib
from ifsq_jax.train import state as state_lib
from ifsq_jax.train import writers

_INITS = itertools.count()  # fresh-init barriers; every process counts them in the same order

# (state, batch, key, frozen) -> (new state, metrics with "nonfinite" and, for logging, "loss").
StepFn = Callable[[state_lib.TrainState, dict[str, jax.Array], jax.Array, Any], tuple[state_lib.TrainState, dict]]


class NonFiniteError(RuntimeError):
  """Too many non-finite steps in a row."""


class Trainer:
  """What a task provides to the loop. Subclasses override the methods below.

  Attributes:
    config: The run's config.
    mesh: The device mesh.
    workdir: The run's work dir (None when only compiling).
  """

  def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
    self.config = config
    self.mesh = mesh
    self.workdir: epath.Path | None = None

  @classmethod
  def validate(cls, config: ml_collections.ConfigDict) -> None:
    """Checks the task's own fields; raises ``config_lib.ConfigError`` naming the key, value and valid choices."""
    del config

  def init_state(self, rng: jax.Array) -> state_lib.TrainState:
    """A fresh state; parameters may be boxed with logical axis names."""
    raise NotImplementedError

  def train_data(self, process_index: int, process_count: int) -> pipeline_lib.Pipeline:
    """This process's training batches, addressed by step (state() / restore() for exact resume)."""
    raise NotImplementedError

  def batch_shapes(self) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes and dtypes of one global training batch (for compiling before any data is read)."""
    raise NotImplementedError

  def frozen(self) -> Any:
    """Frozen networks' parameters (a pytree of arrays, e.g. LPIPS-VGG); placed on the devices once by the loop."""
    return {}

  @functools.cached_property
  def frozen_on_devices(self) -> Any:
    """:meth:`frozen` replicated over the mesh, placed once: the copy every step and evaluation program takes."""
    return parallel.replicate(self.frozen(), self.mesh)

  def train_steps(self) -> dict[str, StepFn]:
    """Pure step functions by name: (state, batch, key, frozen) -> (state, metrics).

    ``key`` is already folded with the step. Metrics hold ``nonfinite`` (from
    :func:`~ifsq_jax.train.state.apply_if_finite`) and the losses under their own names;
    ``loss`` is the one the progress line shows.
    """
    raise NotImplementedError

  def step_kind(self, step: int) -> str:
    """Which step function runs at ``step`` (the tokenizer alternates G and D steps)."""
    del step
    return "train"

  def init_from(self, state: state_lib.TrainState, path: str) -> state_lib.TrainState:
    """A fresh state initialised from the checkpoint at ``path`` (``checkpoint.init_from``).

    The default takes ``params`` and ``ema_params`` of a checkpoint of the same
    task (optimizer state, step and statistics stay fresh). A trainer whose
    parameters come from elsewhere (another task, converted weights) overrides it.
    """
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            {"params": state.params, "ema_params": state.ema_params})
    step, fields = checkpoint.restore_fields(path, abstract)
    logging.info("Initialised params and EMA from step %d of %s", step, path)
    return state.replace(**fields)

  def prepare(self, state: state_lib.TrainState, data: pipeline_lib.Pipeline, frozen: Any) -> state_lib.TrainState:
    """Called once on a fresh state (after init or ``init_from``, never on resume), before step 1.

    A task measures what it needs from its training data here and keeps it in
    the state, so that a resumed run uses the same values (the DiT trainer
    measures its latent scale). ``data.batch(i)`` reads without advancing the
    pipeline; ``frozen`` is :meth:`frozen`, already on the devices.
    """
    del data, frozen
    return state

  def other_programs(self, state: Any, frozen: Any) -> dict[str, Any]:
    """The run's compiled programs besides the train steps (preparation, evaluation), lowered ahead.

    For ``--compile_only``: ``state`` and ``frozen`` are ``jax.ShapeDtypeStruct``
    trees with their shardings. Returns {name: ``jax.stages.Lowered``} in the
    order to list them; the default has none.
    """
    del state, frozen
    return {}

  def evaluate(self, state: state_lib.TrainState, step: int) -> dict[str, float]:
    """Evaluation metrics (host floats); called every ``train.eval_every`` steps and at the end."""
    del state, step
    return {}

  def image_rows(self, state: state_lib.TrainState) -> list[np.ndarray]:
    """Rows of images in [-1, 1] for a PNG grid (e.g. originals above reconstructions)."""
    del state
    return []


class DoesNotFit(RuntimeError):
  """A step's compiled program needs more device memory than a device has (XLA's RESOURCE_EXHAUSTED)."""


@dataclasses.dataclass
class StepMemory:
  """Per-device memory (bytes, XLA's memory analysis) and FLOPs of one compiled step."""

  kind: str
  arguments: int
  outputs: int
  aliased: int
  temporaries: int
  code: int
  flops: float = 0.0  # matmul and convolution FLOPs of the step / devices (ifsq_jax.flops; 0: not counted)

  @property
  def peak(self) -> int:
    """Arguments + outputs not aliased to them + temporaries."""
    return self.arguments + self.outputs - self.aliased + self.temporaries


def memory_table(rows: list[StepMemory]) -> str:
  """The compiled steps' memory (MiB per device) and TFLOPs per device and step, as a text table."""
  mib = lambda b: f"{b / 2**20:,.1f}"
  lines = ["step kind | arguments | outputs | aliased | temporaries | peak | code  [MiB per device] | TFLOPs"]
  for r in rows:
    tflops = f"{r.flops / 1e12:,.3f}" if r.flops else "-"  # 0: not counted (the programs besides the steps)
    lines.append(f"{r.kind} | {mib(r.arguments)} | {mib(r.outputs)} | {mib(r.aliased)} | {mib(r.temporaries)} | "
                 f"{mib(r.peak)} | {mib(r.code)} | {tflops}")
  return "\n".join(lines)


def _memory(kind: str, compiled, step_flops: float) -> StepMemory:
  m = compiled.memory_analysis()
  return StepMemory(kind, int(m.argument_size_in_bytes), int(m.output_size_in_bytes), int(m.alias_size_in_bytes),
                    int(m.temp_size_in_bytes), int(m.generated_code_size_in_bytes), step_flops)


def _memory_limit(devices: list) -> tuple[int, str] | None:
  """(bytes a device may newly allocate, where that figure comes from); None when JAX does not say.

  On accelerators: the device's ``bytes_limit``. On CPU the devices of a process share the host: the host's
  available memory (``MemAvailable``, which the state already placed has reduced) over the process's devices.
  """
  device = devices[0]
  if device.platform == "cpu":
    try:
      with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
      available = int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
      return None
    local = sum(d.process_index == jax.process_index() for d in devices)
    return available // max(local, 1), f"the host's available memory ({available / 2**30:,.1f} GiB) / {local} CPU devices"
  limit = (device.memory_stats() or {}).get("bytes_limit")
  return (int(limit), f"{device.device_kind} memory") if limit else None


def check_fits(memory: list[StepMemory], devices: list, config: ml_collections.ConfigDict) -> None:
  """Raises DoesNotFit before step 1 when a compiled step needs more memory than a device has.

  On CPU the state and batch are already allocated (and counted out of the available memory), so only what the
  step adds (outputs not aliased to arguments, temporaries) is compared; on accelerators the whole peak.
  """
  limit = _memory_limit(devices)
  if limit is None or not config.train.check_memory:
    return
  available, source = limit
  on_cpu = devices[0].platform == "cpu"
  for r in memory:
    need = r.peak - r.arguments if on_cpu else r.peak
    if need > available:
      gib = lambda b: f"{b / 2**30:,.2f} GiB"
      raise DoesNotFit(
          f"the compiled {r.kind!r} step needs {gib(need)} per device ({'new allocations' if on_cpu else 'peak'}: "
          f"arguments {gib(r.arguments)}, temporaries {gib(r.temporaries)}), more than {gib(available)} ({source}). "
          f"Levers: config.train.grad_accum_steps={config.train.grad_accum_steps} (more micro-batches), "
          f"config.mesh.fsdp={config.mesh.fsdp} (shard the state over more devices), a smaller "
          f"config.train.global_batch_size, or config.model.remat_policy where the model has one; "
          f"config.train.check_memory=False tries anyway.")


class _Steps:
  """Every step kind a run will use, compiled before step 1 (ahead of time, inside the mesh).

  With several processes, all processes then meet at a barrier before the first
  step (see :mod:`ifsq_jax.multihost`).
  """

  def __init__(self, fns: dict[str, StepFn], kinds: list[str], shardings: Any, mesh, rules, seed: int,
               abstract_args: tuple, run_id: int, count_flops: bool = False):
    self.compiled = {}
    self.memory: list[StepMemory] = []
    with parallel.sharding_context(mesh, rules):
      for kind in kinds:
        jitted = _jit_step(fns[kind], shardings, mesh, seed)
        step_flops = flops.count(jitted, *abstract_args) / mesh.size if count_flops else 0.0
        start = time.time()
        try:
          self.compiled[kind] = jitted.lower(*abstract_args).compile()
        except jax.errors.JaxRuntimeError as e:
          if "RESOURCE_EXHAUSTED" not in str(e):
            raise
          raise DoesNotFit(f"the {kind!r} step does not fit in device memory: {str(e).splitlines()[0]}") from None
        self.memory.append(_memory(kind, self.compiled[kind], step_flops))
        logging.info("Compiled step %r in %.1f s", kind, time.time() - start)
    multihost.barrier(f"ifsq_jax/compiled/{run_id}")

  def __call__(self, kind: str, *args):
    return self.compiled[kind](*args)


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


def step_key(seed: int) -> jax.Array:
  """The base key of the train steps (``config.seed``'s second split; the first initialises)."""
  return jax.random.split(jax.random.key(seed))[1]


def _jit_step(fn: StepFn, shardings: Any, mesh, seed: int) -> Callable:
  def step(state, batch, frozen):
    # The only fold of the step into the key; a constant of the program, so no key array crosses processes.
    # uint8 images arrive as they left the pipeline (a quarter of float32's bytes) and become float32 here.
    batch = pipeline_lib.normalize(batch)
    new, metrics = fn(state, batch, jax.random.fold_in(step_key(seed), state.step), frozen)
    if "nonfinite" not in metrics:
      raise ValueError("a train step must report metrics['nonfinite'] (use state.apply_if_finite).")
    return new, metrics
  return jax.jit(step, in_shardings=(shardings, None, None), out_shardings=(shardings, parallel.replicated(mesh)),
                 donate_argnums=(0,))


def _kinds_used(trainer: Trainer, names: list[str], start: int, end: int) -> list[str]:
  """The step kinds steps ``start .. end - 1`` run, in the order of ``names``."""
  found = set()
  for step in range(start, end):
    found.add(trainer.step_kind(step))
    if len(found) == len(names):
      break
  unknown = found - set(names)
  if unknown:
    raise ValueError(f"step_kind returned {sorted(unknown)}; the trainer's steps are {names}.")
  return [n for n in names if n in found]


def abstract_state(trainer: Trainer, init_key: jax.Array, mesh, rules) -> tuple[Any, Any]:
  """(shardings, abstract state with shardings) of the trainer's state, traced inside the mesh."""
  with parallel.sharding_context(mesh, rules):
    boxed = jax.eval_shape(trainer.init_state, init_key)
  shardings = parallel.logical_shardings(boxed, mesh, rules)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.meta.unbox(boxed),
                          shardings)
  return shardings, abstract


def compile_steps(trainer_cls: type[Trainer], config: ml_collections.ConfigDict,
                  schema: ml_collections.ConfigDict | None = None, devices: list | None = None) -> list[StepMemory]:
  """Validates ``config`` and compiles every step kind of a run from step 0; writes nothing.

  Frozen networks are opened as shapes only (:mod:`ifsq_jax.shapes_only`): no
  weights are read. ``devices`` may be another machine's, e.g. the compile-only
  devices of a TPU topology (:mod:`ifsq_jax.topology`).

  Returns:
    The per-device memory and FLOPs of each compiled step (``--compile_only`` prints them).
  """
  run = abstract_run(trainer_cls, config, schema, devices)
  return _Steps(run.trainer.train_steps(), run.kinds, run.shardings, run.mesh, config.mesh.rules, config.seed,
                run.args, run_id=-1, count_flops=True).memory


def compile_run(trainer_cls: type[Trainer], config: ml_collections.ConfigDict,
                schema: ml_collections.ConfigDict | None = None,
                devices: list | None = None) -> tuple[list[StepMemory], list[StepMemory]]:
  """:func:`compile_steps`, and the trainer's :meth:`Trainer.other_programs` (evaluation, preparation) compiled too.

  Returns:
    (the train steps' rows, the other programs' rows: per-device memory; their FLOPs are not counted).
  """
  run = abstract_run(trainer_cls, config, schema, devices)
  steps = _Steps(run.trainer.train_steps(), run.kinds, run.shardings, run.mesh, config.mesh.rules, config.seed,
                 run.args, run_id=-1, count_flops=True).memory
  state, _, frozen = run.args
  with parallel.sharding_context(run.mesh, config.mesh.rules):
    lowered = run.trainer.other_programs(state, frozen)
  return steps, [_memory(name, program.compile(), 0.0) for name, program in lowered.items()]


@dataclasses.dataclass
class AbstractRun:
  """A validated run as shapes only: its trainer, mesh, state shardings, step arguments and step kinds."""

  trainer: Trainer
  mesh: jax.sharding.Mesh
  shardings: Any
  args: tuple  # (state, batch, frozen) as ShapeDtypeStructs with shardings
  kinds: list[str]  # the step kinds of steps 0 .. num_steps - 1


def abstract_run(trainer_cls: type[Trainer], config: ml_collections.ConfigDict,
                 schema: ml_collections.ConfigDict | None = None, devices: list | None = None) -> AbstractRun:
  """Validates ``config`` and builds its trainer and step arguments as shapes (frozen networks shapes only)."""
  devices = list(jax.devices() if devices is None else devices)
  m = config.mesh
  with shapes_only.enabled():
    validate(trainer_cls, config, schema, len(devices), len({d.process_index for d in devices}), devices[0].platform)
    mesh = _mesh(m, devices)
    trainer = trainer_cls(config, mesh)
  init_key, _ = jax.random.split(jax.random.key(config.seed))
  shardings, abstract = abstract_state(trainer, init_key, mesh, m.rules)
  replicated = parallel.replicated(mesh)
  frozen = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=replicated), trainer.frozen())
  kinds = _kinds_used(trainer, list(trainer.train_steps()), 0, config.train.num_steps)
  return AbstractRun(trainer, mesh, shardings, (abstract, _abstract_batch(trainer, mesh), frozen), kinds)


def step_flops(run: AbstractRun) -> dict[str, float]:
  """Matmul and convolution FLOPs of one global step of each kind (:mod:`ifsq_jax.flops`); nothing is compiled."""
  c = run.trainer.config
  out = {}
  with parallel.sharding_context(run.mesh, c.mesh.rules):
    for kind in run.kinds:
      out[kind] = flops.count(_jit_step(run.trainer.train_steps()[kind], run.shardings, run.mesh, c.seed), *run.args)
  return out


def _mesh(m: ml_collections.ConfigDict, devices: list) -> jax.sharding.Mesh:
  """The mesh of ``config.mesh`` over ``devices``; a ConfigError says why it cannot be built."""
  try:
    return parallel.make_mesh(m.data, m.fsdp, m.tensor, devices, m.slices)
  except ValueError as e:
    raise config_lib.ConfigError(f"config.mesh: {e}") from None


def _abstract_batch(trainer: Trainer, mesh) -> dict[str, jax.ShapeDtypeStruct]:
  return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=parallel.batch_sharding(mesh, len(v.shape)))
          for k, v in trainer.batch_shapes().items()}


def validate(trainer_cls: type[Trainer], config: ml_collections.ConfigDict,
             schema: ml_collections.ConfigDict | None, device_count: int, process_count: int | None = None,
             platform: str | None = None) -> None:
  """The shared checks, then the task's own: one ConfigError naming the key, before anything compiles.

  ``platform`` is that of the run's devices (default: JAX's, ``jax.devices()``), checked against
  ``config.mesh.platform``; compiling for other devices (a TPU topology) passes theirs.
  """
  process_count = jax.process_count() if process_count is None else process_count
  platform = jax.devices()[0].platform if platform is None else platform
  config_lib.validate(config, schema if schema is not None else config, device_count, process_count, platform)
  trainer_cls.validate(config)


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
  # Every config error comes before the work dir is touched: the config's own checks, then what only the trainer
  # and its data can tell (a tokenizer that does not fit the model, shards of the wrong codes).
  validate(trainer_cls, config, schema, len(devices))
  m = config.mesh
  mesh = _mesh(m, devices)
  logging.info("Process %d of %d; %d local / %d global devices; mesh %s", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(), dict(mesh.shape))
  trainer = trainer_cls(config, mesh)
  data = trainer.train_data(jax.process_index(), jax.process_count())
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    _write_config(workdir, config)
  except BaseException:
    data.close()
    raise
  trainer.workdir = workdir
  t = config.train

  init_key, _ = jax.random.split(jax.random.key(config.seed))
  shardings, abstract = abstract_state(trainer, init_key, mesh, m.rules)
  ckpt = checkpoint.Checkpointer(workdir / "checkpoints", keep=config.checkpoint.keep,
                                 async_save=config.checkpoint.async_save)
  frozen = trainer.frozen_on_devices  # placed once; passed to every step and evaluation program
  restored = ckpt.restore_latest(abstract)
  if restored is not None:
    step, state, data_state = restored
    data.restore(data_state)
    writers.rewind_metrics(workdir, step)
    logging.info("Resumed from step %d in %s", step, ckpt.directory)
  else:
    step = 0
    with parallel.sharding_context(mesh, m.rules):
      init = jax.jit(lambda k: nn.meta.unbox(trainer.init_state(k)), out_shardings=shardings)
      init = init.lower(init_key).compile()
      # With several processes, the first program over all devices starts on every process at once: the CPU
      # collectives (gloo) give a process 30 s to meet its peers the first time a group of devices is used.
      multihost.barrier(f"ifsq_jax/init/{next(_INITS)}")
      state = init(init_key)
      if config.checkpoint.init_from:
        state = trainer.init_from(state, config.checkpoint.init_from)
    state = trainer.prepare(state, data, frozen)
  logging.info("Parameters:\n%s", parameter_overview.get_parameter_overview(state.params, include_stats=False))

  batches = device_prefetch.DeviceBatches(data, mesh, step, config.data.device_prefetch)  # busy while compiling
  flag = multihost.StopFlag()
  kinds = _kinds_used(trainer, list(trainer.train_steps()), step, t.num_steps)
  try:
    steps = _Steps(trainer.train_steps(), kinds, shardings, mesh, m.rules, config.seed,
                   (abstract, _abstract_batch(trainer, mesh), frozen), flag.run_id)
  except BaseException:
    batches.close()
    data.close()
    flag.restore()
    raise
  logging.info("Compiled steps, per device:\n%s", memory_table(steps.memory))
  try:
    check_fits(steps.memory, list(mesh.devices.flat), config)
  except DoesNotFit:
    batches.close()
    data.close()
    flag.restore()
    raise
  writer = writers.create_writer(workdir)
  config_dict = config.to_dict()
  host = _HostMetrics(int(state.nonfinite_run), t.max_nonfinite_steps)
  examples_per_step = t.global_batch_size
  if step == 0 and t.eval_at_start:  # the untrained model's numbers, for comparison with the end
    _evaluate(trainer, state, step, workdir, writer, final=False)
    _write_images(trainer, state, step, workdir, writer)
  last_time, last_step, last_wait = time.time(), step, batches.wait_s
  try:
    while step < t.num_steps:
      batch = batches.next()
      state, metrics = steps(trainer.step_kind(step), state, batch, frozen)
      step += 1
      host.add(step, metrics)  # fetched lazily: the device runs ahead
      stop = flag.requested(step)
      if step % t.log_every == 0 or step == t.num_steps or stop:
        scalars = host.flush()
        now = time.time()
        rate = (step - last_step) / max(now - last_time, 1e-9)
        # The time the loop waited for data, per step: the devices idle for input (the host's step time beside it).
        wait_ms = 1e3 * (batches.wait_s - last_wait) / max(step - last_step, 1)
        step_ms = 1e3 / max(rate, 1e-9)
        writer.write_scalars(step, {**scalars, "steps_per_sec": rate, "examples_per_sec": rate * examples_per_step,
                                    "perf/data_wait_ms": wait_ms, "perf/step_ms": step_ms})
        logging.info("step %d/%d | %.2f steps/s | %.1f examples/s | data wait %.0f%% | ETA %s | loss %.5g", step,
                     t.num_steps, rate, rate * examples_per_step, 100 * wait_ms / step_ms,
                     writers.format_eta((t.num_steps - step) / max(rate, 1e-9)), scalars.get("loss", float("nan")))
        last_time, last_step, last_wait = now, step, batches.wait_s
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
        # and never overlap a step still running.
        jax.block_until_ready((state, metrics))
        multihost.barrier(f"ifsq_jax/after_step/{flag.run_id}/{step}")
      if save:  # before evaluating: a failing evaluation never costs the step's checkpoint
        ckpt.save(step, state, data.state(next_step=step), config_dict)
      if evaluate:
        _evaluate(trainer, state, step, workdir, writer, final)
      if images:
        _write_images(trainer, state, step, workdir, writer)
      if stop:
        logging.warning("Stopped at step %d on request; checkpoint saved.", step)
        break
  finally:
    host.flush()
    ckpt.close()
    writer.flush()
    batches.close()
    data.close()
    flag.restore()
  # Processes leave together: the last saves and evaluations end at different times, and jax.distributed's
  # shutdown gives a process a limited wait for its peers.
  multihost.barrier(f"ifsq_jax/end/{flag.run_id}")
  return state


def _evaluate(trainer: Trainer, state, step: int, workdir: epath.Path, writer, final: bool) -> None:
  scalars = trainer.evaluate(state, step)
  if scalars:
    writer.write_scalars(step, {f"eval/{k}": v for k, v in scalars.items()})
    if final and jax.process_index() == 0:
      (workdir / "eval.json").write_text(json.dumps({"step": step, **scalars}, indent=2))


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

r"""Entry point: ``python -m ifsq_jax.main --config=configs/<name>.py[:variant] --workdir=DIR``.

Overrides: ``--config.train.num_steps=10``. ``--compile_only`` validates the
config, compiles every train step the run would use on the devices at hand and
the programs beside them (a generator's latent-scale pass and evaluation:
sampler with decoder, uint8 rounding, feature networks), prints their memory per
device (arguments, outputs, temporaries) and the steps' FLOPs and exits without
touching the work dir or reading any weights but the packaged VGG16's; with
``--topology=v5e:4x4`` (v4, v5e, v5p, v6e) it compiles for that TPU slice
instead, on any host with the ``tpu`` extra installed. The same command runs on every host
of a multi-host job: ``jax.distributed`` is initialised when
``--num_processes`` > 1 is given (with ``--coordinator_address`` and
``--process_id``), or automatically on a Cloud TPU pod / SLURM job
(``--distributed=auto``). A run started again in the same work dir resumes.
"""

from __future__ import annotations

import logging
import os
import sys

from absl import app, flags
import jax
from ml_collections import config_flags

from ifsq_jax import checkpoint, config_lib, data, parallel, topology
from ifsq_jax.kernels.cpu import host_memory
from ifsq_jax.train import loop, registry

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (configs/<name>.py[:variant]).", lock_config=True)
flags.DEFINE_string("workdir", None, "Work directory: config.json, metrics.jsonl, checkpoints/, tensorboard/.")
flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                  "jax.distributed: 'auto' initialises it for --num_processes > 1, on Cloud TPU VMs and in SLURM "
                  "jobs.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process runs).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process runs).")
flags.DEFINE_integer("process_id", None, "Index of this process (multi-process runs).")
flags.DEFINE_bool("compile_only", False, "Compile every train step and evaluation program, print their memory "
                  "per device and exit; writes nothing.")
flags.DEFINE_string("topology", None, "With --compile_only: compile for this TPU topology instead of the devices "
                    "at hand, e.g. v4:2x2x2, v5e:4x4, v5p:2x2x4, v6e:8x8 (needs the tpu extra).")
flags.mark_flags_as_required(["config", "workdir"])


def _on_cluster() -> bool:
  """A Cloud TPU VM (its workers are found through the VM's metadata), a SLURM job of several tasks, or an
  explicit coordinator in the environment."""
  env = os.environ
  return bool(topology.on_tpu_vm() or env.get("TPU_WORKER_HOSTNAMES", "").count(",")
              or int(env.get("SLURM_NTASKS", "1")) > 1 or env.get("JAX_COORDINATOR_ADDRESS"))


def initialize_distributed() -> None:
  """jax.distributed.initialize when this is one process of several."""
  explicit = FLAGS.num_processes is not None and FLAGS.num_processes > 1
  if FLAGS.distributed == "off" or not (explicit or FLAGS.distributed == "on" or _on_cluster()):
    return
  if explicit:
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  else:
    jax.distributed.initialize()


def _quiet_orbax(record: logging.LogRecord) -> bool:
  """Drops Orbax's step-by-step INFO lines (its warnings and errors stay)."""
  return record.levelno >= logging.WARNING or "/orbax/" not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if FLAGS.topology and not FLAGS.compile_only:
    raise app.UsageError("--topology compiles for a TPU slice elsewhere; it needs --compile_only.")
  host_memory.setup()  # before JAX starts its threads and reads XLA_FLAGS
  for handler in logging.getLogger().handlers:
    handler.addFilter(_quiet_orbax)
  if FLAGS.topology:
    jax.config.update("jax_platforms", "cpu")  # the host only compiles; libtpu is not to look for a local TPU
  else:
    initialize_distributed()
  logging.info("JAX %s, process %d/%d, devices: %s", jax.__version__, jax.process_index(), jax.process_count(),
               jax.devices())
  config = FLAGS.config
  try:
    task = registry.get(config.task)
    if FLAGS.compile_only:
      compile_only(task, config, FLAGS.topology)
      return
    task.train_and_evaluate(config, FLAGS.workdir)
  except config_lib.ConfigError as e:
    # One line (exit status 1), before the work dir is created: the key, its value and what is valid.
    sys.exit("Invalid config: " + " ".join(str(e).splitlines()))
  except (data.DataError, checkpoint.CheckpointError, loop.NonFiniteError, loop.DoesNotFit) as e:
    sys.exit(f"{type(e).__name__}: {e}")


def compile_only(task, config, topology_name: str | None) -> None:
  """Compiles the run's train steps (on ``topology_name``'s TPU chips if given) and prints their cost."""
  if topology_name:
    try:
      devices = topology.devices(topology_name, config.mesh.slices)
    except ValueError as e:
      raise app.UsageError(str(e)) from None
    generation = topology.parse(topology_name)[0]
    where = (f"TPU {topology_name}{f' x {config.mesh.slices} slices' if config.mesh.slices > 1 else ''} "
             f"({len(devices)} chips, {len({d.process_index for d in devices})} hosts)")
  else:
    devices = jax.devices()
    where = f"{len(devices)} {devices[0].platform} devices"
  steps, others = loop.compile_run(task.TRAINER, config, schema=task.default_config(), devices=devices)
  memory = steps + others
  m = config.mesh
  shape = parallel.mesh_shape(m.data, m.fsdp, m.tensor, len(devices))
  print(f"Compiled train steps{' and the programs beside them' if others else ''} of {config.task!r}, global batch "
        f"{config.train.global_batch_size}, mesh {shape} on {where}:")
  print(loop.memory_table(memory))
  peak = max(r.peak for r in memory)
  print(f"Largest peak: {peak / 2**30:.2f} GiB per device.")
  if topology_name:
    hbm = topology.HBM_GIB[generation]
    verdict = "fits" if peak <= hbm * 2**30 else "does NOT fit"
    print(f"{verdict} in the {hbm} GiB of HBM of a {generation} chip.")


def run():
  app.run(main)


if __name__ == "__main__":
  run()

r"""Entry point: ``python -m ifsq_jax.main --config=configs/<name>.py[:variant] --workdir=DIR``.

Overrides: ``--config.train.num_steps=10``. ``--compile_only`` validates the
config, compiles every train step the run would use on the devices at hand,
prints their memory per device (arguments, outputs, temporaries) and exits
without touching the work dir. The same command runs on every host
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

from ifsq_jax import checkpoint, config_lib, data, parallel
from ifsq_jax.kernels.cpu import host_memory
from ifsq_jax.train import loop, registry

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (configs/<name>.py[:variant]).", lock_config=True)
flags.DEFINE_string("workdir", None, "Work directory: config.json, metrics.jsonl, checkpoints/, tensorboard/.")
flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                  "jax.distributed: 'auto' initialises it for --num_processes > 1, on TPU pods and in SLURM jobs.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process runs).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process runs).")
flags.DEFINE_integer("process_id", None, "Index of this process (multi-process runs).")
flags.DEFINE_bool("compile_only", False, "Compile every train step, print its memory per device and exit; "
                  "writes nothing.")
flags.mark_flags_as_required(["config", "workdir"])


def _on_cluster() -> bool:
  env = os.environ
  return bool(env.get("TPU_WORKER_HOSTNAMES", "").count(",") or int(env.get("SLURM_NTASKS", "1")) > 1
              or env.get("JAX_COORDINATOR_ADDRESS"))


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
  host_memory.setup()  # before JAX starts its threads and reads XLA_FLAGS
  for handler in logging.getLogger().handlers:
    handler.addFilter(_quiet_orbax)
  initialize_distributed()
  logging.info("JAX %s, process %d/%d, devices: %s", jax.__version__, jax.process_index(), jax.process_count(),
               jax.devices())
  config = FLAGS.config
  try:
    task = registry.get(config.task)
    if FLAGS.compile_only:
      memory = loop.compile_steps(task.TRAINER, config, schema=task.default_config())
      m = config.mesh
      shape = parallel.mesh_shape(m.data, m.fsdp, m.tensor, jax.device_count())
      print(f"Compiled train steps of {config.task!r}, mesh {shape} on {jax.device_count()} "
            f"{jax.devices()[0].platform} devices:")
      print(loop.memory_table(memory))
      return
    task.train_and_evaluate(config, FLAGS.workdir)
  except config_lib.ConfigError as e:
    sys.exit(f"Invalid config: {e}")
  except (data.DataError, checkpoint.CheckpointError, loop.NonFiniteError) as e:
    sys.exit(f"{type(e).__name__}: {e}")


def run():
  app.run(main)


if __name__ == "__main__":
  run()

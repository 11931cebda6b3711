r"""The configured training input pipeline alone, no model: the examples per second it delivers to this process.

``python -m ifsq_jax.tools.input_bench --config=configs/dit_l2.py --config.data.name=image_folder
--config.data.path=DIR --config.data.workers=8 [--steps=50] [--topology=v5e:4x4 | --gpus=8] [--mfu=0.4]``

Builds the task's training pipeline exactly as a run would (its source, transform,
``data.workers`` and ``data.prefetch``; frozen networks as shapes only, no
weights read), reads ``--warmup`` batches (worker start-up), then times
``--steps`` batches. With ``--topology`` (a TPU slice, as ``--compile_only``
takes it) or ``--gpus=N`` (H100s, 8 per host), the batch is this host's share
of the global batch, and it also prints what the config's train step consumes
per host at ``--mfu`` of the chips' peak bfloat16 FLOP/s (the step's FLOPs are
counted on its jaxpr, nothing compiled) and how many workers per host that needs
at the measured rate per worker.

Output: one ``key: value`` per line, the last ``examples/s: X``.
"""

from __future__ import annotations

import math
import sys
import time

from absl import app, flags
import jax
from ml_collections import config_flags

from ifsq_jax import config_lib, data, topology
from ifsq_jax.train import loop, registry

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (configs/<name>.py[:variant]).", lock_config=False)
flags.DEFINE_integer("steps", 20, "Batches timed (after the warm-up).")
flags.DEFINE_integer("warmup", 2, "Batches read before timing (worker start-up, first file reads).")
flags.DEFINE_string("topology", None, "A TPU slice (e.g. v5e:4x4): time this host's share of the batch and print "
                    "what the train step consumes per host.")
flags.DEFINE_integer("gpus", 0, "As --topology, for this many H100 GPUs (8 per host).")
flags.DEFINE_float("mfu", 0.4, "Model FLOPs utilisation assumed for the consumption figures.")
flags.mark_flags_as_required(["config"])

GPUS_PER_HOST = 8


def _chips() -> tuple[str, int, int] | None:
  """(kind, chips, hosts) of --topology / --gpus, or None."""
  if FLAGS.topology and FLAGS.gpus:
    raise app.UsageError("give --topology or --gpus, not both.")
  if FLAGS.topology:
    try:
      devices = topology.devices(FLAGS.topology)
    except ValueError as e:
      raise app.UsageError(str(e)) from None
    return topology.parse(FLAGS.topology)[0], len(devices), len({d.process_index for d in devices})
  if FLAGS.gpus:
    if FLAGS.gpus < 1:
      raise app.UsageError(f"--gpus={FLAGS.gpus} must be >= 1.")
    return "h100", FLAGS.gpus, math.ceil(FLAGS.gpus / GPUS_PER_HOST)
  return None


def _consumption(run: loop.AbstractRun, chips: tuple[str, int, int]) -> dict[str, float]:
  """Examples per second per host that the train step takes at --mfu on ``chips``."""
  kind, count, hosts = chips
  config = run.trainer.config
  per_kind = loop.step_flops(run)  # the FLOPs of a step do not depend on how it is sharded
  n = config.train.num_steps
  counts = {k: 0 for k in per_kind}
  for step in range(n):
    counts[run.trainer.step_kind(step)] += 1
  step_flops = sum(per_kind[k] * counts[k] for k in per_kind) / n  # the tokenizer's G and D steps by frequency
  step_s = step_flops / (count * topology.PEAK_BF16_TFLOPS[kind] * 1e12 * FLAGS.mfu)
  return {"step_tflops": step_flops / 1e12, "step_s": step_s,
          "needed_per_host": config.train.global_batch_size / step_s / hosts}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  jax.config.update("jax_platforms", "cpu")  # only the host's CPUs are used; libtpu is not to look for chips
  config = FLAGS.config
  if FLAGS.steps < 1 or FLAGS.warmup < 0 or not 0 < FLAGS.mfu <= 1:
    raise app.UsageError(f"--steps={FLAGS.steps} must be >= 1, --warmup={FLAGS.warmup} >= 0 and --mfu={FLAGS.mfu} "
                         "in (0, 1].")
  chips = _chips()
  hosts = chips[2] if chips else 1
  try:
    task = registry.get(config.task)
    run = loop.abstract_run(task.TRAINER, _one_device(config), schema=task.default_config(),
                            devices=jax.devices()[:1])
    pipeline = run.trainer.train_data(0, hosts)
  except (config_lib.ConfigError, data.DataError) as e:
    sys.exit(f"{type(e).__name__}: {e}")
  workers = pipeline.workers
  lines = {"task": config.task, "source": f"{pipeline.source.name} ({len(pipeline.source)} examples)",
           "workers": workers, "prefetch": config.data.prefetch, "batch_per_host": pipeline.local_batch_size,
           "hosts": hosts}
  try:
    for step in range(FLAGS.warmup):
      pipeline.get(step)
    start = time.perf_counter()
    for step in range(FLAGS.warmup, FLAGS.warmup + FLAGS.steps):
      pipeline.get(step)
    seconds = time.perf_counter() - start
  finally:
    pipeline.close()
  rate = FLAGS.steps * pipeline.local_batch_size / seconds
  lines.update({"steps": FLAGS.steps, "seconds": f"{seconds:.2f}", "skipped": pipeline.skipped,
                "examples/s per worker": f"{rate / max(workers, 1):.1f}"})
  if chips:
    need = _consumption(run, chips)
    kind, count, _ = chips
    lines.update({
        "chips": f"{count} x {kind} ({topology.PEAK_BF16_TFLOPS[kind]:g} bf16 TFLOP/s peak each)",
        "mfu": FLAGS.mfu,
        "step TFLOPs": f"{need['step_tflops']:.1f}",
        "step time at mfu (s)": f"{need['step_s']:.3f}",
        "needed examples/s per host": f"{need['needed_per_host']:.0f}",
        "workers needed per host": math.ceil(need["needed_per_host"] / (rate / max(workers, 1))),
    })
  for k, v in lines.items():
    print(f"{k}: {v}")
  print(f"examples/s: {rate:.1f}")


def _one_device(config):
  """The config with a mesh over one device: only the pipeline is built."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor, config.mesh.slices, config.mesh.platform = -1, 1, 1, 1, ""
  return config


def run():
  app.run(main)


if __name__ == "__main__":
  run()

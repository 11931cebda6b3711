"""Tasks by name: each is a module with ``default_config()``, ``TRAINER`` and ``train_and_evaluate(config, workdir)``."""

from __future__ import annotations

import importlib
import types

from ifsq_jax import config_lib

TASKS = {
    "toy": "ifsq_jax.train.toy",
    "tokenizer": "ifsq_jax.train.tokenizer",
    "dit": "ifsq_jax.train.dit",
    "llamagen": "ifsq_jax.train.llamagen",
}


def get(task: str) -> types.ModuleType:
  """The task's module; a ConfigError lists the valid task names."""
  if task not in TASKS:
    raise config_lib.ConfigError(f"config.task={task!r} is not a known task; use one of {sorted(TASKS)}.")
  return importlib.import_module(TASKS[task])

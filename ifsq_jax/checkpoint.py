"""Checkpoints: the only module that imports Orbax.

A checkpoint is a step directory under ``<workdir>/checkpoints/`` with three items:
``state`` (the train state, sharded arrays), ``data`` (the input pipeline's
position, JSON) and ``config`` (the resolved config, JSON). Orbax writes each step
to a temporary directory and renames it when complete, so a step directory that
exists is finished; saving is asynchronous, and only the newest ``keep`` steps
are preserved (never a valid one because a newer save failed: old steps are
removed only after a newer save has finalized).

Restoring reads the newest step that restores cleanly onto the *current* mesh
(any device count: arrays are resharded). A newest step that fails to restore is
renamed ``<step>.corrupt`` (nothing is deleted) with a warning, and the previous
step is used. Checkpoints of a different train state (another model or
optimizer in the same work dir) are an error, never set aside.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

CORRUPT_SUFFIX = ".corrupt"


class CheckpointMismatchError(ValueError):
  """The work dir's checkpoints were written for a different model or optimizer."""


class Checkpointer:
  """Saves and restores (state, data position, config) per step.

  Args:
    directory: ``<workdir>/checkpoints``.
    keep: How many of the newest steps to preserve.
    async_save: Write in a background thread after copying arrays to host.
  """

  def __init__(self, directory: epath.PathLike, keep: int = 3, async_save: bool = True):
    self.directory = _absolute(directory)
    self._keep = keep
    self._async = async_save
    self._manager = self._new_manager()

  def _new_manager(self) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.LatestN(n=self._keep),
        enable_async_checkpointing=self._async,
        create=True,
        cleanup_tmp_directories=True,
    )
    return ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data", "config"))

  @property
  def steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any, data_state: dict[str, Any], config: dict[str, Any]) -> None:
    """Starts saving ``step`` (returns once arrays are on host when asynchronous)."""
    if step in self._manager.all_steps():
      return
    self._manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state),
            config=ocp.args.JsonSave(config)),
        force=True)

  def wait(self) -> None:
    """Blocks until pending saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict[str, Any]] | None:
    """The newest step that restores cleanly, onto the shardings of ``abstract_state``.

    Args:
      abstract_state: Tree of ``jax.ShapeDtypeStruct`` with ``sharding`` set.

    Returns:
      (step, state, data_state), or None when there is no checkpoint.
    """
    for step in reversed(self.steps):
      saved = _saved_shapes(self.directory / str(step) / "state")
      if saved is not None and saved != _shapes(abstract_state):
        missing = sorted(set(_shapes(abstract_state)) - set(saved))[:3]
        raise CheckpointMismatchError(
            f"Checkpoint step {step} in {self.directory} holds a different train state than this config builds "
            f"({len(saved)} arrays saved, {len(_shapes(abstract_state))} expected; e.g. not saved: {missing}). "
            "Use a new work dir, or checkpoint.init_from to start from its parameters.")
      try:
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=ocp.args.JsonRestore()))
        return step, restored["state"], dict(restored["data"])
      except Exception as e:  # pylint: disable=broad-except
        self._set_aside(step, e)
    return None

  def _set_aside(self, step: int, error: Exception) -> None:
    """Renames an unreadable step out of the way; it is kept for inspection."""
    src = self.directory / str(step)
    dst = self.directory / f"{step}{CORRUPT_SUFFIX}"
    if dst.exists():
      dst = self.directory / f"{step}{CORRUPT_SUFFIX}-{int(time.time())}"
    logging.warning("Checkpoint step %d in %s could not be restored (%s: %s); moving it to %s and "
                    "falling back to the previous step.", step, self.directory, type(error).__name__,
                    str(error)[:300], dst.name)
    if jax.process_index() == 0:
      src.rename(dst)
    _sync("ifsq_jax_set_aside_checkpoint")
    self._manager.close()
    self._manager = self._new_manager()


def _absolute(path: epath.PathLike) -> epath.Path:
  """Orbax needs absolute paths: a relative local path is resolved; URLs (gs://...) are kept."""
  return epath.Path(path) if "://" in str(path) else epath.Path(os.path.abspath(os.fspath(path)))


def _shapes(tree: Any) -> list[tuple]:
  return sorted((tuple(x.shape), str(x.dtype)) for x in jax.tree.leaves(tree))


def _saved_shapes(state_dir: epath.Path) -> list[tuple] | None:
  """(shape, dtype) of every saved array, or None when the metadata cannot be read (a corrupt step)."""
  try:
    with ocp.StandardCheckpointer() as ckptr:
      meta = ckptr.metadata(state_dir)
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    return sorted((tuple(m.shape), str(m.dtype)) for m in jax.tree.leaves(tree)) or None
  except Exception:  # pylint: disable=broad-except
    return None


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def resolve_checkpoint(path: epath.PathLike) -> epath.Path:
  """A work dir, a ``checkpoints`` dir or a step dir -> the step dir to read."""
  path = epath.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"init_from checkpoint {path} does not exist; give a work dir, its "
                            "checkpoints/ directory or one step directory inside it.")
  if (path / "state").exists():
    return path
  if (path / "checkpoints").exists():
    path = path / "checkpoints"
  steps = sorted(int(p.name) for p in path.iterdir() if p.name.isdigit())
  if not steps:
    raise FileNotFoundError(f"No checkpoint steps under {path}.")
  return path / str(steps[-1])


def restore_params(path: epath.PathLike, abstract_params: Any, key: str = "params") -> Any:
  """Reads one field (``params`` or ``ema_params``) of a saved state onto the given shardings.

  Args:
    path: A work dir, its ``checkpoints`` dir or a step dir.
    abstract_params: Tree of ``jax.ShapeDtypeStruct`` (with shardings) the
      field must match, or None to read it as saved onto the default device.
    key: The field of the saved state.
  """
  step_dir = resolve_checkpoint(_absolute(path))
  with ocp.StandardCheckpointer() as ckptr:
    meta = ckptr.metadata(step_dir / "state")
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    target = {k: jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), v) for k, v in tree.items()}
    if abstract_params is not None:
      target[key] = abstract_params
    restored = ckptr.restore(step_dir / "state", target)
  return restored[key]

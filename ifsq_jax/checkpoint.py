"""Checkpoints: the only module that imports Orbax.

A checkpoint is a step directory under ``<workdir>/checkpoints/`` with three items:
``state`` (the train state, sharded arrays), ``data`` (the input pipeline's
position, JSON) and ``config`` (the resolved config, JSON). Orbax writes each step
to a temporary directory and renames it when complete, so a step directory that
exists is finished; saving is asynchronous, and only the newest ``keep`` steps
are preserved (never a valid one because a newer save failed: old steps are
removed only after a newer save has finalized).

Restoring reads the newest step onto the *current* mesh (any device count:
arrays are resharded). Before any array is read, the saved tree (paths, shapes
and dtypes, from Orbax's metadata) is compared with the state this config
builds:

* a different tree (another model, or an optimizer setting that changes the
  optimizer state, such as turning gradient clipping on or off) is one
  :class:`CheckpointMismatchError` naming the differing entries; nothing is
  renamed;
* a step *proven unreadable* (a file of it fails to parse: its metadata is not
  JSON, an array file is truncated or does not decode, a file it names is
  absent) is renamed ``<step>.corrupt`` (nothing is deleted) with a warning, and
  the previous step is used;
* any other error (out of memory on a smaller mesh, a storage error) renames
  nothing: a transient storage error (``OSError``, TensorStore's
  ``UNAVAILABLE``/``DEADLINE_EXCEEDED``) is retried after :data:`RETRY_DELAYS_S`;
  what still fails stops the run with one :class:`CheckpointRestoreError` naming
  the step and the cause. When restoring onto the mesh fails, the step's files
  are read back onto the host: only if that read fails to parse is the step
  set aside.

:func:`restore_fields` reads named fields of a saved state (``params``,
``ema_params``) from any work dir without changing it: a step proven unreadable
is skipped with a warning, never renamed; other errors are retried or raised as
above.

Tree paths are written ``opt_state/1/0/mu/enc0/kernel`` (``jax.tree_util.keystr``
with ``simple=True``).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Callable, Iterator, TypeVar

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from ifsq_jax import paths

CORRUPT_SUFFIX = ".corrupt"
_SHOWN = 8  # entries named per kind of difference in an error message
RETRY_DELAYS_S = (2.0, 10.0, 30.0)  # waits before the retries of a transient storage error
# TensorStore reports errors as ValueError("<canonical status code>: ..."). These codes mean the bytes on storage do
# not parse as what the checkpoint says they are (a truncated or garbled file, a missing one).
_UNREADABLE_CODES = ("DATA_LOSS", "OUT_OF_RANGE", "INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION")
_TRANSIENT_CODES = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "ABORTED")
_T = TypeVar("_T")


class CheckpointError(ValueError):
  """A checkpoint that cannot be used; the message says why and what to do."""


class CheckpointMismatchError(CheckpointError):
  """A checkpoint holds a different tree (model or optimizer state) than the one asked for."""


class UnreadableCheckpointError(CheckpointError):
  """No step of a checkpoint directory could be read."""


class _EmptyMetadataError(ValueError):
  """A state item whose metadata parses to nothing."""


class CheckpointRestoreError(CheckpointError):
  """A step whose files are intact (or not proven otherwise) could not be restored; nothing was renamed."""


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
    """The newest readable step, onto the shardings of ``abstract_state``.

    Args:
      abstract_state: Tree of ``jax.ShapeDtypeStruct`` with ``sharding`` set.

    Returns:
      (step, state, data_state), or None when there is no (readable) checkpoint.

    Raises:
      CheckpointMismatchError: the newest readable step holds a different tree.
    """
    for step in reversed(self.steps):
      state_dir = self.directory / str(step) / "state"
      where = f"Checkpoint step {step} in {self.directory}"
      saved, damage = _metadata(state_dir, where)
      if damage is not None:
        self._set_aside(step, damage)
        continue
      diff = _difference(_entries(saved), _entries(abstract_state))
      if diff:
        raise CheckpointMismatchError(_mismatch_message(where, diff))
      try:
        restored = _retried(lambda: self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=ocp.args.JsonRestore())), where)
        return step, restored["state"], dict(restored["data"])
      except Exception as e:  # pylint: disable=broad-except
        proof = _unreadable_proof(self.directory / str(step), where)
        if proof is None:
          raise _restore_error(where, e) from e
        self._set_aside(step, proof)
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


_FRESH_START = ("To start afresh, use a new work dir; to start a new run from this run's parameters, use a new work "
                "dir with --config.checkpoint.init_from=<this work dir>.")


def _absolute(path: epath.PathLike) -> epath.Path:
  """Orbax needs absolute paths: a relative local path is resolved; URLs (gs://...) are kept."""
  return paths.absolute(path)


def _entries(tree: Any, prefix: str = "") -> dict[str, tuple[tuple[int, ...] | None, str]]:
  """{"opt_state/1/0/mu/enc0/kernel": (shape, dtype)} for every leaf of an abstract or metadata tree."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    name = jax.tree_util.keystr(path, simple=True, separator="/")
    shape = getattr(leaf, "shape", None)
    dtype = getattr(leaf, "dtype", None)
    out[f"{prefix}/{name}" if prefix else name] = (
        tuple(shape) if shape is not None else None, str(dtype) if dtype is not None else type(leaf).__name__)
  return out


def _read_metadata(state_dir: epath.Path) -> Any:
  """The saved state's metadata tree (nested dicts and lists of array metadata).

  Read with the PyTree handler: ``StandardCheckpointer.metadata`` on an item
  directory also looks for a step-level metadata file there and warns that it
  does not exist.
  """
  handler = ocp.PyTreeCheckpointHandler()
  try:
    meta = handler.metadata(state_dir)
  finally:
    handler.close()
  tree = getattr(meta, "tree", meta)
  if not tree:
    raise _EmptyMetadataError(f"the metadata of {state_dir} is empty.")
  return tree


def _metadata(state_dir: epath.Path, where: str) -> tuple[Any, Exception | None]:
  """(the saved metadata tree, None), or (None, the error) when the step is proven unreadable.

  Storage errors are retried; any other error raises :class:`CheckpointRestoreError`.
  """
  try:
    return _retried(lambda: _read_metadata(state_dir), where), None
  except Exception as e:  # pylint: disable=broad-except
    if _kind(e) != "unreadable":
      raise _restore_error(where, e) from e
    return None, e


def _fmt(entry: tuple) -> str:
  shape, dtype = entry
  return f"{dtype}{list(shape)}" if shape is not None else dtype


def _difference(saved: dict[str, tuple], expected: dict[str, tuple]) -> dict[str, list[str]]:
  """Entries the expected tree has that were not saved, saved entries it lacks, and shape/dtype changes."""
  missing = sorted(set(expected) - set(saved))
  unexpected = sorted(set(saved) - set(expected))
  changed = [f"{k}: saved {_fmt(saved[k])}, expected {_fmt(expected[k])}"
             for k in sorted(set(saved) & set(expected)) if saved[k] != expected[k]]
  return {k: v for k, v in (("missing", missing), ("unexpected", unexpected), ("changed", changed)) if v}


def _listing(items: list[str]) -> str:
  shown = "\n".join(f"    {x}" for x in items[:_SHOWN])
  more = f"\n    ... and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
  return shown + more


_RESUME_ADVICE = ("A changed model or optimizer setting changes the train state (e.g. optimizer.grad_clip_norm=0 "
                  "removes the clipping element of the optimizer chain). " + _FRESH_START)
_FIELDS_ADVICE = "Give a checkpoint of the same model (the same config.model)."


def _mismatch_message(what: str, diff: dict[str, list[str]], target: str = "this config builds",
                      advice: str = _RESUME_ADVICE) -> str:
  lines = [f"{what} holds a different train state than {target}:"]
  if "missing" in diff:
    lines.append(f"  {len(diff['missing'])} entries expected but not in the checkpoint (missing):\n"
                 + _listing(diff["missing"]))
  if "unexpected" in diff:
    lines.append(f"  {len(diff['unexpected'])} entries in the checkpoint but not expected (unexpected):\n"
                 + _listing(diff["unexpected"]))
  if "changed" in diff:
    lines.append(f"  {len(diff['changed'])} entries with another shape or dtype:\n" + _listing(diff["changed"]))
  lines.append(advice)
  return "\n".join(lines)


def _kind(error: BaseException) -> str:
  """"unreadable" (the files fail to parse), "transient" (storage; worth a retry) or "other"."""
  if isinstance(error, (json.JSONDecodeError, UnicodeDecodeError, FileNotFoundError, _EmptyMetadataError)):
    return "unreadable"
  if isinstance(error, OSError):  # ConnectionError and TimeoutError included
    return "transient"
  code = str(error).split(":", 1)[0].strip()
  if isinstance(error, ValueError) and code in _UNREADABLE_CODES:
    return "unreadable"
  if code in _TRANSIENT_CODES:
    return "transient"
  return "other"


def _retried(read: Callable[[], _T], where: str) -> _T:
  """``read()``, retried after each of :data:`RETRY_DELAYS_S` while it fails with a transient storage error."""
  for delay in (*RETRY_DELAYS_S, None):
    try:
      return read()
    except Exception as e:  # pylint: disable=broad-except
      if delay is None or _kind(e) != "transient":
        raise
      logging.warning("%s: transient storage error (%s: %s); retrying in %.0f s.", where, type(e).__name__,
                      str(e)[:300], delay)
      time.sleep(delay)
  raise AssertionError("unreachable")


def _read_back(step_dir: epath.Path) -> None:
  """Reads every file of a step onto the host (no devices, no shardings); raises what reading raises."""
  state_dir = step_dir / "state"
  handler = ocp.PyTreeCheckpointHandler()
  try:
    tree = _read_metadata(state_dir)
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    handler.restore(state_dir, args=ocp.args.PyTreeRestore(restore_args=restore_args))
  finally:
    handler.close()
  for item in ("data", "config"):
    if (step_dir / item / "metadata").exists():
      json.loads((step_dir / item / "metadata").read_text())


def _unreadable_proof(step_dir: epath.Path, where: str) -> Exception | None:
  """The error that proves a step unreadable (its files fail to parse on the host), or None when they read back."""
  try:
    _retried(lambda: _read_back(step_dir), where)
  except Exception as e:  # pylint: disable=broad-except
    return e if _kind(e) == "unreadable" else None
  return None


def _restore_error(where: str, error: BaseException) -> CheckpointRestoreError:
  return CheckpointRestoreError(
      f"{where} could not be restored ({type(error).__name__}: {str(error)[:500]}). Its files are kept as they are "
      "(not proven unreadable). If memory ran out, restore onto more devices or shard the state further "
      "(config.mesh.fsdp); if storage failed, rerun when it is reachable.")


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


# ------------------------------------------------------------------ reading fields of a saved state

def _step_dirs(path: epath.Path) -> Iterator[tuple[int, epath.Path]]:
  """(step, step dir) newest first for a work dir or a ``checkpoints`` dir; just the one for a step dir."""
  if not path.exists():
    raise FileNotFoundError(f"checkpoint {path} does not exist; give a work dir, its checkpoints/ directory or one "
                            "step directory inside it.")
  if (path / "state").exists():
    yield int(path.name) if path.name.isdigit() else -1, path
    return
  if (path / "checkpoints").exists():
    path = path / "checkpoints"
  steps = sorted((int(p.name) for p in path.iterdir() if p.name.isdigit()), reverse=True)
  if paths.is_remote(path):
    # In a bucket Orbax writes a step in place and marks it complete with a commit file last; locally an unfinished
    # step has a temporary name.
    steps = [s for s in steps if ocp.utils.is_checkpoint_finalized(path / str(s))]
  if not steps:
    raise FileNotFoundError(f"No checkpoint steps under {path}.")
  for step in steps:
    yield step, path / str(step)


def resolve_checkpoint(path: epath.PathLike) -> epath.Path:
  """A work dir, a ``checkpoints`` dir or a step dir -> the newest step dir (readable or not)."""
  return next(_step_dirs(_absolute(path)))[1]


def step_directory(path: epath.PathLike, step: int) -> epath.Path:
  """The directory of ``step`` under a work dir or ``checkpoints`` dir (a step dir is returned as it is)."""
  path = _absolute(path)
  if (path / "state").exists():
    return path
  if (path / "checkpoints").exists():
    path = path / "checkpoints"
  return path / str(step)


def read_saved_config(step_dir: epath.PathLike) -> dict[str, Any] | None:
  """The config saved with one step (its ``config`` item), or None when it cannot be read."""
  item = epath.Path(step_dir) / "config"
  for name in ("metadata", "config.json"):
    if (item / name).exists():
      try:
        return json.loads((item / name).read_text())
      except (OSError, ValueError):
        return None
  return None


def restore_fields(path: epath.PathLike, targets: dict[str, Any]) -> tuple[int, dict[str, Any]]:
  """Reads the named top-level fields of a saved train state, newest readable step first.

  Nothing else of the state is read (a partial restore), and nothing on disk is
  changed: an unreadable step is skipped with a warning naming it.

  Args:
    path: A work dir, its ``checkpoints`` dir or one step dir.
    targets: Field name -> tree of ``jax.ShapeDtypeStruct`` (with shardings) the
      field must match, or None to read the field as saved onto the default device;
      e.g. ``{"params": abstract_params, "ema_params": None}``.

  Returns:
    (step, {field: tree}).

  Raises:
    FileNotFoundError: ``path`` does not exist or holds no steps.
    CheckpointMismatchError: a field is not saved, or a target's tree differs from the saved one.
    UnreadableCheckpointError: no step could be read.
  """
  root = _absolute(path)
  tried = []
  for step, step_dir in _step_dirs(root):
    state_dir = step_dir / "state"
    where = f"Checkpoint {step_dir}"
    saved, damage = _metadata(state_dir, where)
    if damage is not None:
      tried.append(_skip(step_dir, damage))
      continue
    have = sorted(saved) if isinstance(saved, dict) else []
    absent = sorted(set(targets) - set(have))
    if absent:
      raise CheckpointMismatchError(f"{step_dir} holds no field {', '.join(absent)} of a train state; its "
                                    f"fields are {have}.")
    diff: dict[str, list[str]] = {}
    for field, target in targets.items():
      if target is not None:
        for kind, items in _difference(_entries(saved[field], field), _entries(target, field)).items():
          diff.setdefault(kind, []).extend(items)
    if diff:
      raise CheckpointMismatchError(_mismatch_message(f"{step_dir}", diff, f"the {', '.join(targets)} asked for",
                                                      _FIELDS_ADVICE))
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    item = {field: target if target is not None else jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), saved[field])
            for field, target in targets.items()}
    try:
      restored = _retried(lambda: _restore_partial(state_dir, item), where)  # pylint: disable=cell-var-from-loop
    except Exception as e:  # pylint: disable=broad-except
      proof = _unreadable_proof(step_dir, where)
      if proof is None:
        raise _restore_error(where, e) from e
      tried.append(_skip(step_dir, proof))
      continue
    return step, {field: restored[field] for field in targets}
  raise UnreadableCheckpointError(f"No readable checkpoint in {root}; tried " + "; ".join(tried) + ".")


def _restore_partial(state_dir: epath.Path, item: dict[str, Any]) -> dict[str, Any]:
  handler = ocp.PyTreeCheckpointHandler()
  try:
    return handler.restore(state_dir, args=ocp.args.PyTreeRestore(
        item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True))
  finally:
    handler.close()


def _skip(step_dir: epath.Path, error: Exception) -> str:
  reason = f"{step_dir.name} ({type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''})"
  logging.warning("Skipping unreadable checkpoint step %s (%s: %s); trying the previous step.", step_dir,
                  type(error).__name__, str(error)[:300])
  return reason


def restore_params(path: epath.PathLike, abstract_params: Any, key: str = "params") -> Any:
  """Reads one field (``params`` or ``ema_params``) of a saved state: ``restore_fields(path, {key: abstract})``.

  Args:
    path: A work dir, its ``checkpoints`` dir or a step dir.
    abstract_params: Tree of ``jax.ShapeDtypeStruct`` (with shardings) the
      field must match, or None to read it as saved onto the default device.
    key: The field of the saved state.
  """
  return restore_fields(path, {key: abstract_params})[1][key]

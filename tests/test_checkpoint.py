"""Checkpoints: a different train state is one clear error (nothing renamed); only steps proven unreadable are
set aside; out of memory and storage errors rename nothing (retried when transient)."""

import dataclasses
import gc
import json
import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ifsq_jax
from conftest import toy_config
from ifsq_jax import checkpoint, config_lib
from ifsq_jax.models.tokenizer import Tokenizer, TokenizerConfig


def _params(width=4):
  return {"enc": {"kernel": jnp.ones((3, width)), "bias": jnp.zeros((width,))}, "dec": {"kernel": jnp.ones((width, 3))}}


def _state(clip=True, width=4, dtype=jnp.float32):
  params = jax.tree.map(lambda p: p.astype(dtype), _params(width))
  parts = [optax.clip_by_global_norm(1.0)] if clip else []
  tx = optax.chain(*parts, optax.adam(1e-3))
  return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
          "ema_params": jax.tree.map(jnp.copy, params)}


def _abstract(state):
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), state)


def _save(directory, steps, state):
  ck = checkpoint.Checkpointer(directory, async_save=False)
  for step in steps:
    ck.save(step, state, {"next_step": step}, {"task": "test"})
  ck.close()


def _names(directory):
  return sorted(p.name for p in directory.iterdir())


def test_an_optimizer_setting_that_changes_the_chain_is_one_error_naming_the_entries(tmp_path):
  # Same list of array shapes, different tree: clipping adds an element to the optax chain.
  _save(tmp_path / "ck", [1, 2], _state(clip=True))
  ck = checkpoint.Checkpointer(tmp_path / "ck")
  with pytest.raises(checkpoint.CheckpointMismatchError) as e:
    ck.restore_latest(_abstract(_state(clip=False)))
  ck.close()
  msg = str(e.value)
  assert "holds a different train state" in msg and "step 2" in msg
  assert "opt_state/0/0/mu/enc/kernel" in msg and "missing" in msg  # what this state has
  assert "opt_state/1/0/mu/enc/kernel" in msg and "unexpected" in msg  # what the checkpoint has
  assert "new work dir" in msg and "init_from" in msg
  assert _names(tmp_path / "ck") == ["1", "2"]  # nothing renamed


def test_shape_and_dtype_differences_are_named(tmp_path):
  _save(tmp_path / "ck", [3], _state(width=4))
  ck = checkpoint.Checkpointer(tmp_path / "ck")
  with pytest.raises(checkpoint.CheckpointMismatchError, match=r"params/enc/kernel: saved float32\[3, 4\], "
                     r"expected float32\[3, 8\]"):
    ck.restore_latest(_abstract(_state(width=8)))
  with pytest.raises(checkpoint.CheckpointMismatchError, match=r"params/enc/bias: saved float32\[4\], "
                     r"expected bfloat16\[4\]"):
    ck.restore_latest(_abstract(_state(dtype=jnp.bfloat16)))
  ck.close()
  assert _names(tmp_path / "ck") == ["3"]


def test_unreadable_metadata_is_set_aside_and_the_previous_step_restored(tmp_path):
  state = _state()
  _save(tmp_path / "ck", [1, 2], state)
  for p in (tmp_path / "ck" / "2" / "state").glob("_METADATA"):
    p.write_text("{not json")
  ck = checkpoint.Checkpointer(tmp_path / "ck")
  step, restored, data = ck.restore_latest(_abstract(state))
  ck.close()
  assert step == 1 and data == {"next_step": 1}
  np.testing.assert_array_equal(restored["params"]["enc"]["kernel"], state["params"]["enc"]["kernel"])
  assert _names(tmp_path / "ck") == ["1", "2.corrupt"]


def test_restore_fields_reads_named_fields_from_work_checkpoints_and_step_dirs(tmp_path):
  state = _state()
  _save(tmp_path / "run" / "checkpoints", [5, 7], state)
  for path in (tmp_path / "run", tmp_path / "run" / "checkpoints", tmp_path / "run" / "checkpoints" / "7"):
    step, out = checkpoint.restore_fields(path, {"params": None, "ema_params": _abstract(state["ema_params"])})
    assert step == 7 and sorted(out) == ["ema_params", "params"]
    np.testing.assert_array_equal(out["params"]["dec"]["kernel"], state["params"]["dec"]["kernel"])
  step, out = checkpoint.restore_fields(tmp_path / "run" / "checkpoints" / "5", {"params": None})
  assert step == 5
  params = checkpoint.restore_params(tmp_path / "run", None, key="ema_params")
  assert jax.tree.structure(params) == jax.tree.structure(state["ema_params"])
  with pytest.raises(checkpoint.CheckpointMismatchError, match=r"params/enc/kernel: saved float32\[3, 4\]"):
    checkpoint.restore_fields(tmp_path / "run", {"params": _abstract(_params(width=8))})
  with pytest.raises(checkpoint.CheckpointMismatchError, match="holds no field batch_stats"):
    checkpoint.restore_fields(tmp_path / "run", {"batch_stats": None})
  with pytest.raises(FileNotFoundError, match="does not exist"):
    checkpoint.restore_fields(tmp_path / "nowhere", {"params": None})


def _damage_arrays(step_dir):
  for p in (step_dir / "state").rglob("*"):
    if p.is_file() and "d" in p.relative_to(step_dir / "state").parts:
      p.write_bytes(b"")


def test_restore_fields_skips_an_unreadable_newest_step_with_a_warning(tmp_path, caplog):
  state = _state()
  _save(tmp_path / "run" / "checkpoints", [5, 7], state)
  _damage_arrays(tmp_path / "run" / "checkpoints" / "7")
  with caplog.at_level(logging.WARNING):
    step, out = checkpoint.restore_fields(tmp_path / "run", {"params": None})
  assert step == 5
  assert any("step" in r.getMessage() and "/7" in r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
  assert _names(tmp_path / "run" / "checkpoints") == ["5", "7"]  # read-only: nothing renamed
  (tmp_path / "run" / "checkpoints" / "5" / "state" / "_METADATA").write_text("")
  with pytest.raises(checkpoint.UnreadableCheckpointError, match=r"No readable checkpoint in .*run; tried 7 .*; 5 "):
    checkpoint.restore_fields(tmp_path / "run", {"params": None})


# ------------------------------------------------------------------ load_tokenizer on a work dir

TOK = TokenizerConfig(hidden_size=32, hidden_size_mult=(1, 1), num_res_blocks=1, downsample=(True, False),
                      upsample=(False, True), resolution=16, levels=(5, 5, 5, 5))


def _tokenizer_workdir(path, steps=(2, 4), old_config=False):
  """A work dir as the tokenizer trainer leaves it, with a small model."""
  params = nn.meta.unbox(Tokenizer(TOK).init(jax.random.key(0), np.zeros((1, 16, 16, 3), np.float32))["params"])
  model = config_lib.from_dataclass(TOK, exclude=("resolution",)).to_dict()
  if old_config:  # as older versions saved it: group_sizes [] and without newer fields
    model["group_sizes"] = []
    model.pop("vq_beta")
  config = {"task": "tokenizer", "model": model, "data": {"image_size": 16, "name": "embedded"}}
  path.mkdir(parents=True)
  (path / "config.json").write_text(json.dumps(config))
  ck = checkpoint.Checkpointer(path / "checkpoints", async_save=False)
  for i, step in enumerate(steps):
    ema = jax.tree.map(lambda p, i=i: p * (i + 2.0), params)
    state = {"step": jnp.int32(step), "params": {"gen": params, "disc": {"w": jnp.ones((3,))}}, "ema_params": ema,
             "opt_state": {"gen": optax.adam(1e-3).init(params)}}
    ck.save(step, state, {"next_step": step}, config)
  ck.close()
  return params


def test_load_tokenizer_from_a_work_dir_emits_no_warning(tmp_path, caplog, capfd):
  params = _tokenizer_workdir(tmp_path / "run", old_config=True)
  gc.collect()  # an earlier test's failed read (a damaged checkpoint) reports its lost asyncio task when collected
  capfd.readouterr()
  with caplog.at_level(logging.INFO):
    tok = ifsq_jax.load_tokenizer(str(tmp_path / "run"))
  # asyncio's "Task exception was never retrieved" is reported whenever a TensorStore read task of Orbax's (this
  # test's or an earlier one's) is collected; it is not a warning of the loader.
  warnings = [r.getMessage() for r in caplog.records
              if r.levelno >= logging.WARNING and not r.getMessage().startswith("Task exception was never retrieved")]
  assert not warnings, warnings
  assert "WARNING" not in capfd.readouterr().err
  assert tok.config == TOK and tok.config.group_sizes is None
  np.testing.assert_allclose(tok.variables["params"]["encoder"]["conv_in"]["kernel"],
                             3.0 * params["encoder"]["conv_in"]["kernel"])  # the newest step's EMA weights
  raw = ifsq_jax.load_tokenizer(str(tmp_path / "run" / "checkpoints"), ema=False)
  np.testing.assert_array_equal(raw.variables["params"]["encoder"]["conv_in"]["kernel"],
                                params["encoder"]["conv_in"]["kernel"])
  x = np.zeros((1, 16, 16, 3), np.float32)
  assert tok.encode_to_indices(x).shape == (1, 8, 8)


def test_load_tokenizer_falls_back_past_an_unreadable_newest_step(tmp_path, caplog):
  params = _tokenizer_workdir(tmp_path / "run")
  _damage_arrays(tmp_path / "run" / "checkpoints" / "4")
  with caplog.at_level(logging.WARNING):
    tok = ifsq_jax.load_tokenizer(str(tmp_path / "run"))
  np.testing.assert_allclose(tok.variables["params"]["encoder"]["conv_in"]["kernel"],
                             2.0 * params["encoder"]["conv_in"]["kernel"])  # step 2's EMA weights
  assert any("checkpoints/4" in r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
  (tmp_path / "run" / "checkpoints" / "2" / "state" / "_METADATA").write_text("")
  with pytest.raises(checkpoint.UnreadableCheckpointError, match="tried 4 .*; 2 "):
    ifsq_jax.load_tokenizer(str(tmp_path / "run"))


def test_pretrained_does_not_import_the_trainers():
  import pathlib  # pylint: disable=g-import-not-at-top
  from ifsq_jax.models import pretrained  # pylint: disable=g-import-not-at-top
  assert "ifsq_jax.train" not in pathlib.Path(pretrained.__file__).read_text()


# ------------------------------------------------------------------ through the train loop

def test_changing_grad_clip_between_runs_is_a_mismatch_error_not_a_restart(tmp_path):
  from ifsq_jax.train import toy  # pylint: disable=g-import-not-at-top
  toy.train_and_evaluate(toy_config(**{"train.num_steps": 2, "checkpoint.every": 1}), tmp_path)
  before = _names(tmp_path / "checkpoints")
  with pytest.raises(checkpoint.CheckpointMismatchError) as e:
    toy.train_and_evaluate(toy_config(**{"train.num_steps": 4, "optimizer.grad_clip_norm": 0.0}), tmp_path)
  assert "opt_state/" in str(e.value) and "init_from" in str(e.value)
  assert _names(tmp_path / "checkpoints") == before and not list((tmp_path / "checkpoints").glob("*.corrupt*"))


# ------------------------------------------------------------------ faults while restoring: only proven damage renames

def _fail_restores(monkeypatch, ck, error, times=None):
  """Makes the manager's restore raise ``error`` (``times`` times, or always); returns the call counter."""
  calls = {"n": 0}
  real = ck._manager.restore  # pylint: disable=protected-access

  def restore(*args, **kwargs):
    calls["n"] += 1
    if times is None or calls["n"] <= times:
      raise error
    return real(*args, **kwargs)

  monkeypatch.setattr(ck._manager, "restore", restore)  # pylint: disable=protected-access
  return calls


@pytest.fixture
def no_retry_wait(monkeypatch):
  monkeypatch.setattr(checkpoint, "RETRY_DELAYS_S", (0.0, 0.0, 0.0))


def test_out_of_memory_while_restoring_stops_with_the_step_and_renames_nothing(tmp_path, monkeypatch, no_retry_wait):
  state = _state()
  _save(tmp_path / "ck", [1, 2], state)
  ck = checkpoint.Checkpointer(tmp_path / "ck")
  calls = _fail_restores(monkeypatch, ck, jax.errors.JaxRuntimeError(
      "RESOURCE_EXHAUSTED: Out of memory allocating 247714951752 bytes."))
  with pytest.raises(checkpoint.CheckpointRestoreError) as e:
    ck.restore_latest(_abstract(state))
  ck.close()
  assert "step 2" in str(e.value) and "RESOURCE_EXHAUSTED" in str(e.value) and "mesh.fsdp" in str(e.value)
  assert calls["n"] == 1  # not a storage error: no retry
  assert _names(tmp_path / "ck") == ["1", "2"]


def test_a_storage_error_once_is_retried_and_restores_the_newest_step(tmp_path, monkeypatch, no_retry_wait, caplog):
  state = _state()
  _save(tmp_path / "ck", [1, 2], state)
  ck = checkpoint.Checkpointer(tmp_path / "ck")
  calls = _fail_restores(monkeypatch, ck, OSError("connection reset by peer"), times=1)
  with caplog.at_level(logging.WARNING):
    step, restored, data = ck.restore_latest(_abstract(state))
  ck.close()
  assert step == 2 and data == {"next_step": 2} and calls["n"] == 2
  np.testing.assert_array_equal(restored["params"]["enc"]["kernel"], state["params"]["enc"]["kernel"])
  assert any("retrying" in r.getMessage() for r in caplog.records)
  assert _names(tmp_path / "ck") == ["1", "2"]


def test_a_storage_error_that_persists_stops_the_run_and_renames_nothing(tmp_path, monkeypatch, no_retry_wait):
  state = _state()
  _save(tmp_path / "ck", [1, 2], state)
  ck = checkpoint.Checkpointer(tmp_path / "ck")
  calls = _fail_restores(monkeypatch, ck, OSError("storage unreachable"))
  with pytest.raises(checkpoint.CheckpointRestoreError, match="step 2.*OSError: storage unreachable"):
    ck.restore_latest(_abstract(state))
  ck.close()
  assert calls["n"] == len(checkpoint.RETRY_DELAYS_S) + 1
  assert _names(tmp_path / "ck") == ["1", "2"]


def test_a_truncated_array_file_is_set_aside_and_the_previous_step_restored(tmp_path):
  state = _state()
  _save(tmp_path / "ck", [1, 2], state)
  for p in (tmp_path / "ck" / "2" / "state").rglob("*"):
    if p.is_file() and "d" in p.relative_to(tmp_path / "ck" / "2" / "state").parts:
      p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
  ck = checkpoint.Checkpointer(tmp_path / "ck")
  step, _, _ = ck.restore_latest(_abstract(state))
  ck.close()
  assert step == 1 and _names(tmp_path / "ck") == ["1", "2.corrupt"]


def test_a_restore_error_with_intact_files_is_not_called_damage(tmp_path, monkeypatch, no_retry_wait):
  # An error that looks like damage (a TensorStore data code) while placing the state on the mesh: the files read
  # back on the host, so the step is kept and the run stops.
  state = _state()
  _save(tmp_path / "ck", [1, 2], state)
  ck = checkpoint.Checkpointer(tmp_path / "ck")
  _fail_restores(monkeypatch, ck, ValueError("INVALID_ARGUMENT: sharding does not fit the devices"))
  with pytest.raises(checkpoint.CheckpointRestoreError, match="step 2"):
    ck.restore_latest(_abstract(state))
  ck.close()
  assert _names(tmp_path / "ck") == ["1", "2"]


def test_restore_fields_raises_on_out_of_memory_instead_of_reading_an_older_step(tmp_path, monkeypatch, no_retry_wait):
  _save(tmp_path / "run" / "checkpoints", [5, 7], _state())

  def out_of_memory(*args, **kwargs):
    raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory")

  monkeypatch.setattr(checkpoint, "_restore_partial", out_of_memory)
  with pytest.raises(checkpoint.CheckpointRestoreError, match="checkpoints/7.*RESOURCE_EXHAUSTED"):
    checkpoint.restore_fields(tmp_path / "run", {"params": None})
  assert _names(tmp_path / "run" / "checkpoints") == ["5", "7"]


def test_a_run_whose_restore_runs_out_of_memory_stops_without_restarting(tmp_path, monkeypatch, no_retry_wait):
  from ifsq_jax.train import toy  # pylint: disable=g-import-not-at-top
  toy.train_and_evaluate(toy_config(**{"train.num_steps": 2, "checkpoint.every": 1}), tmp_path)
  before = _names(tmp_path / "checkpoints")
  real = checkpoint.Checkpointer._new_manager  # pylint: disable=protected-access

  def out_of_memory(*args, **kwargs):
    raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory")

  def manager(self):
    m = real(self)
    m.restore = out_of_memory
    return m

  monkeypatch.setattr(checkpoint.Checkpointer, "_new_manager", manager)
  with pytest.raises(checkpoint.CheckpointRestoreError, match="step 2"):
    toy.train_and_evaluate(toy_config(**{"train.num_steps": 4}), tmp_path)
  assert _names(tmp_path / "checkpoints") == before

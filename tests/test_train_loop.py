"""The shared loop in-process: sharding, gradient accumulation, the non-finite guard, restore across meshes."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import read_metrics, toy_config
from ifsq_jax import checkpoint, parallel
from ifsq_jax.train import loop, state as state_lib, toy


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_sharded_step_on_8_devices_matches_one_device_and_fsdp_shards_kernels(tmp_path):
  one = toy.train_and_evaluate(toy_config(**{"train.num_steps": 3}), tmp_path / "one", devices=jax.devices()[:1])
  cfg8 = toy_config(**{"train.num_steps": 3, "mesh.data": 2, "mesh.fsdp": 4})
  eight = toy.train_and_evaluate(cfg8, tmp_path / "eight")
  m1, m8 = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "eight")
  for step in (1, 2, 3):
    np.testing.assert_allclose(m8[step]["loss"], m1[step]["loss"], rtol=1e-5)
  for a, b in zip(_leaves(one.params), _leaves(eight.params)):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
  kernel = eight.params["mlp_in"]["kernel"]  # logical axes (embed, mlp): embed -> fsdp
  assert kernel.shape == (16, 64)
  assert kernel.sharding.spec[0] == "fsdp"
  assert {s.data.shape for s in kernel.addressable_shards} == {(4, 64)}
  # Adam's moments follow the parameters' sharding.
  mu = [x for x in jax.tree.leaves(eight.opt_state) if getattr(x, "shape", None) == (16, 64)]
  assert mu and all(x.sharding.spec[0] == "fsdp" for x in mu)
  assert len(one.params["mlp_in"]["kernel"].sharding.device_set) == 1


def test_gradient_accumulation_over_4_micro_batches_matches_full_batch():
  cfg = toy_config()
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
  trainer = toy.ToyTrainer(cfg, mesh)
  params = jax.tree.map(lambda x: x.value if hasattr(x, "value") else x, trainer.init_state(jax.random.key(0)).params,
                        is_leaf=lambda x: hasattr(x, "value"))
  batch = {"image": jax.random.uniform(jax.random.key(1), (16, 16, 16, 3), minval=-1, maxval=1)}
  full = jax.jit(lambda p, b: state_lib.accumulate_gradients(trainer.loss_fn, p, b, jax.random.key(2), 1))(params, batch)
  accum = jax.jit(lambda p, b: state_lib.accumulate_gradients(trainer.loss_fn, p, b, jax.random.key(2), 4))(params, batch)
  np.testing.assert_allclose(float(accum[0]), float(full[0]), rtol=1e-6)
  for a, b in zip(_leaves(full[2]), _leaves(accum[2])):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-7)


def test_grad_accumulation_config_trains_like_the_full_batch(tmp_path):
  toy.train_and_evaluate(toy_config(**{"train.num_steps": 2}), tmp_path / "full")
  toy.train_and_evaluate(toy_config(**{"train.num_steps": 2, "train.grad_accum_steps": 2, "mesh.data": 8}),
                         tmp_path / "accum")
  a, b = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "accum")
  for step in (1, 2):
    np.testing.assert_allclose(b[step]["loss"], a[step]["loss"], rtol=1e-5)


class _NanAfter3(toy.ToyTrainer):
  """Produces a NaN loss from step 3 on."""

  def train_steps(self):
    inner = super().train_steps()["train"]

    def step(state, batch, key, frozen):
      batch = {**batch, "image": jnp.where(state.step >= 3, jnp.nan, batch["image"])}
      return inner(state, batch, key, frozen)

    return {"train": step}


def test_nonfinite_steps_are_skipped_counted_and_stop_the_run(tmp_path):
  cfg = toy_config(**{"train.num_steps": 20, "train.max_nonfinite_steps": 4, "checkpoint.every": 2})
  with pytest.raises(loop.NonFiniteError, match="4 non-finite steps in a row"):
    loop.run(_NanAfter3, cfg, tmp_path, schema=toy.default_config())
  metrics = read_metrics(tmp_path)
  assert [metrics[s]["nonfinite_steps"] for s in (1, 2, 3, 4, 5)] == [0, 0, 0, 1, 1]
  # Checkpoints 2, 4 and 6 were saved; the run stopped at step 7, before saving again. The skipped steps left
  # the parameters untouched: checkpoints 4 and 6 hold the same finite parameters.
  steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert steps == [2, 4, 6]
  p4, p6 = (checkpoint.restore_params(tmp_path / "checkpoints" / str(s), None) for s in (4, 6))
  for a, b in zip(_leaves(p4), _leaves(p6)):
    assert np.all(np.isfinite(a))
    np.testing.assert_array_equal(a, b)


def test_warmup_cosine_schedule_and_decay_mask():
  cfg = toy_config(**{"optimizer.schedule": "warmup_cosine", "optimizer.warmup_steps": 10,
                      "optimizer.weight_decay": 0.1, "optimizer.decay_mask": "matrices",
                      "optimizer.grad_clip_norm": 0.0, "optimizer.lr": 1.0, "optimizer.min_lr_ratio": 0.1})
  tx = state_lib.make_optimizer(cfg.optimizer, 110)
  params = {"w": jnp.ones((2, 2)), "b": jnp.ones((2,))}
  opt = tx.init(params)
  zero = jax.tree.map(jnp.zeros_like, params)
  updates, opt = tx.update(zero, opt, params)  # step 0 of warmup: lr 0
  assert float(jnp.abs(updates["w"]).max()) == 0.0
  for _ in range(10):
    updates, opt = tx.update(zero, opt, params)
  # Zero gradients: only weight decay moves parameters, and only the matrix.
  np.testing.assert_allclose(np.asarray(updates["w"]), -0.1, rtol=1e-3)
  assert float(jnp.abs(updates["b"]).max()) == 0.0
  sched = optax.warmup_cosine_decay_schedule(0.0, 1.0, 10, 110, 0.1)
  assert abs(float(sched(110)) - 0.1) < 1e-6


def test_restore_onto_another_mesh_both_ways(tmp_path):
  # 8 devices (fsdp 8) -> 1 device.
  cfg = toy_config(**{"train.num_steps": 3, "mesh.data": 1, "mesh.fsdp": 8})
  saved = toy.train_and_evaluate(cfg, tmp_path / "a")
  cfg1 = toy_config(**{"train.num_steps": 4})
  resumed = toy.train_and_evaluate(cfg1, tmp_path / "a", devices=jax.devices()[:1])
  assert int(resumed.step) == 4 and len(resumed.params["mlp_in"]["kernel"].sharding.device_set) == 1
  first = read_metrics(tmp_path / "a")
  assert sorted(first) == [1, 2, 3, 4]
  # 1 device -> 8 devices, restoring exactly what was saved.
  cfg = toy_config(**{"train.num_steps": 2})
  saved = toy.train_and_evaluate(cfg, tmp_path / "b", devices=jax.devices()[:1])
  ck = checkpoint.Checkpointer(tmp_path / "b" / "checkpoints")
  trainer = toy.ToyTrainer(toy_config(**{"mesh.fsdp": 8, "mesh.data": 1}), None)
  from ifsq_jax import parallel  # pylint: disable=g-import-not-at-top
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  mesh = parallel.make_mesh(1, 8, 1)
  boxed = jax.eval_shape(trainer.init_state, jax.random.key(0))
  shard = parallel.logical_shardings(boxed, mesh, parallel.DEFAULT_RULES)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.meta.unbox(boxed), shard)
  step, state, data_state = ck.restore_latest(abstract)
  ck.close()
  assert step == 2 and data_state["next_step"] == 2
  assert state.params["mlp_in"]["kernel"].sharding.spec[0] == "fsdp"
  for a, b in zip(_leaves(saved.params), _leaves(state.params)):
    np.testing.assert_array_equal(a, b)


def test_init_from_takes_parameters_only(tmp_path):
  src = toy.train_and_evaluate(toy_config(**{"train.num_steps": 3}), tmp_path / "src")
  cfg = toy_config(**{"train.num_steps": 1, "checkpoint.init_from": str(tmp_path / "src")})
  cfg.optimizer.lr = 1e-12
  tuned = toy.train_and_evaluate(cfg, tmp_path / "dst")
  assert int(tuned.step) == 1
  for a, b in zip(_leaves(src.params), _leaves(tuned.params)):
    np.testing.assert_allclose(b, a, atol=1e-6)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    toy.train_and_evaluate(toy_config(**{"checkpoint.init_from": str(tmp_path / "nope")}), tmp_path / "x")


def test_workdir_holds_config_metrics_and_checkpoints(tmp_path):
  toy.train_and_evaluate(toy_config(), tmp_path)
  cfg = json.loads((tmp_path / "config.json").read_text())
  assert cfg["task"] == "toy" and cfg["train"]["num_steps"] == 6
  metrics = read_metrics(tmp_path)
  assert sorted(metrics) == [1, 2, 3, 4, 5, 6] and all(np.isfinite(m["loss"]) for m in metrics.values())
  assert metrics[6]["loss"] < metrics[1]["loss"]
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [3, 6]
  assert list((tmp_path / "images").glob("*.png"))
  assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_checkpoints_of_another_model_are_an_error_not_set_aside(tmp_path):
  toy.train_and_evaluate(toy_config(**{"train.num_steps": 2, "checkpoint.every": 2}), tmp_path)
  with pytest.raises(checkpoint.CheckpointMismatchError, match="holds a different train state"):
    toy.train_and_evaluate(toy_config(**{"train.num_steps": 4, "model.width": 8}), tmp_path)
  assert (tmp_path / "checkpoints" / "2").is_dir() and not list((tmp_path / "checkpoints").glob("*.corrupt*"))


def test_a_relative_work_dir_checkpoints_and_resumes(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  toy.train_and_evaluate(toy_config(**{"train.num_steps": 3}), "out/run", devices=jax.devices()[:1])
  assert (tmp_path / "out" / "run" / "checkpoints" / "3").is_dir()
  state = toy.train_and_evaluate(toy_config(**{"train.num_steps": 4}), "out/run", devices=jax.devices()[:1])
  assert int(state.step) == 4 and sorted(read_metrics(tmp_path / "out" / "run")) == [1, 2, 3, 4]
  params = checkpoint.restore_params("out/run", None)
  assert jax.tree.leaves(params)


def test_compile_only_prints_each_steps_memory_and_writes_nothing(tmp_path):
  import subprocess  # pylint: disable=g-import-not-at-top
  from conftest import main_command, subprocess_env  # pylint: disable=g-import-not-at-top
  work = tmp_path / "never_written"
  proc = subprocess.run(main_command(work, "--compile_only", "--config.data.image_size=16", "--config.model.width=16",
                                     "--config.mesh.fsdp=2"),
                        env=subprocess_env(8), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "mesh {'data': 4, 'fsdp': 2, 'tensor': 1} on 8 cpu devices" in proc.stdout
  assert "step kind | arguments | outputs | aliased | temporaries | peak" in proc.stdout
  row = [l for l in proc.stdout.splitlines() if l.startswith("train |")]
  assert row and float(row[0].split("|")[1].replace(",", "")) > 0  # the sharded state per device, in MiB
  assert not work.exists()


def test_every_step_kind_is_compiled_before_step_one_with_its_memory_logged(tmp_path, caplog):
  import logging  # pylint: disable=g-import-not-at-top
  with caplog.at_level(logging.INFO):
    toy.train_and_evaluate(toy_config(**{"train.num_steps": 2}), tmp_path)
  text = caplog.text
  assert "Compiled step 'train'" in text and "Compiled steps, per device:" in text
  assert text.index("Compiled steps, per device:") < text.index("step 1/2")
  memory = loop.compile_steps(toy.ToyTrainer, toy_config(), toy.default_config())
  assert [m.kind for m in memory] == ["train"] and memory[0].arguments > 0 and memory[0].aliased > 0


class _KeyProbe(toy.ToyTrainer):
  """Reports a number drawn from the key the loop hands each step."""

  def train_steps(self):
    inner = super().train_steps()["train"]

    def step(state, batch, key, frozen):
      new, metrics = inner(state, batch, key, frozen)
      return new, {**metrics, "draw": jax.random.uniform(key)}

    return {"train": step}


def test_the_loop_folds_the_step_into_the_key_once(tmp_path):
  cfg = toy_config(**{"train.num_steps": 3})
  loop.run(_KeyProbe, cfg, tmp_path, schema=toy.default_config())
  step_key = loop.step_key(cfg.seed)
  metrics = read_metrics(tmp_path)
  for step in (1, 2, 3):  # the record of step s comes from the step that started at state.step = s - 1
    np.testing.assert_allclose(metrics[step]["draw"], float(jax.random.uniform(jax.random.fold_in(step_key, step - 1))),
                               rtol=1e-6)


def test_nonfinite_guard_holds_one_state():
  """The guard decides before the update (lax.cond): its temporaries are the unguarded step's, where selecting
  between an updated and the old state after the update holds a second state."""
  cfg = toy_config(**{"model.width": 256, "model.mlp_width": 2048, "train.global_batch_size": 8})
  mesh = parallel.make_mesh(1, 1, 1, jax.devices()[:1])
  trainer = toy.ToyTrainer(cfg, mesh)
  _, abstract = loop.abstract_state(trainer, jax.random.key(0), mesh, cfg.mesh.rules)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in trainer.batch_shapes().items()}
  state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract))

  def unguarded(state, b, key):
    loss, _, grads = state_lib.accumulate_gradients(trainer.loss_fn, state.params, b, key, 1)
    return state_lib.apply_gradients(state, grads, trainer.tx, 0.9), loss

  def select_after(state, b, key):
    new, loss = unguarded(state, b, key)
    return jax.tree.map(lambda n, o: jnp.where(jnp.isfinite(loss), n, o), new, state), loss

  guarded = lambda s, b, k: trainer.train_steps()["train"](s, b, k, {})
  temp = {}
  for name, fn in (("guarded", guarded), ("unguarded", unguarded), ("select_after", select_after)):
    compiled = jax.jit(fn, donate_argnums=(0,)).lower(abstract, batch, jax.random.key(0)).compile()
    temp[name] = compiled.memory_analysis().temp_size_in_bytes
  assert temp["guarded"] <= temp["unguarded"] + 0.05 * state_bytes, temp
  assert temp["select_after"] >= temp["unguarded"] + 0.25 * state_bytes, temp


def test_constrain_maps_logical_names_inside_the_sharding_context():
  mesh = parallel.make_mesh(2, 4, 1)
  x = jnp.ones((8, 12, 16))
  fn = lambda a: parallel.constrain(a * 2, (parallel.BATCH, None, parallel.EMBED))
  with parallel.sharding_context(mesh, parallel.DEFAULT_RULES):
    y = jax.jit(fn)(x)
    text = jax.jit(fn).lower(x).as_text()
  assert tuple(y.sharding.spec) + (None,) * (3 - len(y.sharding.spec)) == (("data", "fsdp"), None, None)  # no fsdp left
  assert 'sharding_constraint' in text
  np.testing.assert_array_equal(np.asarray(y), 2.0)
  assert "sharding_constraint" not in jax.jit(fn).lower(x).as_text()  # outside a context: unchanged
  with pytest.raises(ValueError, match="2 axis names"):
    parallel.constrain(x, (parallel.BATCH, None))


class _SlowToy(toy.ToyTrainer):
  """The toy task with a step that takes 100 ms more (a model slower than its input)."""

  def train_steps(self):
    inner = super().train_steps()["train"]

    def step(state, batch, key, frozen):
      import time  # pylint: disable=g-import-not-at-top
      jax.debug.callback(lambda: time.sleep(0.1))
      return inner(state, batch, key, frozen)
    return {"train": step}


def test_data_wait_is_logged_and_small_when_the_pipeline_outruns_the_step(tmp_path):
  cfg = toy_config(**{"train.num_steps": 16, "train.log_every": 8, "checkpoint.every": 16, "data.workers": 1})
  loop.run(_SlowToy, cfg, tmp_path / "slow", schema=toy.default_config())
  m = read_metrics(tmp_path / "slow")
  assert m[8]["perf/data_wait_ms"] >= 0
  step = 16  # after the first interval (start-up): the batches wait on the devices
  assert m[step]["perf/step_ms"] > 100
  assert m[step]["perf/data_wait_ms"] < 0.02 * m[step]["perf/step_ms"], m[step]


def test_worker_processes_and_device_prefetch_train_like_one_thread(tmp_path):
  toy.train_and_evaluate(toy_config(**{"train.num_steps": 4, "data.device_prefetch": 0, "data.prefetch": 0}),
                         tmp_path / "thread")
  toy.train_and_evaluate(toy_config(**{"train.num_steps": 4, "data.workers": 2, "data.device_prefetch": 3}),
                         tmp_path / "workers")
  a, b = read_metrics(tmp_path / "thread"), read_metrics(tmp_path / "workers")
  for step in (1, 2, 3, 4):
    assert b[step]["loss"] == a[step]["loss"]

"""The converter engine: one table runs both ways, stacks scanned layers, and reports what does not map."""

import json
import logging

import numpy as np
import pytest

from ifsq_jax.convert import engine
from ifsq_jax.convert.engine import Entry
from ifsq_jax.models import loading, saved


def _table(depth=2):
  """A small model: a patch conv, `depth` blocks (a linear over 2 input axes and a norm) and a head."""
  entries = [*engine.conv("embed.proj", "embed"), Entry("pos", "pos")]
  for i in range(depth):
    entries += engine.linear(f"blocks.{i}.proj", f"blocks_{i}/proj", n_in=2)
    entries.append(Entry(f"blocks.{i}.norm.weight", f"blocks_{i}/norm/scale"))
  return entries + engine.linear("head", "head", bias=False)


def _expected(depth=2):
  shapes = {"embed/kernel": (2, 2, 3, 8), "embed/bias": (8,), "pos": (1, 4, 8), "head/kernel": (8, 5)}
  for i in range(depth):
    shapes.update({f"blocks_{i}/proj/kernel": (2, 4, 8), f"blocks_{i}/proj/bias": (8,),
                   f"blocks_{i}/norm/scale": (8,)})
  return {k: np.zeros(v, np.float32) for k, v in shapes.items()}


def _state_dict(depth=2, seed=0):
  rng = np.random.default_rng(seed)
  return {e.key: rng.normal(size=engine.torch_shape(e, _expected(depth)[e.path].shape)).astype(np.float32)
          for e in _table(depth)}


def test_state_dict_to_params_and_back_is_exact():
  sd = _state_dict()
  params = engine.to_params(sd, _table(), _expected())
  assert params["embed"]["kernel"].shape == (2, 2, 3, 8)
  np.testing.assert_array_equal(params["embed"]["kernel"], sd["embed.proj.weight"].transpose(2, 3, 1, 0))
  # (out, in) with in = 2 x 4: the kernel's first two axes are the inputs.
  np.testing.assert_array_equal(params["blocks_1"]["proj"]["kernel"].reshape(8, 8), sd["blocks.1.proj.weight"].T)
  back = engine.to_state_dict(params, _table())
  assert sorted(back) == sorted(sd)
  for key, value in sd.items():
    np.testing.assert_array_equal(back[key], value, err_msg=key)
    assert back[key].flags.c_contiguous


def test_params_to_state_dict_and_back_is_exact():
  rng = np.random.default_rng(1)
  params = saved.unflatten({k: rng.normal(size=v.shape).astype(np.float32) for k, v in _expected().items()})
  again = engine.to_params(engine.to_state_dict(params, _table()), _table(), _expected())
  for path, value in engine.flat(params).items():
    np.testing.assert_array_equal(engine.flat(again)[path], value, err_msg=path)


def test_scanned_layers_stack_on_a_leading_axis_and_unstack_back():
  params = engine.to_params(_state_dict(depth=3), _table(3), _expected(3))
  scanned = engine.stack(params, ("blocks",))
  assert not any(k.startswith("blocks_") for k in scanned)
  assert scanned["blocks"]["proj"]["kernel"].shape == (3, 2, 4, 8)
  np.testing.assert_array_equal(scanned["blocks"]["norm"]["scale"][2], params["blocks_2"]["norm"]["scale"])
  assert scanned["head"] is params["head"]
  unscanned = engine.unstack(scanned, ("blocks",))
  assert engine.flat(unscanned).keys() == engine.flat(params).keys()
  for path, value in engine.flat(params).items():
    np.testing.assert_array_equal(engine.flat(unscanned)[path], value, err_msg=path)
  with pytest.raises(ValueError, match="blocks_0 ... blocks_2 cannot be stacked"):
    engine.stack({k: v for k, v in params.items() if k != "blocks_1"} | {"blocks_2": params["blocks_2"]}, ("blocks",))


def test_report_names_missing_parameters_and_unexpected_entries_together():
  sd = _state_dict()
  del sd["blocks.1.norm.weight"]
  sd["blocks.1.extra.weight"] = np.ones(2, np.float32)
  with pytest.raises(engine.ConversionError) as info:
    engine.to_params(sd, _table(), _expected(), lambda: _expected())
  message = str(info.value)
  assert "blocks.1.norm.weight -> blocks_1/norm/scale" in message
  assert "1 checkpoint entries are not mapped: ['blocks.1.extra.weight']" in message
  assert "--allow_partial" in message


def test_partial_conversion_keeps_initial_values_and_lists_what_it_dropped(caplog):
  sd = _state_dict()
  del sd["blocks.1.norm.weight"]
  sd["blocks.1.extra.weight"] = np.ones(2, np.float32)
  sd["buffer.ignored"] = np.ones(2, np.float32)
  initial = {k: np.full(v.shape, 7.0, np.float32) for k, v in _expected().items()}
  dropped = engine.Dropped()
  with caplog.at_level(logging.WARNING):
    params = engine.to_params(sd, _table(), _expected(), lambda: initial, allow_partial=True, dropped=dropped,
                              ignore=("buffer.",))
  assert dropped.unmapped == ["blocks.1.extra.weight"] and dropped.left_at_init == ["blocks_1/norm/scale"]
  assert dropped.summary().startswith("partial: 1 checkpoint entries dropped, 1 parameters")
  np.testing.assert_array_equal(params["blocks_1"]["norm"]["scale"], 7.0)
  logged = "\n".join(r.getMessage() for r in caplog.records)
  assert "blocks.1.extra.weight" in logged and "blocks_1/norm/scale" in logged and "buffer.ignored" not in logged


def test_without_initial_values_a_missing_parameter_is_refused_even_when_partial():
  sd = _state_dict()
  del sd["head.weight"]
  with pytest.raises(engine.ConversionError, match="head.weight -> head/kernel.*holds all of its parameters"):
    engine.to_params(sd, _table(), allow_partial=True)
  params = engine.to_params(_state_dict(), _table())  # shapes from the checkpoint: the natural layouts
  assert params["head"]["kernel"].shape == (8, 5) and params["blocks_0"]["proj"]["kernel"].shape == (8, 8)


def test_an_entry_of_another_shape_names_key_path_and_both_shapes():
  sd = _state_dict()
  sd["pos"] = np.zeros((1, 5, 8), np.float32)
  with pytest.raises(engine.ConversionError, match=r"pos: checkpoint shape \(1, 5, 8\), but pos of this toy needs "
                                                   r"\(1, 4, 8\); check the grid"):
    engine.to_params(sd, _table(), _expected(), model="toy", hint="check the grid")
  with pytest.raises(ValueError, match="kind='transpose' is not valid"):
    Entry("a", "a", "transpose")


def test_load_model_names_an_unknown_converted_kind_and_the_valid_ones(tmp_path):
  saved.save(tmp_path / "tok", {"w": np.zeros(2, np.float32)}, {"kind": "tokenizer", "model": {}})
  assert saved.exists(tmp_path / "tok") and not loading.is_converted(str(tmp_path / "tok"))
  with pytest.raises(ValueError, match=r"kind='tokenizer'.*\['dit', 'llamagen'\]"):
    loading.load_model(str(tmp_path / "tok"))
  (tmp_path / "tok" / "config.json").write_text(json.dumps({"kind": "llamagen", "model": {}}))
  assert loading.is_converted(str(tmp_path / "tok"))

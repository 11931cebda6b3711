"""Converters with --allow_partial list every dropped checkpoint entry and every parameter left at init."""

import json
import logging

import flax.linen as nn
import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

from conftest import GOLDEN
from ifsq_jax.convert import __main__ as convert_main
from ifsq_jax.convert import inception, tokenizer, torch_io
from ifsq_jax.models.tokenizer import Tokenizer
from test_tokenizer_model import SMALL_REF


@pytest.fixture
def partial_tokenizer(tmp_path):
  g = np.load(GOLDEN / "tokenizer_small.npz")
  sd = {k[3:]: g[k] for k in g.files if k.startswith("sd/")}
  del sd["decoder.conv_out.bias"]  # left at init
  sd["encoder.extra.weight"] = np.ones((3, 3), np.float32)  # maps to no model parameter
  sd["encoder.mid.block_1.odd"] = np.ones((3,), np.float32)  # maps to nothing at all
  path = tmp_path / "partial.safetensors"
  save_file(sd, str(path))
  (tmp_path / "run.json").write_text(json.dumps(SMALL_REF))
  return sd, path


def _run(path, out, *flags):
  return convert_main.main(["tokenizer", "--checkpoint", str(path), "--config", str(path.parent / "run.json"),
                            "--out", str(out), *flags])


def test_tokenizer_partial_conversion_lists_what_it_dropped(partial_tokenizer, tmp_path, capsys, caplog):
  sd, path = partial_tokenizer
  assert _run(path, tmp_path / "refused") == 1
  err = capsys.readouterr().err
  assert "decoder/conv_out/bias" in err and "--allow_partial" in err
  with caplog.at_level(logging.WARNING):
    assert _run(path, tmp_path / "out", "--allow_partial") == 0
  out = capsys.readouterr().out
  assert "partial: 2 checkpoint entries dropped, 1 parameters left at their initial values" in out
  logged = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
  for name in ("encoder.extra.weight", "encoder.mid.block_1.odd", "decoder/conv_out/bias"):
    assert name in logged, name
  cfg, variables = tokenizer.load(str(tmp_path / "out"))
  params = variables["params"]
  init = nn.meta.unbox(Tokenizer(cfg).init(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32)))["params"]
  np.testing.assert_array_equal(params["decoder"]["conv_out"]["bias"], init["decoder"]["conv_out"]["bias"])
  np.testing.assert_array_equal(params["encoder"]["conv_in"]["kernel"], sd["encoder.conv_in.weight"].transpose(2, 3, 1, 0))


def test_inception_partial_conversion_keeps_initial_values_and_lists_them(caplog):
  torch_name = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
  sd = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(inception._expected())[0]:  # pylint: disable=protected-access
    names = [p.key for p in path][1:]
    shape = leaf.shape if names[-1] != "kernel" else tuple(leaf.shape[i] for i in (3, 2, 0, 1))
    sd[".".join(names[:-1] + [torch_name[names[-1]]])] = np.full(shape, 0.5, np.float32)
  del sd["Conv2d_1a_3x3.bn.running_var"]
  sd["bogus.weight"] = np.ones((2,), np.float32)
  with pytest.raises(torch_io.ConversionError, match="Conv2d_1a_3x3.bn.running_var"):
    inception.convert(sd)
  dropped = torch_io.Dropped()
  with caplog.at_level(logging.WARNING):
    out = inception.convert(sd, allow_partial=True, dropped=dropped)
  assert dropped.unmapped == ["bogus.weight"] and dropped.left_at_init == ["batch_stats/Conv2d_1a_3x3/bn/var"]
  logged = "\n".join(r.getMessage() for r in caplog.records)
  assert "bogus.weight" in logged and "batch_stats/Conv2d_1a_3x3/bn/var" in logged
  np.testing.assert_array_equal(out["batch_stats"]["Conv2d_1a_3x3"]["bn"]["var"], 1.0)  # BatchNorm's initial var
  np.testing.assert_array_equal(out["batch_stats"]["Conv2d_1a_3x3"]["bn"]["mean"], 0.5)

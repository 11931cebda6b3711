"""Config validation: every mistake is one ConfigError naming the key and what is valid."""

import json
import subprocess

import ml_collections
import pytest

from conftest import TOY_CONFIG, subprocess_env, toy_config
from ifsq_jax import config_lib, parallel
from ifsq_jax.train import registry, toy


def _validate(config, devices=8, processes=1):
  config_lib.validate(config, toy.default_config(), devices, processes)
  toy.ToyTrainer.validate(config)  # the task's own fields (here the image data)


def test_default_toy_config_is_valid():
  _validate(toy_config())


def test_misspelled_key_gets_a_suggestion():
  c = toy_config()
  c.train.unlock()
  c.train.lerning_rate = 0.1
  with pytest.raises(config_lib.ConfigError, match=r"Unknown key config.train.lerning_rate.*"):
    _validate(c)
  c = toy_config()
  c.unlock()
  c.optimiser = {"lr": 1.0}
  with pytest.raises(config_lib.ConfigError, match="Did you mean config.optimizer"):
    _validate(c)


def test_wrong_type_names_key_and_expected_type():
  c = toy_config()
  c.data.unlock()
  del c.data["image_size"]
  c.data.image_size = "32"
  with pytest.raises(config_lib.ConfigError, match=r"config.data.image_size must be of type int .* got str '32'"):
    _validate(c)


@pytest.mark.parametrize("overrides,devices,message", [
    ({"train.global_batch_size": 12}, 8, "does not divide over the 8 devices"),
    ({"train.global_batch_size": 16, "train.grad_accum_steps": 3}, 8, "must divide into"),
    ({"train.global_batch_size": 16, "train.grad_accum_steps": 4}, 8, r"micro-batch 4\) does not divide"),
    ({"mesh.data": 3}, 8, "has 3 devices but there are 8"),
    ({"mesh.data": -1, "mesh.fsdp": 3}, 8, "needs a multiple of 3 devices"),
    ({"mesh.data": -1, "mesh.fsdp": -1}, 8, "at most one may be -1"),
    ({"mesh.rules": (("embed", "model"),)}, 8, "names mesh axes"),
    ({"optimizer.schedule": "linear"}, 8, "schedule='linear'"),
    ({"train.ema_decay": 1.0}, 8, "ema_decay=1.0 must be in"),
    ({"data.name": "imagenet"}, 8, "use one of"),
])
def test_invalid_values(overrides, devices, message):
  with pytest.raises(config_lib.ConfigError, match=message):
    _validate(toy_config(**overrides), devices)


def test_batch_must_divide_over_processes():
  with pytest.raises(config_lib.ConfigError, match="over 3 processes"):
    _validate(toy_config(**{"train.global_batch_size": 16, "mesh.data": 1, "mesh.fsdp": 1}), devices=1, processes=3)


def test_unknown_task_lists_the_known_ones():
  with pytest.raises(config_lib.ConfigError, match=r"config.task='tokenzer' is not a known task; use one of \['dit', 'llamagen', 'tokenizer', 'toy'\]"):
    registry.get("tokenzer")


def test_mesh_shape_fills_the_free_axis():
  assert parallel.mesh_shape(-1, 2, 1, 8) == {"data": 4, "fsdp": 2, "tensor": 1}
  assert parallel.mesh_shape(1, -1, 2, 8) == {"data": 1, "fsdp": 4, "tensor": 2}


def test_config_variant_and_command_line_override(tmp_path):
  import importlib.util  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("toy_cfg", TOY_CONFIG)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  assert mod.get_config("long").train.num_steps == 2000
  with pytest.raises(ValueError, match="unknown config variant 'short' in 'short'; valid variants: long"):
    mod.get_config("short")
  proc = subprocess.run(
      [sys.executable, "-c", "from absl import flags; from ml_collections import config_flags; import sys;"
       "config_flags.DEFINE_config_file('config'); flags.FLAGS(sys.argv);"
       "print(flags.FLAGS.config.train.num_steps, flags.FLAGS.config.optimizer.lr)",
       f"--config={TOY_CONFIG}:long", "--config.optimizer.lr=0.5"],
      env=subprocess_env(1), capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.split() == ["2000", "0.5"]


def test_paper_tokenizer_config_variants():
  import importlib.util  # pylint: disable=g-import-not-at-top
  from conftest import REPO  # pylint: disable=g-import-not-at-top
  from ifsq_jax.train import tokenizer  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("paper_cfg", REPO / "configs" / "ifsq_f16_d4.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config()
  assert c.model.levels == (17, 17, 17, 17) and c.model.bottleneck == "ifsq" and c.train.global_batch_size == 128
  assert c.loss.disc_start == 50_000 and c.checkpoint.every == 5000 and c.data.tfds_name == "imagenet2012"
  assert tokenizer.model_config(c) == tokenizer.TokenizerConfig()
  assert mod.get_config("bits=2,bound=fsq").model.levels == (5, 5, 5, 5)
  assert mod.get_config("bits=2,bound=fsq").model.bottleneck == "fsq"
  assert mod.get_config("bottleneck=vq").model.bottleneck == "vq"
  config_lib.validate(mod.get_config("tiny"), tokenizer.default_config(), 8)
  with pytest.raises(ValueError, match="bits=9"):
    mod.get_config("bits=9")
  with pytest.raises(ValueError, match="unknown config variant 'bitz'.*valid variants: bits=4, bound='ifsq'"):
    mod.get_config("bitz=3")


def test_parse_variant_types_flags_and_errors():
  v = config_lib.parse_variant("bits=3, tiny ,scale=0.5,name=x", bits=4, tiny=False, scale=1.0, name="y")
  assert (v.bits, v.tiny, v.scale, v.name) == (3, True, 0.5, "x")
  assert config_lib.parse_variant(None, bits=4).bits == 4
  assert config_lib.parse_variant("tiny=false", tiny=True).tiny is False
  with pytest.raises(config_lib.ConfigError, match="bits='x' must be a int"):
    config_lib.parse_variant("bits=x", bits=4)
  with pytest.raises(config_lib.ConfigError, match="needs a value"):
    config_lib.parse_variant("bits", bits=4)
  with pytest.raises(config_lib.ConfigError, match="unknown config variant 'long'.*valid variants: none"):
    config_lib.parse_variant("long")


def test_model_config_round_trips_through_its_dataclass():
  from ifsq_jax.models.tokenizer import TokenizerConfig  # pylint: disable=g-import-not-at-top
  cfg = TokenizerConfig(levels=(5, 5, 5, 5), group_sizes=(2, 2), hidden_size_mult=(1, 2), downsample=(True, False),
                        upsample=(False, True))
  group = config_lib.from_dataclass(cfg, exclude=("resolution",))
  assert "resolution" not in group and group.levels == (5, 5, 5, 5) and isinstance(group.hidden_size_mult, tuple)
  group = ml_collections.ConfigDict(json.loads(json.dumps(group.to_dict())))  # as config.json stores it: lists
  assert config_lib.to_dataclass(TokenizerConfig, group, resolution=256) == cfg
  del group["double_z"]  # a field a saved config lacks keeps its default
  assert config_lib.to_dataclass(TokenizerConfig, group, resolution=256) == cfg
  group.unknown = 1
  with pytest.raises(config_lib.ConfigError, match=r"TokenizerConfig has no fields \['unknown'\]"):
    config_lib.to_dataclass(TokenizerConfig, group)


def test_the_transform_names_a_config_accepts_are_the_transforms_the_pipeline_has():
  from ifsq_jax.data import transforms  # pylint: disable=g-import-not-at-top
  assert tuple(transforms.TRANSFORMS) == config_lib.TRANSFORM_NAMES

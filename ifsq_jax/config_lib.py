"""Shared configuration: the fields every task has, and validation before any compile.

A config file in ``configs/`` is a runnable recipe: ``get_config(arg=None)`` starts
from :func:`base_config` (plus its task's fields) and returns an
``ml_collections.ConfigDict``. ``main`` validates it against the task's schema,
the task's own ``default_config()``, so a misspelled key, a wrong type, a batch
that does not divide over the devices or a mesh that does not match them is one
clear error before anything is compiled.

Contract fields: ``task``, ``seed``, ``train.num_steps``, ``train.log_every``,
``checkpoint.every``, ``data.name``.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from typing import Any, TypeVar

import ml_collections

from ifsq_jax import parallel

DATASETS = ("embedded", "image_folder", "idx", "tfds")
# The per-example transforms of image tasks (ifsq_jax.data.transforms.TRANSFORMS maps exactly these names).
TRANSFORM_NAMES = ("resize_crop_flip", "adm_random_crop", "adm_random_crop_flip", "center_crop")
SCHEDULES = ("constant", "warmup_cosine")
DECAY_MASKS = ("all", "matrices")
PLATFORMS = ("", "cpu", "gpu", "tpu")  # config.mesh.platform; "": whatever devices JAX has
# How to get JAX to see a platform's devices, for the error of a run that asked for them.
_PLATFORM_HINTS = {
    "gpu": ('install JAX for CUDA 12 with pip install -e ".[cuda]", and check that nvidia-smi lists the GPUs and '
            "that CUDA_VISIBLE_DEVICES (if set) names them"),
    "tpu": 'run on a Cloud TPU VM with JAX for TPU installed: pip install -e ".[tpu]"',
    "cpu": "set JAX_PLATFORMS=cpu to run on the CPU",
}


class ConfigError(ValueError):
  """An invalid configuration; the message names the key and what is valid."""


T = TypeVar("T")


def _config_value(value: Any) -> Any:
  """A dataclass field value as a config holds it: sequences become tuples (overridable from the command line)."""
  if isinstance(value, (list, tuple)):
    return tuple(_config_value(v) for v in value)
  return value


def from_dataclass(obj: Any, exclude: tuple[str, ...] = ()) -> ml_collections.ConfigDict:
  """A ConfigDict with one field per dataclass field of ``obj`` (``None`` becomes ``()`` for sequences).

  Args:
    obj: A dataclass instance (a model's architecture).
    exclude: Fields left out (those the task sets from elsewhere, e.g. the image size).
  """
  c = ml_collections.ConfigDict()
  for f in dataclasses.fields(obj):
    if f.name not in exclude:
      value = getattr(obj, f.name)
      c[f.name] = () if value is None and "tuple" in str(f.type) else _config_value(value)
  return c


def to_dataclass(cls: type[T], group: ml_collections.ConfigDict | dict[str, Any], **overrides: Any) -> T:
  """``cls(**group, **overrides)``: lists become tuples; keys ``cls`` lacks are a ConfigError naming them.

  Fields missing from ``group`` keep their defaults (configs saved by older versions load).
  """
  names = {f.name for f in dataclasses.fields(cls)}
  values = dict(group.items()) if not isinstance(group, dict) else dict(group)
  unknown = sorted(set(values) - names)
  if unknown:
    raise ConfigError(f"{cls.__name__} has no fields {unknown}; its fields are {sorted(names)}.")
  values = {k: _config_value(v.to_dict() if isinstance(v, ml_collections.ConfigDict) else v)
            for k, v in values.items()}
  values.update(overrides)
  return cls(**values)


def parse_variant(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses a config file's variant string, as big_vision's ``parse_arg``.

  ``parse_variant("bits=3,tiny", bits=4, bound="ifsq", tiny=False)`` gives
  ``bits=3, bound="ifsq", tiny=True``: ``key=value`` pairs separated by commas,
  each value converted to the type of its default (a bare ``flag`` sets a bool
  default to True). An unknown key or a value of the wrong type is a ConfigError
  listing the valid keys.

  Args:
    arg: What follows ``:`` in ``--config=configs/x.py:ARG`` (None or "" for none).
    **defaults: Every valid key with its default value.
  """
  out = ml_collections.ConfigDict(defaults)
  for item in (arg or "").split(","):
    item = item.strip()
    if not item:
      continue
    key, has_value, text = item.partition("=")
    key = key.strip()
    if key not in defaults:
      valid = ", ".join(f"{k}={v!r}" if not isinstance(v, bool) else k for k, v in defaults.items())
      raise ConfigError(f"unknown config variant {key!r} in {arg!r}; valid variants: {valid or 'none'}.")
    default = defaults[key]
    if isinstance(default, bool):
      if not has_value:
        out[key] = True
        continue
      if text.lower() not in ("true", "false", "1", "0"):
        raise ConfigError(f"config variant {key}={text!r} must be true or false.")
      out[key] = text.lower() in ("true", "1")
    elif not has_value:
      raise ConfigError(f"config variant {key!r} needs a value ({key}=..., default {default!r}).")
    elif isinstance(default, (int, float)):
      try:
        out[key] = type(default)(text)
      except ValueError:
        raise ConfigError(f"config variant {key}={text!r} must be a {type(default).__name__}.") from None
    else:
      out[key] = text
  return out


def base_config() -> ml_collections.ConfigDict:
  """The fields shared by every task, with their defaults."""
  c = ml_collections.ConfigDict()
  c.task = ""
  c.seed = 0

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # -1: all devices not used by the other axes
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  c.mesh.slices = 1  # TPU slices (multislice): the data axis is split over them (parallel.make_mesh)
  c.mesh.rules = parallel.DEFAULT_RULES
  # The devices the run must get: "gpu", "tpu" or "cpu" (the launch scripts set it), "" any. A GPU host where JAX
  # finds no GPU (JAX without the cuda extra, a hidden GPU) then stops with an error instead of training on the CPU.
  c.mesh.platform = ""

  c.train = ml_collections.ConfigDict()
  c.train.num_steps = 1000
  c.train.global_batch_size = 16
  c.train.grad_accum_steps = 1  # micro-batches per step; the global batch is split among them
  c.train.log_every = 10
  c.train.eval_every = 0  # 0: only at the end
  c.train.image_every = 0  # 0: only at the end
  c.train.eval_at_start = False  # also evaluate and write images before the first step of a fresh run
  c.train.ema_decay = 0.999
  c.train.max_nonfinite_steps = 10  # stop after this many non-finite steps in a row
  c.train.compute_dtype = "float32"
  # Stop before step 1 when a compiled step's peak exceeds a device's memory (on CPU: the host's available memory
  # shared by its devices). False: try anyway.
  c.train.check_memory = True

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.lr = 1e-4
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999
  c.optimizer.eps = 1e-8
  c.optimizer.weight_decay = 0.0
  c.optimizer.decay_mask = "all"  # "all" parameters, or "matrices" (rank >= 2, not norm scales or biases)
  c.optimizer.grad_clip_norm = 1.0  # 0: no clipping
  c.optimizer.schedule = "constant"
  c.optimizer.warmup_steps = 0
  c.optimizer.min_lr_ratio = 0.0  # final lr / peak lr of the cosine schedule

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every = 1000
  c.checkpoint.keep = 3
  c.checkpoint.async_save = True
  c.checkpoint.init_from = ""  # a checkpoint directory to take parameters from (fine-tuning)

  c.data = ml_collections.ConfigDict()
  c.data.name = "embedded"  # each task lists its datasets (image tasks: IMAGE_DATASETS)
  c.data.train_split = "train"
  c.data.eval_split = "validation"
  c.data.workers = 0  # processes that decode and crop training examples (0: a thread of the loop; -1: CPUs - 1)
  c.data.prefetch = 2  # host batches in the works ahead of the step
  c.data.device_prefetch = 2  # batches placed on the devices ahead of the step (0: placed when the step needs it)
  return c


def add_image_data(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Adds the fields of tasks that read images (``config.data.*``); returns ``c``."""
  d = c.data
  d.name = "embedded"  # "embedded" | "image_folder" | "idx" (MNIST/Fashion-MNIST files) | "tfds"
  d.tfds_name = "imagenet2012"
  d.path = ""  # image folder root (one subfolder per class)
  d.data_dir = ""  # tfds data_dir
  d.manual_dir = ""  # tfds manual_dir (e.g. the ImageNet tar files)
  d.image_size = 32
  d.transform = "resize_crop_flip"  # one of TRANSFORM_NAMES (ifsq_jax.data.transforms)
  d.eval_examples = 64
  return c


def validate_image_data(config: ml_collections.ConfigDict) -> None:
  """Checks the fields :func:`add_image_data` adds."""
  d = config.data
  _require(d.name in DATASETS, f"config.data.name={d.name!r} is not a known dataset; use one of {DATASETS}.")
  _require(d.image_size >= 8, f"config.data.image_size={d.image_size} must be >= 8.")
  _require(d.eval_examples >= 1, f"config.data.eval_examples={d.eval_examples} must be >= 1.")
  _require(d.transform in TRANSFORM_NAMES, f"config.data.transform={d.transform!r} must be one of {TRANSFORM_NAMES}.")
  _require(d.name != "image_folder" or bool(d.path),
           "config.data.path must name the image folder root when config.data.name='image_folder'.")
  _require(d.name != "idx" or bool(d.path),
           "config.data.path must name the directory of the IDX files when config.data.name='idx'.")
  if d.name == "tfds":
    _check_tfds(d)


def _check_tfds(d: ml_collections.ConfigDict) -> None:
  """A tfds dataset must be prepared in ``data_dir`` or come with a ``manual_dir`` (skipped when only compiling)."""
  from ifsq_jax import shapes_only  # pylint: disable=g-import-not-at-top
  if shapes_only.active() or d.manual_dir:
    return
  if str(d.data_dir).startswith("gs://"):
    return  # refused with its remedies where the data source is built
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    prepared = tfds.builder(d.tfds_name, data_dir=d.data_dir or None, file_format="array_record").is_prepared()
  except tfds.core.registered.DatasetNotFoundError:
    raise ConfigError(f"config.data.tfds_name={d.tfds_name!r} is not a dataset tensorflow-datasets knows.") from None
  _require(prepared,
           f"config.data.name='tfds' reads {d.tfds_name!r}, which is not prepared (array_record) in "
           f"config.data.data_dir={d.data_dir or '~/tensorflow_datasets'!r}, and config.data.manual_dir is empty. Set "
           "config.data.data_dir to a prepared copy, or config.data.manual_dir to the downloaded files (imagenet2012: "
           "the folder with ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar; process 0 prepares it), or "
           "train on an image folder: config.data.name='image_folder' config.data.path=DIR.")


def value_at(config: ml_collections.ConfigDict, key: str) -> Any:
  """The value of the dotted ``key`` (``"model.levels"``) of ``config``."""
  node = config
  for part in key.split("."):
    node = node[part]
  return node


def require_choice(config: ml_collections.ConfigDict, key: str, choices: tuple[Any, ...]) -> None:
  """ConfigError unless the dotted ``key`` of ``config`` is one of ``choices``."""
  node = value_at(config, key)
  _require(node in choices, f"config.{key}={node!r} is not valid; use one of {choices}.")


def _range_text(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
  num = lambda x: str(x) if isinstance(x, int) else f"{x:g}"
  if low is not None and high is not None:
    return f"in {'(' if low_open else '['}{num(low)}, {num(high)}{')' if high_open else ']'}"
  if low is not None:
    return f"{'>' if low_open else '>='} {num(low)}"
  return f"{'<' if high_open else '<='} {num(high)}"


def require_range(config: ml_collections.ConfigDict, key: str, low: float | None = None, high: float | None = None,
                  *, low_open: bool = False, high_open: bool = False, note: str = "") -> None:
  """ConfigError unless the number at the dotted ``key`` (or each number of a tuple there) lies in the range.

  Args:
    config: The run's config.
    key: A dotted key, e.g. ``"transport.sigma"``.
    low: The least valid value (None: unbounded below); excluded with ``low_open``.
    high: The greatest valid value (None: unbounded above); excluded with ``high_open``.
    note: What a special value means, appended in parentheses (``"0: off"``).
  """
  value = value_at(config, key)
  values = tuple(value) if isinstance(value, (tuple, list)) else (value,)

  def ok(v):
    above = low is None or (v > low if low_open else v >= low)
    return above and (high is None or (v < high if high_open else v <= high))

  if not all(ok(v) for v in values):
    each = "hold values " if isinstance(value, (tuple, list)) else "be "
    value = tuple(value) if isinstance(value, list) else value
    extra = f" ({note})" if note else ""
    raise ConfigError(f"config.{key}={value!r} must {each}{_range_text(low, high, low_open, high_open)}{extra}.")


def _type_name(value: Any) -> str:
  return type(value).__name__


def _compatible(value: Any, default: Any) -> bool:
  if isinstance(default, bool) or isinstance(value, bool):
    return isinstance(value, bool) and isinstance(default, bool)
  if isinstance(default, float):
    return isinstance(value, (int, float))
  if isinstance(default, int):
    return isinstance(value, int)
  if isinstance(default, (tuple, list)):
    return isinstance(value, (tuple, list))
  if default is None or value is None:
    return True
  return isinstance(value, type(default))


def check_against_schema(config: ml_collections.ConfigDict, schema: ml_collections.ConfigDict,
                         prefix: str = "config") -> None:
  """Raises ConfigError for a key the schema lacks or a value of the wrong type."""
  for key in config.keys():
    name = f"{prefix}.{key}"
    if key not in schema:
      near = difflib.get_close_matches(key, list(schema.keys()), n=1)
      hint = f" Did you mean {prefix}.{near[0]}?" if near else ""
      raise ConfigError(f"Unknown key {name}.{hint} Valid keys here: {', '.join(sorted(schema.keys()))}.")
    value, default = config[key], schema[key]
    if isinstance(default, ml_collections.ConfigDict):
      if not isinstance(value, ml_collections.ConfigDict):
        raise ConfigError(f"{name} must be a group of fields ({', '.join(sorted(default.keys()))}), "
                          f"got {_type_name(value)} {value!r}.")
      check_against_schema(value, default, name)
    elif not _compatible(value, default):
      raise ConfigError(f"{name} must be of type {_type_name(default)} (like its default {default!r}), "
                        f"got {_type_name(value)} {value!r}.")


def _require(cond: bool, message: str) -> None:
  if not cond:
    raise ConfigError(message)


def check_platform(wanted: str, platform: str | None) -> None:
  """ConfigError unless ``wanted`` (``config.mesh.platform``) is valid and, if given, ``platform``.

  Args:
    wanted: The platform the config asks for ("" for any).
    platform: The platform of the run's devices (``jax.Device.platform``: "cpu", "gpu", "tpu"); None: not known
      here, only ``wanted`` itself is checked.
  """
  _require(wanted in PLATFORMS,
           f"config.mesh.platform={wanted!r} is not valid; use one of {PLATFORMS} ('' runs on any devices).")
  if wanted and platform is not None and platform != wanted:
    raise ConfigError(f"config.mesh.platform={wanted!r}, but JAX sees only {platform} devices: "
                      f"{_PLATFORM_HINTS[wanted]}. (config.mesh.platform='' runs on whatever devices JAX has.)")


def check_attention_impl(config: ml_collections.ConfigDict, platform: str | None) -> None:
  """ConfigError for ``config.model.attention_impl='cudnn'`` off a GPU or without a 16-bit compute dtype.

  cuDNN's flash attention (``jax.nn.dot_product_attention(implementation="cudnn")``) runs only on NVIDIA GPUs
  and only in bfloat16 or float16; otherwise it fails when the step is first traced.

  Args:
    config: The run's config (a task without ``model.attention_impl`` passes).
    platform: The platform of the run's devices; None: not known here (``config.mesh.platform`` stands in).
  """
  model = config.get("model")
  if model is None or model.get("attention_impl") != "cudnn":
    return
  where = platform or config.mesh.get("platform", "") or None
  dtype = config.train.compute_dtype
  if (where is not None and where != "gpu") or dtype not in ("bfloat16", "float16"):
    raise ConfigError(f"config.model.attention_impl='cudnn' runs only on GPUs in bfloat16 or float16, but this run has "
                      f"{where or 'unknown'} devices and config.train.compute_dtype={dtype!r}; use "
                      "config.model.attention_impl='xla' (or a GPU with config.train.compute_dtype='bfloat16').")


def validate(config: ml_collections.ConfigDict, schema: ml_collections.ConfigDict,
             device_count: int, process_count: int = 1, platform: str | None = None) -> None:
  """Checks a config before any compile; raises one ConfigError naming the key.

  Args:
    config: The run's config.
    schema: The task's ``default_config()`` (all valid keys with their types).
    device_count: Global number of devices.
    process_count: Number of processes (hosts).
    platform: The platform of the run's devices ("cpu", "gpu", "tpu"), checked against ``config.mesh.platform``;
      None: not checked.
  """
  check_against_schema(config, schema)
  t, o, m = config.train, config.optimizer, config.mesh
  # First: on a host without the devices asked for, the device count would make the other checks misleading.
  check_platform(m.get("platform", ""), platform)
  # The data pipeline seeds numpy with it (no negative seeds); evaluation draws with seed + 1 and + 2.
  require_range(config, "seed", 0, 2**62, high_open=True)
  for key in ("num_steps", "global_batch_size", "grad_accum_steps", "log_every"):
    _require(t[key] >= 1, f"config.train.{key}={t[key]} must be >= 1.")
  for key in ("eval_every", "image_every"):
    _require(t[key] >= 0, f"config.train.{key}={t[key]} must be >= 0 (0: only at the end).")
  _require(t.max_nonfinite_steps >= 1, f"config.train.max_nonfinite_steps={t.max_nonfinite_steps} must be >= 1.")
  _require(0.0 <= t.ema_decay < 1.0, f"config.train.ema_decay={t.ema_decay} must be in [0, 1).")
  _require(t.compute_dtype in ("float32", "bfloat16"),
           f"config.train.compute_dtype={t.compute_dtype!r} must be 'float32' or 'bfloat16'.")
  _require(config.checkpoint.every >= 1, f"config.checkpoint.every={config.checkpoint.every} must be >= 1.")
  _require(config.checkpoint.keep >= 1, f"config.checkpoint.keep={config.checkpoint.keep} must be >= 1.")
  d = config.data
  _require(d.get("workers", 0) >= -1,
           f"config.data.workers={d.get('workers')} must be >= 0 (0: a thread of the loop) or -1 (CPUs - 1).")
  for key in ("prefetch", "device_prefetch"):
    _require(d.get(key, 0) >= 0, f"config.data.{key}={d.get(key)} must be >= 0.")
  _require(o.lr > 0, f"config.optimizer.lr={o.lr} must be > 0.")
  _require(o.schedule in SCHEDULES, f"config.optimizer.schedule={o.schedule!r} must be one of {SCHEDULES}.")
  _require(o.decay_mask in DECAY_MASKS, f"config.optimizer.decay_mask={o.decay_mask!r} must be one of {DECAY_MASKS}.")
  _require(o.grad_clip_norm >= 0, f"config.optimizer.grad_clip_norm={o.grad_clip_norm} must be >= 0 (0: off).")
  for key in ("b1", "b2"):
    require_range(config, f"optimizer.{key}", 0, 1, high_open=True)
  require_range(config, "optimizer.eps", 0, low_open=True)  # Adam divides by sqrt(v) + eps
  require_range(config, "optimizer.weight_decay", 0)
  require_range(config, "optimizer.warmup_steps", 0, note="0: no warmup")
  require_range(config, "optimizer.min_lr_ratio", 0, 1)
  check_attention_impl(config, platform)

  try:
    shape = parallel.mesh_shape(m.data, m.fsdp, m.tensor, device_count)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  _require(m.slices >= 1 and shape["data"] % m.slices == 0,
           f"config.mesh.slices={m.slices} must be >= 1 and divide the data axis ({shape['data']} of mesh {shape}).")
  batch_devices = shape["data"] * shape["fsdp"]
  _require(t.global_batch_size % t.grad_accum_steps == 0,
           f"config.train.global_batch_size={t.global_batch_size} must divide into "
           f"config.train.grad_accum_steps={t.grad_accum_steps} micro-batches.")
  micro = t.global_batch_size // t.grad_accum_steps
  _require(micro % batch_devices == 0,
           f"config.train.global_batch_size={t.global_batch_size} (micro-batch {micro}) does not divide over the "
           f"{batch_devices} devices of the mesh's data x fsdp axes {shape}; use a multiple of {batch_devices}.")
  _require(t.global_batch_size % process_count == 0,
           f"config.train.global_batch_size={t.global_batch_size} does not divide over {process_count} processes.")
  try:
    parallel.parse_rules(m.rules)
  except ValueError as e:
    raise ConfigError(f"config.mesh.rules: {e}") from None


def to_json(config: ml_collections.ConfigDict) -> str:
  """The resolved config as JSON (tuples become lists)."""
  return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)


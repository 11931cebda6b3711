"""The one converter engine: a table of state-dict entries <-> params, both directions.

A converter describes its model by a table (a list of :class:`Entry`): each
PyTorch state-dict key, the param path it becomes (``blocks_3/attn/qkv/kernel``,
always in the unscanned layout: one module per layer) and how the array is laid out
(:data:`KINDS`). :func:`to_params` runs the table one way, :func:`to_state_dict` the
other; :func:`stack` and :func:`unstack` move between the unscanned layout and the
scanned one of ``nn.scan`` (``blocks/...`` with a leading layer axis). Whatever the
table cannot place is named in one report (:func:`report`): model parameters the
checkpoint lacks and checkpoint entries that map nowhere, refused together, or with
``allow_partial`` logged one per line and counted in :class:`Dropped`.

O output channels, I input channels, kH kW kernel size.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from ifsq_jax.models.saved import ConversionError, unflatten

# linear: torch weight (out, in) <-> kernel (*in, *out), the first n_in axes of the kernel being inputs.
# conv: torch weight (O, I, kH, kW) <-> kernel (kH, kW, I, O). bias / copy: the same values, reshaped.
KINDS = ("copy", "bias", "linear", "conv")


@dataclasses.dataclass(frozen=True)
class Entry:
  """One state-dict entry and the param it becomes (in the unscanned layout).

  Attributes:
    key: The PyTorch state-dict key, e.g. ``blocks.3.attn.qkv.weight``.
    path: The param's path, e.g. ``blocks_3/attn/qkv/kernel``.
    kind: One of :data:`KINDS`.
    n_in: Input axes of a linear kernel (2 for an output projection over (heads, head width)).
  """

  key: str
  path: str
  kind: str = "copy"
  n_in: int = 1

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"Entry {self.key}: kind={self.kind!r} is not valid; use one of {KINDS}.")


def linear(key: str, path: str, n_in: int = 1, bias: bool = True) -> list[Entry]:
  """The entries of a ``nn.Linear`` ``key`` that is the Dense ``path``."""
  out = [Entry(f"{key}.weight", f"{path}/kernel", "linear", n_in)]
  return out + [Entry(f"{key}.bias", f"{path}/bias", "bias")] if bias else out


def conv(key: str, path: str, bias: bool = True) -> list[Entry]:
  """The entries of a ``nn.Conv2d`` ``key`` that is the Conv ``path``."""
  out = [Entry(f"{key}.weight", f"{path}/kernel", "conv")]
  return out + [Entry(f"{key}.bias", f"{path}/bias", "bias")] if bias else out


def torch_shape(entry: Entry, shape: Sequence[int]) -> tuple[int, ...]:
  """The state-dict shape of an entry whose param has ``shape``."""
  shape = tuple(shape)
  if entry.kind == "linear":
    return (math.prod(shape[entry.n_in:]), math.prod(shape[:entry.n_in]))
  if entry.kind == "conv":
    return (shape[3], shape[2], shape[0], shape[1])
  if entry.kind == "bias":
    return (math.prod(shape),)
  return shape


def to_param(entry: Entry, value: np.ndarray, shape: Sequence[int] | None = None) -> np.ndarray:
  """A state-dict array -> the param of ``shape`` (None: the natural layout, e.g. a 2D kernel for a linear)."""
  if entry.kind == "linear":
    return value.T if shape is None else value.T.reshape(shape)
  if entry.kind == "conv":
    return value.transpose(2, 3, 1, 0)
  return value if shape is None else value.reshape(shape)


def to_torch(entry: Entry, value: np.ndarray) -> np.ndarray:
  """A param -> its state-dict array (contiguous, as torch.save writes it)."""
  shape = torch_shape(entry, value.shape)
  if entry.kind == "linear":
    value = value.reshape(shape[::-1]).T
  elif entry.kind == "conv":
    value = value.transpose(3, 2, 0, 1)
  return np.ascontiguousarray(value.reshape(shape))


# ------------------------------------------------------------------ layouts

def flat(tree: Mapping[str, Any]) -> dict[str, Any]:
  """A param tree -> {"a/b/c": leaf}; leaves are kept as they are (arrays or shapes)."""
  return {jax.tree_util.keystr(p, simple=True, separator="/"): leaf
          for p, leaf in jax.tree_util.tree_flatten_with_path(dict(tree))[0]}


def stack(params: Mapping[str, Any], names: Sequence[str]) -> dict[str, Any]:
  """Unscanned params (``name_0`` ... ``name_{n-1}`` for each of ``names``) -> scanned (``name``, layer axis first)."""
  pattern = re.compile(rf"({'|'.join(map(re.escape, names))})_\d+")
  out = {k: v for k, v in params.items() if not pattern.fullmatch(k)}
  for name in names:
    depth = 1 + max((int(k.rsplit("_", 1)[1]) for k in params if re.fullmatch(rf"{re.escape(name)}_\d+", k)),
                    default=-1)
    if depth:
      layers = [params.get(f"{name}_{i}") for i in range(depth)]
      if any(layer is None for layer in layers):
        raise ValueError(f"{name}_0 ... {name}_{depth - 1} cannot be stacked: some are absent (have "
                         f"{sorted(k for k in params if k.startswith(name))}).")
      out[name] = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *layers)
  return out


def unstack(params: Mapping[str, Any], names: Sequence[str]) -> dict[str, Any]:
  """Scanned params (``name`` with a leading layer axis, for each of ``names``) -> unscanned (``name_0`` ...)."""
  out = {k: v for k, v in params.items() if k not in names}
  for name in names:
    if name in params:
      for i in range(jax.tree.leaves(params[name])[0].shape[0]):
        out[f"{name}_{i}"] = jax.tree.map(lambda x, i=i: np.asarray(x[i]), params[name])
  return out


# ------------------------------------------------------------------ the report of what does not map

@dataclasses.dataclass
class Dropped:
  """What a partial conversion (``--allow_partial``) left out.

  Attributes:
    unmapped: Checkpoint entries that were not converted (dropped).
    left_at_init: Model parameters the checkpoint did not provide (they keep their initial values).
  """

  unmapped: list[str] = dataclasses.field(default_factory=list)
  left_at_init: list[str] = dataclasses.field(default_factory=list)

  def __bool__(self) -> bool:
    return bool(self.unmapped or self.left_at_init)

  def summary(self) -> str:
    return (f"partial: {len(self.unmapped)} checkpoint entries dropped, {len(self.left_at_init)} parameters left at "
            "their initial values")


def _listed(names: Sequence[str]) -> str:
  return ", ".join(names[:10]) + (" ..." if len(names) > 10 else "")


def report(missing: Sequence[str] = (), unmapped: Sequence[str] = (), allow_partial: bool = False,
           dropped: Dropped | None = None, keys: Mapping[str, str] | None = None, can_init: bool = True) -> None:
  """The one report of what a conversion cannot place.

  Args:
    missing: Model parameter paths the checkpoint lacks.
    unmapped: Checkpoint keys that map onto no parameter.
    allow_partial: Log both (every name, one per line) and add them to ``dropped`` instead of refusing.
    dropped: Collects what a partial conversion leaves out.
    keys: The state-dict key of each parameter path, to name both in the message.
    can_init: Whether missing parameters can keep an initial value; if not, they are refused even with
      ``allow_partial`` (a converter that reads the architecture from the checkpoint has no initial values).

  Raises:
    ConversionError: naming the missing parameters and the unmapped entries, unless ``allow_partial``.
  """
  missing, unmapped = sorted(missing), sorted(unmapped)
  keys = keys or {}
  parts = []
  if missing:
    parts.append(f"the checkpoint has nothing for {len(missing)} model parameters: "
                 + _listed([f"{keys[p]} -> {p}" if p in keys else p for p in missing]))
  if unmapped:
    parts.append(f"{len(unmapped)} checkpoint entries are not mapped: {unmapped[:10]}"
                 f"{' ...' if len(unmapped) > 10 else ''}")
  if missing and not can_init:
    raise ConversionError("; ".join(parts) + " (a checkpoint of this model holds all of its parameters).")
  if parts and not allow_partial:
    raise ConversionError("; ".join(parts) + " (pass --allow_partial to drop unmapped entries and keep the initial "
                          "values of missing parameters).")
  if unmapped:
    logging.warning("--allow_partial: %d checkpoint entries are not mapped and were dropped:\n%s", len(unmapped),
                    "\n".join(f"  {k}" for k in unmapped))
  if missing:
    logging.warning("--allow_partial: %d model parameters are not in the checkpoint and keep their initial "
                    "values:\n%s", len(missing), "\n".join(f"  {k}" for k in missing))
  if dropped is not None:
    dropped.unmapped.extend(unmapped)
    dropped.left_at_init.extend(missing)


# ------------------------------------------------------------------ the loop, both directions

def to_params(sd: Mapping[str, np.ndarray], table: Sequence[Entry], expected: Mapping[str, Any] | None = None,
              initial: Callable[[], Mapping[str, Any]] | None = None, *, model: str = "model", hint: str = "",
              allow_partial: bool = False, dropped: Dropped | None = None, ignore: Iterable[str] = (),
              used: Iterable[str] = ()) -> dict[str, Any]:
  """State dict -> the param tree ``table`` describes (numpy float32, unscanned layout).

  Args:
    sd: The state dict.
    table: Its entries; an entry whose key the checkpoint lacks is a missing parameter, one whose path is not in
      ``expected`` maps nowhere.
    expected: Every param path -> its shape (anything with ``.shape``, e.g. from ``jax.eval_shape``); None: the
      table's paths, shaped as the checkpoint gives them (a model whose architecture is read from the checkpoint).
    initial: Returns {path: initial value} for the params a partial conversion keeps at their initial values
      (called only then); None: a missing parameter is always refused.
    model: The model's name in messages.
    hint: What to check when a shape differs (appended to the message).
    allow_partial: See :func:`report`.
    dropped: See :func:`report`.
    ignore: Key prefixes the model deliberately does not load (buffers recomputed or not used).
    used: Keys the converter consumed itself (e.g. buffers it checked).

  Raises:
    ConversionError: an entry of another shape than the model needs, or the :func:`report` of missing and unmapped
      entries.
  """
  ignore, out, taken = tuple(ignore), {}, set(used)
  for entry in table:
    if entry.key not in sd or (expected is not None and entry.path not in expected):
      continue
    value = np.asarray(sd[entry.key], np.float32)
    shape = None if expected is None else tuple(expected[entry.path].shape)
    if shape is not None and value.shape != torch_shape(entry, shape):
      raise ConversionError(f"{entry.key}: checkpoint shape {value.shape}, but {entry.path} of this {model} needs "
                            f"{torch_shape(entry, shape)}" + (f"; {hint}" if hint else "") + ".")
    out[entry.path] = to_param(entry, value, shape)
    taken.add(entry.key)
  paths = expected if expected is not None else {e.path: None for e in table}
  missing = [p for p in paths if p not in out]
  unmapped = [k for k in sd if k not in taken and not k.startswith(ignore)]
  report(missing, unmapped, allow_partial, dropped, keys={e.path: e.key for e in table},
         can_init=initial is not None)
  if missing:
    init = initial()
    out.update({p: np.asarray(init[p]) for p in missing})
  return unflatten(out)


def to_state_dict(params: Mapping[str, Any], table: Sequence[Entry]) -> dict[str, np.ndarray]:
  """Params (unscanned layout) -> the state dict ``table`` describes (float32)."""
  values = flat(params)
  missing = [e.path for e in table if e.path not in values]
  if missing:
    raise ValueError(f"the params lack {len(missing)} paths of the table: {_listed(missing)}; are they in the "
                     "scanned layout (unstack them first)?")
  return {e.key: to_torch(e, np.asarray(values[e.path], np.float32)) for e in table}

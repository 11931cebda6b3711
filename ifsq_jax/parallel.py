"""Device mesh, logical axis names and shardings (pjit semantics through ``jax.jit``).

The mesh has three axes: ``data`` (pure data parallelism), ``fsdp`` (data
parallelism with parameters, gradients and optimizer state sharded) and
``tensor`` (tensor parallelism). Parameters carry logical axis names
(``nn.with_logical_partitioning``); rules map them to mesh axes. A dimension that
does not divide over its mesh axes is replicated rather than rejected, so one
rule set serves 1 CPU, 8 simulated devices and a pod.

Batches are sharded over ``('data', 'fsdp')`` on their leading axis. Init,
``eval_shape`` and every step are traced inside :func:`sharding_context` (the
mesh and the logical-axis rules), where models pin activations with
:func:`constrain`.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical axis names, used by the models (never scattered strings).
BATCH = "batch"
EMBED = "embed"  # model width: sharded over fsdp
MLP = "mlp"  # hidden width of MLPs: tensor parallel
HEADS = "heads"
KV = "kv"
VOCAB = "vocab"
CONV_IN = "conv_in"  # input channels of a conv kernel
CONV_OUT = "conv_out"  # output channels of a conv kernel
NORM = "norm"  # scales and biases
KERNEL_H = "kernel_h"  # kernel height (a logical name occurs once per array: height and width differ)
KERNEL_W = "kernel_w"  # kernel width
LAYERS = "layers"  # the stacked layer axis of scanned blocks (nn.scan)

# (logical name, mesh axes or None). Tuples, so that configs can hold them.
DEFAULT_RULES = (
    (BATCH, BATCH_AXES),
    (EMBED, "fsdp"),
    (MLP, "tensor"),
    (HEADS, "tensor"),
    (KV, None),
    (VOCAB, "tensor"),
    (CONV_IN, None),
    (CONV_OUT, "fsdp"),
    (NORM, None),
    (KERNEL_H, None),
    (KERNEL_W, None),
    (LAYERS, None),
)


def mesh_shape(data: int, fsdp: int, tensor: int, device_count: int) -> dict[str, int]:
  """Resolves the mesh axis sizes; one of them may be -1 (all remaining devices)."""
  sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
  free = [k for k, v in sizes.items() if v == -1]
  bad = [k for k, v in sizes.items() if v != -1 and v < 1]
  if bad or len(free) > 1:
    raise ValueError(f"mesh {sizes}: each of config.mesh.data/fsdp/tensor must be >= 1, and at most one may be -1.")
  fixed = math.prod(v for v in sizes.values() if v != -1)
  if free:
    if device_count % fixed:
      raise ValueError(f"mesh {sizes} needs a multiple of {fixed} devices to fill config.mesh.{free[0]}=-1; "
                       f"there are {device_count}.")
    sizes[free[0]] = device_count // fixed
  if math.prod(sizes.values()) != device_count:
    raise ValueError(f"mesh {sizes} has {math.prod(sizes.values())} devices but there are {device_count}; "
                     "make data * fsdp * tensor equal the device count or set one axis to -1.")
  return sizes


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[Any] | None = None,
              slices: int = 1) -> Mesh:
  """A (data, fsdp, tensor) mesh with explicit ``AxisType.Auto`` axes.

  With ``slices`` > 1 (multislice: TPU slices joined by the data-centre network),
  the ``data`` axis is split over the slices and fsdp / tensor stay inside each
  one, so only the gradient all-reduce crosses slices
  (``mesh_utils.create_hybrid_device_mesh``). Devices that all report one slice
  (CPU, GPU) are grouped by process instead.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_shape(data, fsdp, tensor, len(devices))
  shape = tuple(sizes[a] for a in MESH_AXES)
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  if slices == 1:
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)
  if slices < 1 or sizes["data"] % slices:
    raise ValueError(f"mesh.slices={slices} must be >= 1 and divide the data axis ({sizes['data']}); the fsdp and "
                     "tensor axes stay inside a slice.")
  per_slice = (sizes["data"] // slices, sizes["fsdp"], sizes["tensor"])
  by_process = len({getattr(d, "slice_index", 0) for d in devices}) == 1  # CPU / GPU: no slices to tell
  try:
    array = mesh_utils.create_hybrid_device_mesh(per_slice, (slices, 1, 1), devices, process_is_granule=by_process)
  except ValueError as e:
    raise ValueError(f"mesh.slices={slices} does not fit the devices: {e}") from None
  return Mesh(array, MESH_AXES, axis_types=auto)


def parse_rules(rules: Sequence[Sequence[Any]]) -> dict[str, tuple[str, ...]]:
  """Config rules -> {logical name: tuple of mesh axes}; a ValueError names a bad rule."""
  out = {}
  for rule in rules:
    if len(rule) != 2 or not isinstance(rule[0], str):
      raise ValueError(f"rule {rule!r} must be a pair (logical name, mesh axis | tuple of axes | None).")
    name, axes = rule
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    unknown = [a for a in axes if a not in MESH_AXES]
    if unknown:
      raise ValueError(f"rule {rule!r} names mesh axes {unknown}; valid axes are {MESH_AXES}.")
    out[name] = axes
  return out


def _mesh_spec(logical: P, shape: tuple[int, ...], mesh: Mesh, rules: dict[str, tuple[str, ...]]) -> P:
  """Logical spec -> mesh spec; each mesh axis used once, uneven dimensions replicated."""
  used: set[str] = set()
  out = []
  for dim, name in zip(shape, tuple(logical) + (None,) * (len(shape) - len(logical))):
    axes = tuple(a for a in rules.get(name, ()) if a not in used and mesh.shape[a] > 1) if name else ()
    size = math.prod(mesh.shape[a] for a in axes)
    if not axes or dim % size:
      out.append(None)
      continue
    used.update(axes)
    out.append(axes[0] if len(axes) == 1 else axes)
  return P(*out)


def logical_shardings(boxed_abstract: Any, mesh: Mesh, rules: Sequence[Sequence[Any]]) -> Any:
  """NamedShardings for every leaf of an abstract (``jax.eval_shape``) pytree.

  Args:
    boxed_abstract: Abstract tree whose parameters may be boxed with logical
      names (``nn.LogicallyPartitioned``); other leaves are replicated.
    mesh: The device mesh.
    rules: Logical-to-mesh rules (``config.mesh.rules``).

  Returns:
    A tree of ``NamedSharding`` with the structure of ``nn.meta.unbox(boxed_abstract)``.
  """
  parsed = parse_rules(rules)
  specs = nn.get_partition_spec(boxed_abstract)
  abstract = nn.meta.unbox(boxed_abstract)
  return jax.tree.map(lambda spec, leaf: NamedSharding(mesh, _mesh_spec(spec, leaf.shape, mesh, parsed)),
                      specs, abstract, is_leaf=lambda x: isinstance(x, P))


@contextlib.contextmanager
def sharding_context(mesh: Mesh, rules: Sequence[Sequence[Any]]) -> Iterator[None]:
  """Traces inside ``mesh`` and the logical-axis ``rules`` (``jax.set_mesh`` + ``nn.logical_axis_rules``)."""
  flax_rules = tuple((name, axes) for name, axes in parse_rules(rules).items())
  with jax.set_mesh(mesh), nn.logical_axis_rules(flax_rules):
    yield


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  """Pins an activation's sharding by logical axis names (``(BATCH, None, EMBED)``).

  Inside :func:`sharding_context` the names map to mesh axes by its rules (a
  dimension that does not divide stays replicated, as for parameters); outside
  one, or on a one-device mesh, ``x`` is returned unchanged.

  Args:
    x: Any array.
    axes: One logical name (or None) per dimension of ``x``.
  """
  if len(axes) != x.ndim:
    raise ValueError(f"constrain: {len(axes)} axis names {tuple(axes)} for an array of shape {x.shape}.")
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return x
  rules = {name: (() if a is None else (a,) if isinstance(a, str) else tuple(a))
           for name, a in nn.get_logical_axis_rules()}
  return jax.lax.with_sharding_constraint(x, _mesh_spec(P(*axes), x.shape, mesh, rules))


def platform() -> str:
  """The platform being traced for: the devices of the mesh in context, else JAX's default backend.

  Under the mesh of a TPU topology compiled on a CPU host it is ``'tpu'``, so
  CPU-only kernels stay out of that program.
  """
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh.empty else mesh.abstract_device
  return device.platform if device is not None else jax.default_backend()


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  """Leading axis over (data, fsdp); the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Host arrays (the same on every process) -> global arrays replicated over the mesh, with several processes too."""
  sharding = replicated(mesh)

  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

  return jax.tree.map(put, tree)


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's slice of a batch -> global arrays sharded over (data, fsdp)."""
  return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v) for k, v in local.items()}


def batch_devices(mesh: Mesh) -> int:
  """Devices the batch axis is split over (the mesh's data x fsdp)."""
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def round_up(n: int, k: int) -> int:
  """The least multiple of ``k`` that is >= ``n``."""
  return -(-n // k) * k


def global_array(x: np.ndarray, mesh: Mesh) -> jax.Array:
  """The full host array (the same on every process) -> a global array sharded over (data, fsdp) on axis 0."""
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, batch_sharding(mesh, x.ndim), lambda index: x[index])


def to_host(x: jax.Array) -> np.ndarray:
  """The whole of a global array on every process (gathered over processes when it spans several)."""
  if not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)

"""The device mesh: four named axes (data, fsdp, expert, tensor), sizes bound by gin.

One axis may be -1: it takes the devices the others leave. The trainer makes the mesh current
(`jax.set_mesh`) around compilation and execution, so layers read it with `current_mesh()`
instead of receiving it as an argument.
"""
import math
from typing import Sequence

import gin
import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from glam.config import ConfigError

MESH_AXES = ("data", "fsdp", "expert", "tensor")
# Tokens (the batch dimension of activations and of the input) are split over these axes.
BATCH_AXES = ("data", "fsdp", "expert")


def mesh_axes() -> tuple[str, ...]:
  """The mesh axis names, in mesh order: ("data", "fsdp", "expert", "tensor")."""
  return MESH_AXES


def batch_axes() -> tuple[str, ...]:
  """The mesh axes the token batch is sharded over: ("data", "fsdp", "expert")."""
  return BATCH_AXES


def current_mesh():
  """The mesh set by `jax.set_mesh` (an AbstractMesh inside jit), or None when there is none."""
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh is None or mesh.empty else mesh


def axis_size(name: str, mesh=None) -> int:
  """Size of mesh axis `name` in `mesh` (default: the current mesh); 1 without a mesh."""
  mesh = current_mesh() if mesh is None else mesh
  if mesh is None or name not in mesh.axis_names:
    return 1
  return dict(zip(mesh.axis_names, mesh.axis_sizes))[name]


def batch_shards(mesh=None) -> int:
  """How many pieces the batch is cut into: the product of the batch axes' sizes."""
  return math.prod(axis_size(name, mesh) for name in BATCH_AXES)


def resolve_axis_sizes(sizes: dict[str, int], num_devices: int) -> dict[str, int]:
  """Replaces the one -1 by what the other axes leave; errors name the bindings and numbers."""
  for name, size in sizes.items():
    if size != -1 and size < 1:
      raise ConfigError(f"mesh_shape.{name}={size}: must be >= 1, or -1 for 'the remaining devices'")
  unknown = [name for name, size in sizes.items() if size == -1]
  if len(unknown) > 1:
    raise ConfigError(f"mesh_shape: only one axis may be -1, got {', '.join(f'{n}=-1' for n in unknown)}")
  known = math.prod(size for size in sizes.values() if size != -1)
  described = " x ".join(f"{name} {size}" for name, size in sizes.items())
  if unknown:
    if num_devices % known:
      raise ConfigError(f"mesh_shape ({described}): the fixed axes multiply to {known}, which does not "
                        f"divide the {num_devices} devices")
    sizes = dict(sizes, **{unknown[0]: num_devices // known})
  elif known != num_devices:
    raise ConfigError(f"mesh_shape ({described}): axis sizes multiply to {known}, but there are "
                      f"{num_devices} devices (set one axis to -1 to take the rest)")
  return sizes


@gin.configurable
def mesh_shape(data: int = 1, fsdp: int = 1, expert: int = 1, tensor: int = 1) -> dict[str, int]:
  """Mesh axis sizes (configs/mesh/*.gin bind these); one may be -1 for "the remaining devices".
  The default, every size 1, is one device (as a run without a mesh); configs/mesh/dp8.gin
  (data -1) spreads the batch over every device.

  Args:
    data: pure data parallelism: parameters replicated, batch split.
    fsdp: batch split and parameters' "embed" dimension sharded (ZeRO-3 / FSDP).
    expert: batch split and MoE experts sharded (GShard expert parallelism).
    tensor: Megatron-style model parallelism over "mlp", "heads" and "vocab".
  """
  return {"data": data, "fsdp": fsdp, "expert": expert, "tensor": tensor}


@gin.configurable
def make_mesh(num_devices: int | None = None, devices: Sequence | None = None) -> Mesh:
  """The mesh of `mesh_shape()` over all devices (of every process), or the first `num_devices`.

  Axis sizes must multiply to that device count, except for the default mesh (every size 1),
  which takes one device, like a run without a mesh. Axes are Auto (GSPMD propagation): sharding
  constraints guide the compiler, which fills in the rest.
  """
  all_devices = list(devices) if devices is not None else jax.devices()
  sizes = mesh_shape()
  if num_devices is None and all(size == 1 for size in sizes.values()):
    if jax.process_count() > 1:
      raise ConfigError(f"mesh_shape: every axis is 1 (one device) but this run has {jax.process_count()} "
                        "processes; give a mesh over all their devices, e.g. configs/mesh/dp8.gin (data -1)")
    num_devices = 1
  if num_devices is not None:
    if not 1 <= num_devices <= len(all_devices):
      raise ConfigError(f"make_mesh.num_devices={num_devices}: must be between 1 and {len(all_devices)} "
                        "(the devices JAX sees)")
    all_devices = all_devices[:num_devices]
  sizes = resolve_axis_sizes(sizes, len(all_devices))
  shape = tuple(sizes[name] for name in MESH_AXES)
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=all_devices)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Rows over the batch axes, everything else whole."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def check_batch_divides(batch_size: int, mesh: Mesh, binding: str = "train.batch_size") -> None:
  shards = batch_shards(mesh)
  if batch_size % shards:
    sizes = " x ".join(f"{n} {axis_size(n, mesh)}" for n in BATCH_AXES)
    raise ConfigError(f"{binding}={batch_size}: not divisible by the {shards} batch shards of the mesh "
                      f"({sizes})")


def describe(mesh: Mesh) -> str:
  return " x ".join(f"{name} {size}" for name, size in zip(mesh.axis_names, mesh.axis_sizes))

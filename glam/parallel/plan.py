"""Dry-run memory planning: per parameter its shape, logical axes and mesh sharding, and the
per-device bytes of parameters plus optimizer state, from abstract shapes only (nothing is
allocated), on a mesh of any size: plan a pod run on a laptop.

  glam train --gin_file=... --gin_file=configs/mesh/ep8.gin --model_dir=unused --dry_run
  glam model summary --gin_file=... --mesh --gin.plan_devices.num_devices=256
"""
import json
import math

import gin
import jax
from jax.sharding import AbstractMesh, AxisType, PartitionSpec

from glam.parallel.axis_rules import axis_rules
from glam.parallel.mesh import MESH_AXES, check_batch_divides, describe, mesh_shape, resolve_axis_sizes
from glam.parallel.sharding import opt_state_specs, param_logical_axes, param_specs, path_str


@gin.configurable
def plan_devices(num_devices: int | None = None) -> int:
  """Devices the dry run plans for: None = the product of the mesh sizes when none is -1, else the
  devices this machine has (like a real run); e.g. 256 to plan a TPU v4-512 pod slice from a laptop."""
  if num_devices is not None:
    return num_devices
  sizes = mesh_shape().values()
  return math.prod(sizes) if -1 not in sizes else len(jax.devices())


def plan_mesh(num_devices: int) -> AbstractMesh:
  sizes = resolve_axis_sizes(mesh_shape(), num_devices)
  return AbstractMesh(tuple(sizes[name] for name in MESH_AXES), MESH_AXES,
                      axis_types=(AxisType.Auto,) * len(MESH_AXES))


def shard_shape(shape, spec: PartitionSpec, mesh) -> tuple[int, ...]:
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
  entries = list(spec) + [None] * (len(shape) - len(spec))
  out = []
  for dim, entry in zip(shape, entries):
    axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    out.append(dim // math.prod(sizes[a] for a in axes))
  return tuple(out)


def _bytes(leaf, spec, mesh) -> tuple[int, int]:
  """(total bytes, bytes per device) of one array."""
  item = jax.numpy.dtype(leaf.dtype).itemsize
  return item * math.prod(leaf.shape), item * math.prod(shard_shape(leaf.shape, spec, mesh))


def memory_plan(model_factory, optimizer, num_devices: int, batch_size: int | None = None) -> dict:
  """{"mesh", "parameters": [rows], totals}; everything from jax.eval_shape."""
  from flax import nnx

  from glam.models.summary import abstract_model
  mesh = plan_mesh(num_devices)
  if batch_size is not None:
    check_batch_divides(batch_size, mesh)
  model = abstract_model(model_factory)
  params = nnx.to_pure_dict(nnx.split(model)[1])
  logical = param_logical_axes(model)
  specs = param_specs(params, logical, mesh, axis_rules())
  rows, param_total, param_device = [], 0, 0
  is_spec = lambda s: isinstance(s, PartitionSpec)
  for (path, leaf), spec in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                                jax.tree.leaves(specs, is_leaf=is_spec)):
    total, device = _bytes(leaf, spec, mesh)
    param_total, param_device = param_total + total, param_device + device
    key = path_str(path)
    rows.append({"path": key, "shape": list(leaf.shape), "logical_axes": list(logical.get(key, ())),
                 "sharding": [e if e is None or isinstance(e, str) else list(e) for e in spec],
                 "bytes": total, "bytes_per_device": device})
  opt_state = jax.eval_shape(optimizer.init, params)
  opt_specs = opt_state_specs(opt_state, params, specs)
  opt_total = opt_device = 0
  for leaf, spec in zip(jax.tree.leaves(opt_state), jax.tree.leaves(opt_specs, is_leaf=is_spec)):
    total, device = _bytes(leaf, spec, mesh)
    opt_total, opt_device = opt_total + total, opt_device + device
  return {"mesh": describe(mesh), "devices": num_devices, "parameters": rows,
          "param_bytes": param_total, "param_bytes_per_device": param_device,
          "opt_state_bytes": opt_total, "opt_state_bytes_per_device": opt_device,
          "state_bytes_per_device": param_device + opt_device}


def _mib(n: int) -> str:
  return f"{n / 2**20:,.2f} MiB"


def print_plan() -> int:
  """Prints the plan for the parsed gin config (train.model, the optimizer, the mesh); returns 0."""
  from glam.models.lm import DecoderLM
  from glam.train.loading import binding
  from glam.train.optimizers import make_optimizer
  with gin.unlock_config():
    plan = memory_plan(binding("train.model", DecoderLM), make_optimizer(), plan_devices(),
                       batch_size=binding("train.batch_size", 16))
  print(f"mesh: {plan['mesh']} ({plan['devices']} devices)")
  print(f"{'parameter':<40} {'shape':<22} {'logical axes':<40} {'sharding':<36} {'per device':>12}")
  for row in plan["parameters"]:
    print(f"{row['path']:<40} {str(tuple(row['shape'])):<22} {str(tuple(row['logical_axes'])):<40} "
          f"{str(tuple(row['sharding'])):<36} {_mib(row['bytes_per_device']):>12}")
  print(f"parameters:      {_mib(plan['param_bytes']):>16} total, {_mib(plan['param_bytes_per_device']):>14} per device")
  print(f"optimizer state: {_mib(plan['opt_state_bytes']):>16} total, {_mib(plan['opt_state_bytes_per_device']):>14} per device")
  print(f"state per device (parameters + optimizer state): {_mib(plan['state_bytes_per_device'])}")
  print(json.dumps({k: v for k, v in plan.items() if k != "parameters"}))
  return 0

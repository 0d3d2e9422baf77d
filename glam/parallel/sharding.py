"""Shardings of the train state, derived from the parameters' logical axes.

Parameters: from their `logical_axes` metadata through the rules table (a leading "layers" axis
is implied for the scanned block stack). Optimizer state: never written by hand. Each leaf of the
optimizer state that sits under a parameter's path (Adam's mu / nu, Adafactor's v, v_row, v_col)
takes that parameter's spec: as is when the shapes agree, minus the dropped dimension when it is a
factored moment (the parameter's shape with one dimension removed), replicated otherwise (scalars,
counters, placeholders).
"""
import math
from typing import Any

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from glam.parallel.axis_rules import spec_for
from glam.train.checkpoint import path_str  # "params/blocks/moe_1/experts/wi"


def param_logical_axes(abstract_model: nnx.Module) -> dict[str, tuple]:
  """{"blocks/moe_1/experts/wi": ("layers", "expert", "embed", "mlp"), ...} for every nnx.Param."""
  axes = {}
  for path, variable in nnx.to_flat_state(nnx.state(abstract_model, nnx.Param)):
    shape = variable.get_value().shape
    names = tuple(variable.get_metadata().get("logical_axes", ()) or ())
    if len(names) == len(shape) - 1:
      names = ("layers",) + names  # stacked by the block scan
    if len(names) != len(shape):
      names = (None,) * len(shape)  # no (usable) names: replicated
    axes["/".join(map(str, path))] = names
  return axes


def param_specs(params: Any, logical_axes: dict[str, tuple], mesh, rules: dict) -> Any:
  """A PartitionSpec per leaf of `params` (a pure dict as nnx.to_pure_dict gives)."""

  def one(path, leaf):
    key = path_str(path)
    names = logical_axes.get(key)
    if names is None or not leaf.shape:
      return PartitionSpec()
    return spec_for(names, leaf.shape, mesh, rules, where=f"parameter {key} {tuple(leaf.shape)}")

  return jax.tree_util.tree_map_with_path(one, params)


def _drop_one(param_shape, param_spec, leaf_shape) -> PartitionSpec | None:
  """The spec of a factored moment: param_spec minus the dimension whose removal gives leaf_shape."""
  entries = list(param_spec) + [None] * (len(param_shape) - len(param_spec))
  candidates = [i for i in range(len(param_shape))
                if tuple(param_shape[:i]) + tuple(param_shape[i + 1:]) == tuple(leaf_shape)]
  if not candidates:
    return None
  # Tied candidates have equal sizes, so any choice is valid; dropping an unsplit one keeps the most sharding.
  dropped = min(candidates, key=lambda i: entries[i] is not None)
  return PartitionSpec(*(entries[:dropped] + entries[dropped + 1:]))


def opt_state_specs(opt_state: Any, params: Any, specs: Any) -> Any:
  """A PartitionSpec per optimizer-state leaf, derived from the parameter specs (see module doc)."""
  by_path = {}
  for (path, param), (_, spec) in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                                      jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda s: isinstance(s, PartitionSpec))[0]):
    by_path[path_str(path)] = (tuple(param.shape), spec)

  # Longest paths first: "v_row/domain_experts/blocks/ffn_1/wi" belongs to the MoDE expert's
  # parameter, not to the backbone's "blocks/ffn_1/wi" that is also a suffix of it.
  longest_first = sorted(by_path.items(), key=lambda item: -len(item[0]))

  def one(path, leaf):
    key = path_str(path)
    shape = tuple(getattr(leaf, "shape", ()))
    if not shape:
      return PartitionSpec()
    for param_path, (param_shape, spec) in longest_first:
      if key == param_path or key.endswith("/" + param_path):
        if shape == param_shape:
          return spec
        if len(shape) == len(param_shape) - 1:
          dropped = _drop_one(param_shape, spec, shape)
          if dropped is not None:
            return dropped
        return PartitionSpec()
    return PartitionSpec()

  return jax.tree_util.tree_map_with_path(one, opt_state)


def state_specs(state: dict, logical_axes: dict[str, tuple], mesh, rules: dict) -> dict:
  """Specs for the train state {"step", "params", "opt_state", ...}: params from the rules, the
  optimizer state derived from them, anything else replicated."""
  specs = {key: jax.tree.map(lambda _: PartitionSpec(), value) for key, value in state.items()}
  specs["params"] = param_specs(state["params"], logical_axes, mesh, rules)
  if "opt_state" in state:
    specs["opt_state"] = opt_state_specs(state["opt_state"], state["params"], specs["params"])
  return specs


def named(specs: Any, mesh) -> Any:
  return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs,
                      is_leaf=lambda s: isinstance(s, PartitionSpec))


def abstract_with_shardings(state: Any, shardings: Any) -> Any:
  """jax.ShapeDtypeStruct leaves carrying the target shardings (for Orbax restore and dry runs)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


def on_one_device(abstract_state: Any) -> Any:
  """abstract_state with every leaf on this process's first device: the restore target of tools
  that read a checkpoint whole (eval, generate, surgery, a distillation teacher), so a checkpoint
  written on any mesh, e.g. a pod's, restores on a laptop (Orbax needs target shardings once the
  saved device topology differs from the current one)."""
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return abstract_with_shardings(abstract_state, jax.tree.map(lambda _: device, abstract_state))


def per_device_bytes(abstract_state: Any, shardings: Any) -> int:
  """Bytes one device holds of these arrays: each leaf's shard shape times its item size."""
  total = 0
  for leaf, sharding in zip(jax.tree.leaves(abstract_state), jax.tree.leaves(shardings)):
    shard = sharding.shard_shape(tuple(leaf.shape))
    total += int(jax.numpy.dtype(leaf.dtype).itemsize) * math.prod(shard)
  return total

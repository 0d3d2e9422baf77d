"""Activation sharding constraints at the key places, by logical name (GSPMD expert parallelism).

Each helper is a no-op without a current mesh (single-device runs, tests of bare layers) and
inside jax.shard_map (manual axes: an explicit dispatcher places its own data).
"""
import jax
from jax.sharding import AxisType

from glam.parallel.axis_rules import axis_rules, spec_for
from glam.parallel.mesh import current_mesh

# Names of activation dimensions (the rules table maps them like parameter names).
TOKENS = ("batch", "length", None)               # [batch, length, d_model]
GROUPED_TOKENS = ("batch", None, None)           # [groups, group_size, d_model]
DISPATCHED = ("expert", "batch", None)           # [experts, groups * capacity, d_model]
DISPATCHED_ROWS = (None, "batch", None)          # the same with every expert on every device


def _auto_mesh():
  mesh = current_mesh()
  if mesh is None or any(t == AxisType.Manual for t in mesh.axis_types):
    return None
  return mesh


def constrain(x: jax.Array, logical_axes) -> jax.Array:
  """x with a sharding constraint from its dimension names; dimensions that do not divide stay whole."""
  mesh = _auto_mesh()
  if mesh is None:
    return x
  spec = spec_for(logical_axes, x.shape, mesh, axis_rules(), where=f"activation {tuple(logical_axes)}")
  return jax.lax.with_sharding_constraint(x, spec)


class ExpertShardedCall:
  """Wraps an Experts module so that the dispatched tensor [experts, rows, d_model] it receives
  and returns is split over the expert axis (experts) and the other batch axes (rows): GSPMD then
  inserts the all-to-alls of GShard around the expert computation. Everything else is forwarded."""

  def __init__(self, experts, logical_axes=DISPATCHED):
    self._experts, self._logical_axes = experts, logical_axes

  def __call__(self, x: jax.Array, ctx) -> jax.Array:
    y = self._experts(constrain(x, self._logical_axes), ctx)  # [experts, rows, d_model]
    return constrain(y, self._logical_axes)

  def __getattr__(self, name):
    return getattr(self._experts, name)

"""The train state and batches as global arrays on a mesh; steps that run with the mesh set.

The trainer builds the state as before, then `place_state` puts every leaf on its derived
sharding; `global_batch` turns this process's rows into one global array split over the batch
axes; `on_mesh` runs a jitted step with the mesh current (so layers and explicit dispatchers can
read it), keeping the state's shardings fixed from step to step.
"""
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from glam.parallel.axis_rules import axis_rules
from glam.parallel.mesh import BATCH_AXES, replicated
from glam.parallel.sharding import named, param_logical_axes, state_specs


def train_state_shardings(state: dict, abstract_model, mesh, rules: dict | None = None) -> dict:
  """NamedShardings for {"step", "params", "opt_state", ...}, from the model's logical axes."""
  rules = axis_rules() if rules is None else rules
  return named(state_specs(state, param_logical_axes(abstract_model), mesh, rules), mesh)


def place_state(state: Any, shardings: Any) -> Any:
  """Each leaf as a global array with its sharding. Every process holds the same full values
  (same seed), and each device takes its slice, so this works across processes too."""

  def put(value, sharding):
    host = np.asarray(jax.device_get(value)) if not isinstance(value, np.ndarray) else value
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

  return jax.tree.map(put, state, shardings)


def global_batch(batch: dict, mesh, *, process_local: bool = True) -> dict:
  """A batch dict of numpy arrays -> global arrays with rows split over the batch axes.

  process_local: `batch` holds only this process's rows (LmPipeline with process_index /
  process_count: the contiguous block [p*B/P, (p+1)*B/P) of the global batch); otherwise every
  process holds the whole batch (evaluation sets).
  """
  sharding = NamedSharding(mesh, PartitionSpec(BATCH_AXES))
  count, index = jax.process_count(), jax.process_index()

  def put(local):
    local = np.asarray(local)
    rows = local.shape[0] * (count if process_local else 1)
    offset = index * local.shape[0] if process_local else 0

    def piece(slices):
      start, stop, _ = slices[0].indices(rows)
      if not offset <= start <= stop <= offset + local.shape[0]:
        raise ValueError(f"global_batch: this process (index {index}) holds rows [{offset}, "
                         f"{offset + local.shape[0]}) but the mesh asks it for rows [{start}, {stop})")
      return local[(slice(start - offset, stop - offset),) + tuple(slices[1:])]

    return jax.make_array_from_callback((rows,) + local.shape[1:], sharding, piece)

  return jax.tree.map(put, batch)


def constrain_outputs(fn: Callable, mesh, state_shardings: Any | None = None) -> Callable:
  """fn(state_or_params, batch) -> (new state, metrics) or metrics: the new state keeps
  `state_shardings` and the metrics come back replicated (readable by every process)."""

  def wrapped(*args):
    out = fn(*args)
    rep = replicated(mesh)
    if state_shardings is not None:
      new_state, metrics = out
      new_state = jax.lax.with_sharding_constraint(new_state, state_shardings)
      return new_state, jax.lax.with_sharding_constraint(metrics, jax.tree.map(lambda _: rep, metrics))
    return jax.lax.with_sharding_constraint(out, jax.tree.map(lambda _: rep, out))

  return wrapped


class on_mesh:  # pylint: disable=invalid-name  (used like a function)
  """Calls (and lowers) a jitted function with `mesh` as the current mesh."""

  def __init__(self, mesh, jitted):
    self.mesh, self.jitted = mesh, jitted

  def __call__(self, *args, **kwargs):
    with jax.set_mesh(self.mesh):
      return self.jitted(*args, **kwargs)

  def lower(self, *args, **kwargs):
    with jax.set_mesh(self.mesh):
      return self.jitted.lower(*args, **kwargs)

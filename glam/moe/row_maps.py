"""Index maps between token order and expert order, shared by the dispatchers.

Both directions are known: for each expert-side row its (token, choice) assignment (token * k +
choice), and for each assignment its row; out-of-range entries mean "none" and read as zeros. The
backward of each gather is then another gather with the opposite map, instead of the scatter-add
that autodiff would write (slow on XLA:CPU).
"""
import functools

import jax
import jax.numpy as jnp

from glam.moe.routers import TokenChoiceRouting


def capacity_slots(routing: TokenChoiceRouting, num_experts: int, capacity: int):
  """Each assignment's slot in its expert, GShard order: (position, active, keep), all [groups, tokens, k].

  Every first choice claims a slot before any second choice (mesh-TF top-2); within one choice
  level tokens claim in `routing.priority` order (token order if None). Choices with gate 0 (not
  routed, e.g. padding or GShard's random second expert) claim nothing. keep = active and
  position < capacity.
  """
  groups, tokens, k = routing.expert_index.shape
  active = routing.gates > 0
  wants = jax.nn.one_hot(routing.expert_index, num_experts, dtype=jnp.int32) * active[..., None]  # [g, t, k, e]
  if routing.priority is not None:  # rank order: ranked[r] = wants[token of rank r]
    order = jnp.argsort(routing.priority, axis=1)  # [groups, tokens] rank -> token
    wants_ranked = jnp.take_along_axis(wants, order[:, :, None, None], axis=1)
  else:
    wants_ranked = wants
  by_level = jnp.swapaxes(wants_ranked, 1, 2).reshape(groups, k * tokens, num_experts)  # choice-major
  ahead = jnp.cumsum(by_level, axis=1) - by_level  # [groups, k * tokens, experts] claims before this one
  ahead = jnp.swapaxes(ahead.reshape(groups, k, tokens, num_experts), 1, 2)  # [groups, tokens (ranked), k, experts]
  if routing.priority is not None:  # back to token order: token t sits at rank priority[t]
    ahead = jnp.take_along_axis(ahead, routing.priority[:, :, None, None].astype(jnp.int32), axis=1)
  position = jnp.sum(ahead * wants, axis=-1)  # [groups, tokens, k]
  return position, active, active & (position < capacity)


def sort_by_expert(expert: jax.Array, num_experts: int):
  """Assignments in expert order, token order within each expert (a stable sort by expert).

  expert [assignments] int32 in [0, num_experts] (num_experts: not routed, sorted last). Returns
  (order [assignments]: sorted position -> assignment, inverse: assignment -> sorted position,
  sizes [num_experts]: assignments per expert, the unrouted left out).
  Why not argsort: XLA:CPU's stable argsort of 8,192 ids took 1.26 ms, sorting the unique int32
  keys expert * assignments + assignment 0.37 ms, and inverting the order by argsort 0.74 ms
  against 0.03 ms for a scatter of int32 indices (scratch timing, 32 experts, 2026-11-25 18:50 UTC).
  """
  assignments = expert.shape[0]
  position = jnp.arange(assignments, dtype=jnp.int32)
  if assignments * (num_experts + 1) <= jnp.iinfo(jnp.int32).max:  # the keys fit in int32
    order = jnp.sort(expert.astype(jnp.int32) * assignments + position) % assignments
  else:
    order = jnp.argsort(expert, stable=True).astype(jnp.int32)
  inverse = jnp.zeros_like(order).at[order].set(position, unique_indices=True)
  sizes = jnp.bincount(expert, length=num_experts + 1)[:num_experts].astype(jnp.int32)
  return order, inverse, sizes


def _take(values: jax.Array, index: jax.Array) -> jax.Array:
  return jnp.take(values, index, axis=0, mode="fill", fill_value=0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def to_expert_rows(x: jax.Array, row_assignment: jax.Array, assignment_row: jax.Array, k: int) -> jax.Array:
  """x [tokens, d] -> [rows, d]: row r holds the token of assignment row_assignment[r] (or zeros)."""
  index = jnp.where(row_assignment < assignment_row.shape[0], row_assignment // k, x.shape[0])
  return _take(x, index)


def _to_expert_rows_fwd(x, row_assignment, assignment_row, k):
  return to_expert_rows(x, row_assignment, assignment_row, k), (row_assignment, assignment_row)


def _to_expert_rows_bwd(k, residuals, d_rows):
  _, assignment_row = residuals
  d_assignments = _take(d_rows, assignment_row)  # [tokens * k, d]: token-major
  return d_assignments.reshape(-1, k, d_rows.shape[-1]).sum(axis=1), None, None


to_expert_rows.defvjp(_to_expert_rows_fwd, _to_expert_rows_bwd)


@jax.custom_vjp
def to_assignments(rows: jax.Array, row_assignment: jax.Array, assignment_row: jax.Array) -> jax.Array:
  """rows [rows, d] -> [tokens * k, d]: each assignment's expert output (zeros if it has no row)."""
  return _take(rows, assignment_row)


def _to_assignments_fwd(rows, row_assignment, assignment_row):
  return to_assignments(rows, row_assignment, assignment_row), (row_assignment, assignment_row)


def _to_assignments_bwd(residuals, d_assignments):
  row_assignment, _ = residuals
  return _take(d_assignments, row_assignment), None, None


to_assignments.defvjp(_to_assignments_fwd, _to_assignments_bwd)


def padded_rows(expert: jax.Array, rank: jax.Array, kept: jax.Array, kept_sizes: jax.Array, slots: int,
                overflow_rows: int):
  """Rows of the padded layout from each kept assignment's rank within its expert.

  expert, rank, kept [assignments]; kept_sizes [experts] (how many each keeps). Expert e's
  assignments of rank < slots fill its main rows e * slots + rank; the rest go to overflow rows
  (after all main rows), sorted by expert. Returns (row_assignment [rows], assignment_row
  [assignments], overflow_sizes [experts]); out-of-range entries mean "none". One scatter of
  int32 indices (cheap, unlike scattering rows).
  """
  assignments, num_experts = expert.shape[0], kept_sizes.shape[0]
  main_rows = num_experts * slots
  rows = main_rows + overflow_rows
  overflow_sizes = jnp.maximum(kept_sizes - slots, 0).astype(jnp.int32)
  overflow_starts = jnp.cumsum(overflow_sizes) - overflow_sizes
  safe_expert = jnp.minimum(expert, num_experts - 1)
  row = jnp.where(rank < slots, safe_expert * slots + rank, main_rows + overflow_starts[safe_expert] + rank - slots)
  assignment_row = jnp.where(kept, row, rows).astype(jnp.int32)
  row_assignment = jnp.full((rows,), assignments, jnp.int32).at[assignment_row].set(
      jnp.arange(assignments, dtype=jnp.int32), mode="drop")
  return row_assignment, assignment_row, overflow_sizes

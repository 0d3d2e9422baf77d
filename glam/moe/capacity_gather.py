"""CapacityEinsum's gather placement: the same assignments kept as the one-hot einsums, moved by index.

gather_padded (one device, the CPU default): the kept assignments in Dropless's padded layout, so
the experts compute what is kept and not the empty slots. gather_every_slot (groups or experts
split over devices, or expert dropout in training): every [experts, groups * capacity] slot, as
the einsums lay them out.
"""
import math

import jax
import jax.numpy as jnp

from glam.moe.grouped_matmul import resolve_implementation
from glam.moe.row_maps import capacity_slots, padded_rows, to_assignments, to_expert_rows
from glam.parallel.constraints import constrain

GROUPED_SLOTS = ("batch", None, None, None)  # [groups, experts, capacity, d_model]: groups over the batch axes


def gather_every_slot(x, routing, experts, ctx, capacity: int):
  """Each group gathers its own [experts, capacity] slots (slot = expert * capacity + position),
  then [groups, experts, ...] -> [experts, groups * capacity, ...] for the experts, and back. With
  the groups split over devices the gathers stay local and, with the experts split too, GSPMD
  moves the slots by all-to-all (the einsums' communication) instead of all-gathering tokens."""
  groups, tokens, d_model = x.shape
  num_experts, k = experts.num_experts, routing.expert_index.shape[-1]
  position, _, keep = capacity_slots(routing, num_experts, capacity)  # [groups, tokens, k]
  slots, assignments = num_experts * capacity, tokens * k  # per group
  assignment_row = jnp.where(keep, routing.expert_index * capacity + position, slots).reshape(groups, assignments)
  row_assignment = jax.vmap(lambda rows: jnp.full((slots,), assignments, jnp.int32).at[rows].set(
      jnp.arange(assignments, dtype=jnp.int32), mode="drop"))(assignment_row)  # [groups, slots]; empty -> none
  expert_in = jax.vmap(lambda x, ra, ar: to_expert_rows(x, ra, ar, k))(x, row_assignment, assignment_row)
  expert_in = constrain(expert_in.reshape(groups, num_experts, capacity, d_model), GROUPED_SLOTS)
  expert_in = jnp.swapaxes(expert_in, 0, 1).reshape(num_experts, groups * capacity, d_model)
  out = experts(expert_in, ctx)  # [experts, groups * capacity, d_model]
  out = constrain(jnp.swapaxes(out.reshape(num_experts, groups, capacity, d_model), 0, 1), GROUPED_SLOTS)
  back = jax.vmap(to_assignments)(out.reshape(groups, slots, d_model), row_assignment, assignment_row)
  gates = jnp.where(keep, routing.gates, 0.0).astype(back.dtype)
  y = jnp.einsum("gtkm,gtk->gtm", back.reshape(groups, tokens, k, d_model), gates)  # [groups, tokens, d_model]
  kept_per_expert = jnp.sum(jax.nn.one_hot(routing.expert_index, num_experts) * keep[..., None], axis=(0, 1, 2))
  return y, keep, kept_per_expert


def gather_padded(x, routing, experts, ctx, capacity: int, overflow_chunk: int, padded_capacity_factor: float):
  """The padded layout of Dropless "padded" for the kept assignments: each expert runs its first
  `slots` (padded_capacity_factor times its perfectly balanced load, over all groups) in one batched
  einsum and the rest of what it keeps chunk by chunk. Where the grouped matmul runs on the CBLAS kernel
  (glam/kernels/grouped.py), every kept assignment goes to the sorted rows instead (no slots):
  each expert computes exactly what it keeps. Same result as the einsums."""
  groups, tokens, d_model = x.shape
  num_experts, k = experts.num_experts, routing.expert_index.shape[-1]
  assignments = groups * tokens * k
  position, _, keep = capacity_slots(routing, num_experts, capacity)  # [groups, tokens, k]
  kept_by_group = jnp.sum(jax.nn.one_hot(routing.expert_index, num_experts, dtype=jnp.int32) * keep[..., None],
                          axis=(1, 2))  # [groups, experts]
  earlier_groups = jnp.cumsum(kept_by_group, axis=0) - kept_by_group  # [groups, experts]
  rank = position + jnp.take_along_axis(earlier_groups, routing.expert_index.reshape(groups, tokens * k),
                                        axis=1).reshape(position.shape)  # [groups, tokens, k] within the expert
  kept_sizes = jnp.sum(kept_by_group, axis=0)  # [experts]
  if resolve_implementation("auto", dtype=experts.dtype) == "cblas":
    slots, overflow_rows = 0, min(assignments, num_experts * groups * capacity)  # all sorted by expert
  else:
    slots = min(groups * capacity, max(1, math.ceil(padded_capacity_factor * assignments / num_experts)))
    overflow_rows = max(0, min(assignments - slots, num_experts * (groups * capacity - slots)))
  row_assignment, assignment_row, overflow_sizes = padded_rows(
      routing.expert_index.reshape(assignments), rank.reshape(assignments), keep.reshape(assignments),
      kept_sizes, slots, overflow_rows)
  main_rows = num_experts * slots
  x_tokens = x.reshape(groups * tokens, d_model)
  if slots == 0:
    out = experts.grouped_tokens(x_tokens, row_assignment, assignment_row, k, overflow_sizes, ctx,
                                 implementation="cblas")  # [kept rows, d_model]
  else:
    rows = to_expert_rows(x_tokens, row_assignment, assignment_row, k)
    main_out, overflow_out = experts.padded(rows[:main_rows].reshape(num_experts, slots, d_model),
                                            rows[main_rows:], overflow_sizes, ctx, chunk=overflow_chunk)
    out = jnp.concatenate([main_out.reshape(main_rows, d_model), overflow_out.astype(main_out.dtype)])
  back = to_assignments(out, row_assignment, assignment_row).reshape(groups, tokens, k, d_model)
  y = jnp.einsum("gtkm,gtk->gtm", back, routing.gates.astype(back.dtype))  # [groups, tokens, d_model]
  return y, keep, kept_sizes

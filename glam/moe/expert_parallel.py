"""ExpertParallel: an explicit expert-parallel dispatcher, `jax.shard_map` + two all-to-alls.

GSPMD can shard CapacityEinsum by itself (sharding constraints on the dispatched tensors); this
dispatcher spells the communication out instead (GShard, Lepikhin et al. 2020, section 3.2):

  1. Inside `jax.shard_map` over the current mesh, each device holds its own groups of tokens
     (groups are split over the batch axes "data", "fsdp", "expert") and the experts' weights
     split over "expert": E_local = num_experts / expert_shards experts per device.
  2. Each device places its tokens into capacity buffers for every expert, [E, G_local * C, d],
     with exactly CapacityEinsum's rule (same capacity, same claim order, same drops).
  3. `all_to_all` over "expert" sends each expert's slots to the device that holds it:
     [E_local, expert_shards * G_local * C, d].
  4. The local experts run (their d_ff split over "tensor" when that axis divides it, with a psum).
  5. A second `all_to_all` brings the outputs back, [E, G_local * C, d], and the local combine
     weights them by the gates. Over-capacity assignments get nothing (the residual carries them).

Capacity is per group, as in CapacityEinsum, and a group never straddles devices, so on any mesh
the result equals CapacityEinsum's (drops included), up to float summation order. The groups are
split over the batch shards; when their number does not divide, empty groups (gate 0, no routed
assignment) are appended and cut off again: correct, but the devices holding them idle.

dropless=True sends every routed assignment instead, in fixed worst-case buffers (see the class),
and equals Dropless. Expert-choice routing uses the capacity path (it never drops).

Without a mesh, or with an expert axis of size 1, there is nothing to exchange: it runs the local
CapacityEinsum with the same factors (or Dropless).
"""
import dataclasses
import math

import gin
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from glam.config import ConfigError
from glam.layers.context import dropout
from glam.layers.feedforward import apply_activation
from glam.moe.dispatch import CapacityEinsum, Dropless, capacity_slots, to_assignments, to_expert_rows
from glam.moe.experts import DROPOUT_SALT
from glam.moe.grouped_matmul import IMPLEMENTATIONS, grouped_matmul
from glam.moe.routers import ExpertChoiceRouting, TokenChoiceRouting
from glam.moe.row_maps import sort_by_expert
from glam.parallel.mesh import BATCH_AXES, current_mesh

EXPERT_AXIS = "expert"
TENSOR_AXIS = "tensor"


def _expert_load(kept_per_expert: jax.Array) -> jax.Array:
  kept_per_expert = kept_per_expert.astype(jnp.float32)
  return kept_per_expert / jnp.maximum(jnp.sum(kept_per_expert), 1.0)


def check_expert_axis(num_experts: int, expert_shards: int) -> None:
  """Each device must hold the same whole number of experts."""
  if num_experts % expert_shards:
    raise ConfigError(f"MoeLayer.num_experts={num_experts} is not divisible by the mesh's expert axis of size "
                      f"{expert_shards} (ExpertParallel puts num_experts / expert_shards experts on each device)")


def _pad_groups(array: jax.Array, groups: int, fill=0) -> jax.Array:
  pad = groups - array.shape[0]
  if pad == 0:
    return array
  return jnp.concatenate([array, jnp.full((pad,) + array.shape[1:], fill, array.dtype)], axis=0)


@dataclasses.dataclass(frozen=True)
class _Plan:
  """How one call maps onto the mesh (all static)."""

  token_axes: tuple[str, ...]  # the mesh axes the groups are split over
  token_shards: int
  expert_shards: int
  tensor_axis: str | None  # set when the experts' d_ff is split over "tensor"


def _plan(mesh, experts) -> _Plan:
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
  # Axes of size 1 split nothing; naming them would make the weights' gradients "vary" over them
  # and cost a psum (an all-reduce over one device) per weight.
  token_axes = tuple(name for name in BATCH_AXES if sizes.get(name, 1) > 1)
  tensor = sizes.get(TENSOR_AXIS, 1)
  split_ff = tensor > 1 and experts.d_ff % tensor == 0  # else each tensor shard computes the whole FFN
  return _Plan(token_axes, math.prod(sizes[name] for name in token_axes), sizes[EXPERT_AXIS],
               TENSOR_AXIS if split_ff else None)


def _weight_specs(experts, plan: _Plan) -> dict:
  ff = plan.tensor_axis
  specs = {"wi": P(EXPERT_AXIS, None, ff), "wo": P(EXPERT_AXIS, ff, None)}
  if experts.wi_gate is not None:
    specs["wi_gate"] = P(EXPERT_AXIS, None, ff)
  return specs


def _local_ffn(x: jax.Array, weights: dict, experts, ctx, rng, plan: _Plan, matmul) -> jax.Array:
  """The FFN of the experts this device holds, on their rows.

  Experts.__call__ / .grouped check for all E experts, so the same FFN is written here for the
  local [E_local, ...] slice of the weights; `matmul(rows, w)` is batched or grouped.
  """
  dt = experts.dtype
  x = x.astype(dt)
  hidden = matmul(x, weights["wi"].astype(dt))
  gate = matmul(x, weights["wi_gate"].astype(dt)) if "wi_gate" in weights else None
  hidden = apply_activation(experts.activation, hidden, gate)
  if rng is not None:  # a different dropout mask on every device's slice of the experts
    rng = jax.random.fold_in(rng, jax.lax.axis_index(EXPERT_AXIS))
    if plan.tensor_axis is not None:
      rng = jax.random.fold_in(rng, jax.lax.axis_index(plan.tensor_axis))
  hidden = dropout(hidden, experts.dropout_rate, ctx.with_rng(rng), DROPOUT_SALT)
  out = matmul(hidden, weights["wo"].astype(dt))
  if plan.tensor_axis is not None:  # each tensor shard summed over its part of d_ff
    out = jax.lax.psum(out, plan.tensor_axis)
  return out


def _batched(rows: jax.Array, w: jax.Array) -> jax.Array:
  return jnp.einsum("enm,emf->enf", rows, w)  # [E_local, n, out]


def _exchange(expert_in: jax.Array, weights: dict, experts, ctx, rng, plan: _Plan) -> jax.Array:
  """[E, n, d] slots for every expert -> all_to_all -> local experts -> all_to_all -> [E, n, d]."""
  arrived = jax.lax.all_to_all(expert_in, EXPERT_AXIS, 0, 1, tiled=True)  # [E_local, shards * n, d_model]
  out = _local_ffn(arrived, weights, experts, ctx, rng, plan, _batched)
  return jax.lax.all_to_all(out, EXPERT_AXIS, 1, 0, tiled=True)  # [E, n, d_model]


@gin.configurable
@dataclasses.dataclass(frozen=True)
class ExpertParallel:
  """Expert parallelism by explicit all-to-all (shard_map), with CapacityEinsum's capacity rule.

  capacity = max(min_capacity, ceil(capacity_factor * k * tokens_per_group / experts)), at most
  tokens_per_group, per group of MoeLayer.group_size tokens; each device's buffer for one expert
  holds G_local * capacity slots (its G_local groups), and the expert receives
  expert_shards * G_local * capacity rows.

  Args:
    capacity_factor: in training (GShard / mesh-TF: 1.25).
    eval_capacity_factor: when deterministic (mesh-TF: 2.0).
    min_capacity: lower bound on slots per expert and group (flaxformer: 4).
    implementation: CapacityEinsum's placement when it falls back to local dispatch (no mesh, or
      an expert axis of size 1): "auto", "einsum" or "gather".
    dropless: token choice without capacity: every routed assignment is computed. XLA:CPU has no
      ragged all-to-all, so the exchange keeps fixed shapes sized for the worst case: each device
      sends every other device a buffer of G_local * tokens_per_group * min(k, E_local) rows (all
      its tokens could pick experts of that one device), i.e. expert_shards times the rows of a
      balanced exchange; experts then run a grouped matmul on the rows that arrived. Expert choice
      never drops and ignores this. Without a mesh it is Dropless.
    grouped_implementation, block_size: the dropless grouped matmul (Dropless's bindings):
      "auto", "blocked" or "ragged_dot", and rows per chunk of the blocked one.
  """

  capacity_factor: float = 1.25
  eval_capacity_factor: float = 2.0
  min_capacity: int = 4
  implementation: str = "auto"
  dropless: bool = False
  grouped_implementation: str = "auto"
  block_size: int = 256

  def __post_init__(self):
    for name in ("capacity_factor", "eval_capacity_factor"):
      if not getattr(self, name) > 0:
        raise ValueError(f"ExpertParallel.{name}={getattr(self, name)}: must be > 0")
    if self.min_capacity < 1:
      raise ValueError(f"ExpertParallel.min_capacity={self.min_capacity}: must be >= 1")
    if self.grouped_implementation not in IMPLEMENTATIONS:
      raise ValueError(f"ExpertParallel.grouped_implementation={self.grouped_implementation!r}: expected one of "
                       f"{list(IMPLEMENTATIONS)}")
    try:
      self.local(dropless=False)
      self.local(dropless=True)
    except ValueError as error:
      message = str(error).replace("CapacityEinsum.", "ExpertParallel.")
      raise ValueError(message.replace("Dropless.implementation", "ExpertParallel.grouped_implementation")
                       .replace("Dropless.", "ExpertParallel.")) from None

  def local(self, dropless: bool | None = None):
    """The same dispatch on one device: CapacityEinsum with the same capacity rule, or Dropless."""
    if self.dropless if dropless is None else dropless:
      return Dropless(implementation=self.grouped_implementation, block_size=self.block_size)
    return CapacityEinsum(capacity_factor=self.capacity_factor, eval_capacity_factor=self.eval_capacity_factor,
                          min_capacity=self.min_capacity, implementation=self.implementation)

  def __call__(self, x: jax.Array, routing, experts, ctx) -> tuple[jax.Array, dict]:
    if not isinstance(routing, (TokenChoiceRouting, ExpertChoiceRouting)):
      raise TypeError(f"ExpertParallel: unknown routing {type(routing).__name__}")
    mesh = current_mesh()
    dropless = self.dropless and isinstance(routing, TokenChoiceRouting)
    if mesh is None or EXPERT_AXIS not in mesh.axis_names:
      return self.local(dropless)(x, routing, experts, ctx)
    plan = _plan(mesh, experts)
    check_expert_axis(experts.num_experts, plan.expert_shards)
    if plan.expert_shards == 1:
      return self.local(dropless)(x, routing, experts, ctx)
    rng = ctx.rng if experts.dropout_rate > 0 and not ctx.deterministic else None
    if isinstance(routing, ExpertChoiceRouting):
      return _expert_choice(x, routing, experts, ctx, rng, plan)
    if dropless:
      return self._dropless(x, routing, experts, ctx, rng, plan)
    return self._token_choice(x, routing, experts, ctx, rng, plan)

  def _token_choice(self, x, routing: TokenChoiceRouting, experts, ctx, rng, plan: _Plan):
    groups, tokens, d_model = x.shape
    num_experts, k = experts.num_experts, routing.expert_index.shape[-1]
    capacity = self.local().capacity(tokens, num_experts, k, ctx.deterministic)
    padded = -(-groups // plan.token_shards) * plan.token_shards
    inputs = {"x": _pad_groups(x, padded), "expert_index": _pad_groups(routing.expert_index, padded),
              "gates": _pad_groups(routing.gates, padded)}  # gate 0: the empty groups route nothing
    if routing.priority is not None:
      inputs["priority"] = _pad_groups(routing.priority, padded)
    rows_spec = P(plan.token_axes)
    weight_specs = _weight_specs(experts, plan)
    weights = {name: getattr(experts, name)[...] for name in weight_specs}

    def per_device(inputs, weights, rng):
      local_groups = inputs["x"].shape[0]
      local = TokenChoiceRouting(inputs["expert_index"], inputs["gates"], None, None, inputs.get("priority"))
      position, active, keep = capacity_slots(local, num_experts, capacity)  # [G_local, tokens, k]
      # Slot row = (expert * G_local + group) * capacity + position, so that the rows of one expert
      # are contiguous and all_to_all can cut the buffer at expert boundaries.
      rows = num_experts * local_groups * capacity
      assignments = local_groups * tokens * k
      group = jnp.arange(local_groups, dtype=jnp.int32)[:, None, None]
      slot = (local.expert_index * local_groups + group) * capacity + position  # [G_local, tokens, k]
      assignment_row = jnp.where(keep, slot, rows).reshape(assignments)  # dropped -> no row
      row_assignment = jnp.full((rows,), assignments, jnp.int32).at[assignment_row].set(
          jnp.arange(assignments, dtype=jnp.int32), mode="drop")  # empty slot -> no assignment
      expert_in = to_expert_rows(inputs["x"].reshape(local_groups * tokens, d_model), row_assignment,
                                 assignment_row, k)  # [rows, d_model]
      expert_in = expert_in.reshape(num_experts, local_groups * capacity, d_model)
      out = _exchange(expert_in, weights, experts, ctx, rng, plan)  # [E, G_local * capacity, d_model]
      back = to_assignments(out.reshape(rows, d_model), row_assignment, assignment_row)
      back = back.reshape(local_groups, tokens, k, d_model)
      gates = jnp.where(keep, local.gates, 0.0).astype(back.dtype)
      y = jnp.einsum("gtkm,gtk->gtm", back, gates)  # [G_local, tokens, d_model]
      kept = jnp.sum(jax.nn.one_hot(local.expert_index, num_experts) * keep[..., None], axis=(0, 1, 2))  # [E]
      counts = jnp.stack([jnp.sum(keep), jnp.sum(active)]).astype(jnp.float32)
      return y, jax.lax.psum(kept, plan.token_axes), jax.lax.psum(counts, plan.token_axes)

    rng_spec = None if rng is None else P()
    y, kept, counts = jax.shard_map(
        per_device, in_specs=({name: rows_spec for name in inputs}, weight_specs, rng_spec),
        out_specs=(rows_spec, P(), P()))(inputs, weights, rng)
    dropped = 1.0 - counts[0] / jnp.maximum(counts[1], 1.0)
    return y[:groups], {"dropped_fraction": dropped.astype(jnp.float32), "expert_load": _expert_load(kept)}

  def _dropless(self, x, routing: TokenChoiceRouting, experts, ctx, rng, plan: _Plan):
    groups, tokens, d_model = x.shape
    num_experts, k = experts.num_experts, routing.expert_index.shape[-1]
    shards = plan.expert_shards
    local_experts = num_experts // shards
    padded = -(-groups // plan.token_shards) * plan.token_shards
    inputs = {"x": _pad_groups(x, padded), "expert_index": _pad_groups(routing.expert_index, padded),
              "gates": _pad_groups(routing.gates, padded)}
    rows_spec = P(plan.token_axes)
    weight_specs = _weight_specs(experts, plan)
    weights = {name: getattr(experts, name)[...] for name in weight_specs}

    def per_device(inputs, weights, rng):
      local_groups = inputs["x"].shape[0]
      assignments = local_groups * tokens * k
      bound = local_groups * tokens * min(k, local_experts)  # rows this device may send to one device
      send_rows = shards * bound
      gates = inputs["gates"].reshape(assignments)
      expert = jnp.where(gates > 0, inputs["expert_index"].reshape(assignments), num_experts)  # unrouted: last
      # Sorting by expert groups the assignments by destination device (experts are split in
      # contiguous blocks); an assignment's row is destination * bound + its rank there.
      order, _, sent = sort_by_expert(expert, num_experts)  # sorted position -> assignment; [E] (unrouted: none)
      per_device_sent = jnp.sum(sent.reshape(shards, local_experts), axis=1)  # [shards]
      device_start = jnp.cumsum(per_device_sent) - per_device_sent
      destination = jnp.take(expert, order) // local_experts  # [assignments], shards when unrouted
      rank = jnp.arange(assignments, dtype=jnp.int32) - jnp.take(device_start, destination, mode="clip")
      sorted_row = jnp.where(destination < shards, destination * bound + rank, send_rows)
      assignment_row = jnp.zeros((assignments,), jnp.int32).at[order].set(sorted_row, unique_indices=True)
      row_assignment = jnp.full((send_rows,), assignments, jnp.int32).at[assignment_row].set(
          jnp.arange(assignments, dtype=jnp.int32), mode="drop")  # empty row -> no assignment
      row_expert = jnp.full((send_rows,), local_experts, jnp.int32).at[assignment_row].set(
          expert % local_experts, mode="drop")  # the local expert on the destination; empty: past the last
      send = to_expert_rows(inputs["x"].reshape(local_groups * tokens, d_model), row_assignment, assignment_row, k)
      arrived = jax.lax.all_to_all(send.reshape(shards, bound, d_model), EXPERT_AXIS, 0, 0, tiled=True)
      arrived_expert = jax.lax.all_to_all(row_expert.reshape(shards, bound), EXPERT_AXIS, 0, 0, tiled=True)
      # [shards (sources), bound, d_model]: sort the rows by local expert for the grouped matmul.
      arrived_expert = arrived_expert.reshape(send_rows)
      by_expert, arrival, group_sizes = sort_by_expert(arrived_expert, local_experts)  # sorted <-> arrived row
      rows = to_expert_rows(arrived.reshape(send_rows, d_model), by_expert, arrival, 1)  # [send_rows, d_model]

      def matmul(rows, w):
        return grouped_matmul(rows, w, group_sizes, implementation=self.grouped_implementation,
                              block_size=self.block_size)  # [send_rows, out]

      out = _local_ffn(rows, weights, experts, ctx, rng, plan, matmul)
      out = to_assignments(out, by_expert, arrival)  # arrival order again
      returned = jax.lax.all_to_all(out.reshape(shards, bound, d_model), EXPERT_AXIS, 0, 0, tiled=True)
      back = to_assignments(returned.reshape(send_rows, d_model), row_assignment, assignment_row)
      back = back.reshape(local_groups, tokens, k, d_model)
      y = jnp.einsum("gtkm,gtk->gtm", back, inputs["gates"].astype(back.dtype))  # [G_local, tokens, d_model]
      return y, jax.lax.psum(sent.astype(jnp.float32), plan.token_axes)

    rng_spec = None if rng is None else P()
    # check_vma=False: grouped_matmul's loops start from zeros that do not vary over the mesh axes,
    # which the check refuses; tests/test_moe_expert_parallel.py checks the gradients on each mesh.
    y, kept = jax.shard_map(per_device, in_specs=({name: rows_spec for name in inputs}, weight_specs, rng_spec),
                            out_specs=(rows_spec, P()), check_vma=False)(inputs, weights, rng)
    return y[:groups], {"dropped_fraction": jnp.zeros((), jnp.float32), "expert_load": _expert_load(kept)}


def _expert_choice(x, routing: ExpertChoiceRouting, experts, ctx, rng, plan: _Plan):
  """Expert choice: each expert's slots are its chosen tokens of the group; nothing drops."""
  groups, tokens, d_model = x.shape
  num_experts, capacity = routing.token_index.shape[1:]
  padded = -(-groups // plan.token_shards) * plan.token_shards
  inputs = {"x": _pad_groups(x, padded), "token_index": _pad_groups(routing.token_index, padded),
            "gates": _pad_groups(routing.gates, padded)}
  rows_spec = P(plan.token_axes)
  weight_specs = _weight_specs(experts, plan)
  weights = {name: getattr(experts, name)[...] for name in weight_specs}

  def per_device(inputs, weights, rng):
    x, gates = inputs["x"], inputs["gates"]
    local_groups = x.shape[0]
    index = inputs["token_index"].reshape(local_groups, num_experts * capacity)
    expert_in = jnp.take_along_axis(x, index[..., None], axis=1, mode="clip")  # [G_local, E * capacity, d_model]
    expert_in = jnp.swapaxes(expert_in.reshape(local_groups, num_experts, capacity, d_model), 0, 1)
    out = _exchange(expert_in.reshape(num_experts, local_groups * capacity, d_model), weights, experts, ctx,
                    rng, plan)  # [E, G_local * capacity, d_model]
    out = jnp.swapaxes(out.reshape(num_experts, local_groups, capacity, d_model), 0, 1)  # [G_local, E, C, d_model]
    weighted = (out * gates[..., None].astype(out.dtype)).reshape(-1, d_model)
    flat_token = (jnp.arange(local_groups, dtype=jnp.int32)[:, None] * tokens + index).reshape(-1)
    y = jnp.zeros((local_groups * tokens, d_model), out.dtype).at[flat_token].add(weighted)  # sums over experts
    kept = jnp.sum(gates > 0, axis=(0, 2)).astype(jnp.float32)  # [E]
    return y.reshape(local_groups, tokens, d_model), jax.lax.psum(kept, plan.token_axes)

  rng_spec = None if rng is None else P()
  y, kept = jax.shard_map(per_device, in_specs=({name: rows_spec for name in inputs}, weight_specs, rng_spec),
                          out_specs=(rows_spec, P()))(inputs, weights, rng)
  return y[:groups], {"dropped_fraction": jnp.zeros((), jnp.float32), "expert_load": _expert_load(kept)}

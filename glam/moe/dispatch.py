"""Dispatchers move tokens to experts and back: dispatcher(x, routing, experts, ctx) -> (y, stats).

CapacityEinsum (GShard / flaxformer): every expert has a fixed number of slots per group. Token
choice: the dispatch and combine tensors [groups, tokens, experts, capacity] place assignments in
slots and bring the gated outputs back; assignments past capacity are dropped (the token gets
nothing from that expert; the residual connection around the layer carries it). On CPU the kept
assignments use Dropless's layout instead (below: sorted on the CBLAS kernel, else padded), so empty slots
cost nothing. Expert choice: each expert's slots are its chosen tokens, so nothing is dropped.

Dropless: nothing is dropped. Sorted (GPU/TPU; one CPU device with the CBLAS kernel; or "blocked"): sort the
(token, choice) assignments by expert, run the experts' grouped matmuls on the sorted rows, unsort
and combine. Padded (other CPU set-ups): each expert's first C assignments fill C slots run as one
batched einsum, the rest run chunk by chunk (glam/moe/chunked_ffn.py).

stats: "dropped_fraction" (routed assignments, gate > 0, dropped for capacity) and "expert_load"
[experts] (each expert's share of the kept assignments; zeros if nothing was kept).
"""
import dataclasses
import math

import gin
import jax
import jax.numpy as jnp

from glam.moe.capacity_gather import gather_every_slot, gather_padded
from glam.moe.grouped_matmul import IMPLEMENTATIONS, resolve_implementation
from glam.moe.routers import ExpertChoiceRouting, TokenChoiceRouting
from glam.moe.row_maps import _take, capacity_slots, sort_by_expert, to_assignments, to_expert_rows
from glam.parallel.mesh import batch_shards

CAPACITY_IMPLEMENTATIONS = ("auto", "einsum", "gather")


def _expert_load(kept_per_expert: jax.Array) -> jax.Array:
  kept_per_expert = kept_per_expert.astype(jnp.float32)
  return kept_per_expert / jnp.maximum(jnp.sum(kept_per_expert), 1.0)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class CapacityEinsum:
  """Fixed expert capacity per group, GShard style.

  capacity = max(min_capacity, ceil(capacity_factor * k * tokens_per_group / experts)), at most
  tokens_per_group. DECISION: it multiplies by k, so capacity_factor 1.0 is exactly enough at
  perfect balance (GShard / mesh-TF's int(group_size * cf / E) is shared by both top-2 choices
  instead). The cap is tokens_per_group, not tokens * k: top-k picks k distinct experts, so one
  expert never receives more than one assignment per token (one token per group when decoding
  gives capacity 1). Expert choice brings its own capacity (the router's); these factors do not
  apply to it. Its gather placement sends every expert's chosen tokens (the same count for each)
  through Experts' batched matmuls, or, where the fused expert FFN runs (one CPU device), through
  the kernel, which gathers the tokens itself: at 4096 tokens, d_model 256, 32 experts, c = 2 the
  layer's forward+backward went from 1.31x to 1.08-1.21x an equal-FLOP dense FFN (2026-12-08, AMD
  EPYC, OpenBLAS; scripts/bench_moe_layer.py's expert_choice row).

  Args:
    capacity_factor: in training (GShard / mesh-TF: 1.25).
    eval_capacity_factor: when deterministic (mesh-TF: 2.0).
    min_capacity: lower bound on slots per expert (flaxformer: 4).
    implementation: "einsum" (the one-hot dispatch/combine einsums, which GSPMD turns into
      all-to-alls), "gather" (index gathers, without the einsums' groups*tokens*experts*capacity*
      d_model FLOPs, into the padded layout of Dropless "padded": each expert's kept assignments
      fill its slots (a little over its balanced share), the few past them run chunk by chunk, so
      the experts compute the kept assignments and few empty slots; on CPU at 2048 tokens, d_model
      512, 8 experts, top-2 the layer's forward+backward is 1.15-1.26x a dense FFN's, against 2.0-2.4x for
      einsum; where the grouped matmul runs on the CBLAS kernel (one CPU device), the kept assignments go
      to it sorted by expert instead, no slots at all), or "auto" (einsum on GPU/TPU, gather elsewhere).
      All give the same result. With groups or experts split over devices, or expert dropout in
      training, "gather" runs every [experts, groups * capacity] slot as the einsums do.
    overflow_chunk: rows per step of the gather placement's pass over the assignments past an
      expert's slots in the padded layout (see glam/moe/chunked_ffn.py).
    padded_capacity_factor: slots per expert in the gather placement's padded layout, as a multiple
      of the perfectly balanced load (at most the capacity); see Dropless.padded_capacity_factor
      for why the default has slack.
  """

  capacity_factor: float = 1.25
  eval_capacity_factor: float = 2.0
  min_capacity: int = 4
  implementation: str = "auto"
  overflow_chunk: int = 32
  padded_capacity_factor: float = 1.0625

  def __post_init__(self):
    for name in ("capacity_factor", "eval_capacity_factor", "padded_capacity_factor"):
      if not getattr(self, name) > 0:
        raise ValueError(f"CapacityEinsum.{name}={getattr(self, name)}: must be > 0")
    if self.min_capacity < 1:
      raise ValueError(f"CapacityEinsum.min_capacity={self.min_capacity}: must be >= 1")
    if self.overflow_chunk < 1:
      raise ValueError(f"CapacityEinsum.overflow_chunk={self.overflow_chunk}: must be >= 1")
    if self.implementation not in CAPACITY_IMPLEMENTATIONS:
      raise ValueError(f"CapacityEinsum.implementation={self.implementation!r}: expected one of "
                       f"{list(CAPACITY_IMPLEMENTATIONS)}")

  def capacity(self, tokens_per_group: int, num_experts: int, k: int, deterministic: bool) -> int:
    factor = self.eval_capacity_factor if deterministic else self.capacity_factor
    slots = max(self.min_capacity, math.ceil(factor * k * tokens_per_group / num_experts))
    return int(min(slots, tokens_per_group))

  def uses_einsum(self) -> bool:
    if self.implementation == "auto":
      return jax.default_backend() in ("gpu", "tpu")
    return self.implementation == "einsum"

  def __call__(self, x: jax.Array, routing, experts, ctx) -> tuple[jax.Array, dict]:
    if isinstance(routing, ExpertChoiceRouting):
      return self._expert_choice(x, routing, experts, ctx)
    if not isinstance(routing, TokenChoiceRouting):
      raise TypeError(f"CapacityEinsum: unknown routing {type(routing).__name__}")
    groups, tokens, d_model = x.shape
    num_experts, k = experts.num_experts, routing.expert_index.shape[-1]
    capacity = self.capacity(tokens, num_experts, k, ctx.deterministic)
    if self.uses_einsum():
      position, active, keep = capacity_slots(routing, num_experts, capacity)
      gates = jnp.where(keep, routing.gates, 0.0)  # [groups, tokens, k]
      to_expert = jax.nn.one_hot(routing.expert_index, num_experts, dtype=x.dtype) * keep[..., None]  # [g, t, k, e]
      to_slot = jax.nn.one_hot(position, capacity, dtype=x.dtype)  # [groups, tokens, k, capacity]
      dispatch = jnp.einsum("gtke,gtkc->gtec", to_expert, to_slot)  # [groups, tokens, experts, capacity]
      combine = jnp.einsum("gtke,gtkc,gtk->gtec", to_expert, to_slot, gates.astype(x.dtype))  # same shape
      expert_in = jnp.einsum("gtec,gtm->egcm", dispatch, x)  # [experts, groups, capacity, d_model]
      out = experts(expert_in.reshape(num_experts, groups * capacity, d_model), ctx)
      out = out.reshape(num_experts, groups, capacity, d_model)
      y = jnp.einsum("gtec,egcm->gtm", combine.astype(out.dtype), out)  # [groups, tokens, d_model]
      kept_per_expert = jnp.sum(jax.nn.one_hot(routing.expert_index, num_experts) * keep[..., None], axis=(0, 1, 2))
    elif self._every_slot(experts, ctx):
      y, keep, kept_per_expert = gather_every_slot(x, routing, experts, ctx, capacity)
    else:
      y, keep, kept_per_expert = gather_padded(x, routing, experts, ctx, capacity, self.overflow_chunk,
                                               self.padded_capacity_factor)
    active = routing.gates > 0
    dropped = 1.0 - jnp.sum(keep) / jnp.maximum(jnp.sum(active), 1)
    return y, {"dropped_fraction": dropped.astype(jnp.float32), "expert_load": _expert_load(kept_per_expert)}

  def _every_slot(self, experts, ctx) -> bool:
    """Whether the gather placement runs every [experts, groups * capacity] slot through `experts` (as
    the einsums do) instead of the padded layout: when the groups or experts are split over devices
    (the padded layout mixes groups in each expert's rows and loops over experts; the slots keep
    each group's rows on its device), and with expert dropout in training (the einsums' dropout mask)."""
    return batch_shards() > 1 or (getattr(experts, "dropout_rate", 0) > 0 and not ctx.deterministic)

  def _expert_choice(self, x: jax.Array, routing: ExpertChoiceRouting, experts, ctx):
    groups, tokens, d_model = x.shape
    num_experts, capacity = routing.token_index.shape[1:]
    gates = routing.gates
    if self.uses_einsum():
      dispatch = jax.nn.one_hot(routing.token_index, tokens, dtype=x.dtype)  # [groups, experts, capacity, tokens]
      expert_in = jnp.einsum("gect,gtm->egcm", dispatch, x)  # [experts, groups, capacity, d_model]
      out = experts(expert_in.reshape(num_experts, groups * capacity, d_model), ctx)
      out = out.reshape(num_experts, groups, capacity, d_model)
      combine = dispatch.astype(out.dtype) * gates[..., None].astype(out.dtype)  # [groups, experts, capacity, tokens]
      y = jnp.einsum("gect,egcm->gtm", combine, out)  # [groups, tokens, d_model]
    else:
      index = routing.token_index.reshape(groups, num_experts * capacity)
      flat_token = jnp.arange(groups, dtype=jnp.int32)[:, None] * tokens + index  # [groups, e * c] into g * t
      x_tokens = x.reshape(groups * tokens, d_model)
      group_sizes = jnp.full((num_experts,), groups * capacity, jnp.int32)
      if experts.runs_fused(x_tokens, group_sizes, ctx, rows=flat_token.size):
        # each expert's rows, expert-major; the kernel gathers them from the tokens (and sums their
        # gradients per token) itself, so no [experts, groups * capacity, d_model] copy of x is made
        row_token = jnp.swapaxes(flat_token.reshape(groups, num_experts, capacity), 0, 1).reshape(-1)  # [e * g * c]
        out = experts.fused_ffn(x_tokens, row_token, group_sizes)  # [e * g * c, d_model]
      else:
        expert_in = jnp.take_along_axis(x, index[..., None], axis=1, mode="clip")  # [groups, e * c, d_model]
        expert_in = jnp.swapaxes(expert_in.reshape(groups, num_experts, capacity, d_model), 0, 1)
        out = experts(expert_in.reshape(num_experts, groups * capacity, d_model), ctx)
      out = jnp.swapaxes(out.reshape(num_experts, groups, capacity, d_model), 0, 1)  # [g, experts, capacity, d_model]
      weighted = (out * gates[..., None].astype(out.dtype)).reshape(groups * num_experts * capacity, d_model)
      flat_token = flat_token.reshape(-1)
      y = jnp.zeros((groups * tokens, d_model), out.dtype).at[flat_token].add(weighted)  # sums over experts
      y = y.reshape(groups, tokens, d_model)
    kept_per_expert = jnp.sum(gates > 0, axis=(0, 2))
    return y, {"dropped_fraction": jnp.zeros((), jnp.float32), "expert_load": _expert_load(kept_per_expert)}


DROPLESS_IMPLEMENTATIONS = IMPLEMENTATIONS + ("padded",)


def padded_dropless_maps(expert: jax.Array, num_experts: int, capacity: int, overflow_rows: int):
  """Where each assignment goes in the padded layout: main slots [experts, capacity], then overflow.

  expert [assignments] int32 (num_experts = not routed). Assignments keep token order within their
  expert; the first `capacity` of each expert fill its slots (row expert * capacity + position), the
  rest go to the overflow rows (row experts * capacity + j), which are sorted by expert.
  Returns (row_assignment [rows], assignment_row [assignments], sizes [experts], overflow_sizes
  [experts]); map entries out of range mean "none". Built from one sort, gathers and a scatter of int32
  indices (scatters of rows are what is slow on XLA:CPU).
  """
  assignments = expert.shape[0]
  order, inverse, sizes = sort_by_expert(expert, num_experts)  # [assignments], [assignments], [experts]
  starts = jnp.cumsum(sizes) - sizes
  overflow_sizes = jnp.maximum(sizes - capacity, 0)
  overflow_ends = jnp.cumsum(overflow_sizes)
  overflow_starts = overflow_ends - overflow_sizes
  main_rows = num_experts * capacity
  none = main_rows + overflow_rows

  routed = expert < num_experts
  safe_expert = jnp.minimum(expert, num_experts - 1)
  position = inverse - starts[safe_expert]  # [assignments] rank within the expert, token order
  overflow_row = main_rows + overflow_starts[safe_expert] + position - capacity
  assignment_row = jnp.where(position < capacity, safe_expert * capacity + position, overflow_row)
  assignment_row = jnp.where(routed, assignment_row, none)

  slot = jnp.arange(capacity, dtype=jnp.int32)
  main_sorted = starts[:, None] + slot  # [experts, capacity] sorted position of each slot
  main_assignment = jnp.where((slot < sizes[:, None]).reshape(-1), _take(order, main_sorted.reshape(-1)),
                              assignments)
  j = jnp.arange(overflow_rows, dtype=jnp.int32)
  owner = jnp.searchsorted(overflow_ends, j, side="right").astype(jnp.int32)  # [overflow_rows] expert
  safe_owner = jnp.minimum(owner, num_experts - 1)
  overflow_sorted = starts[safe_owner] + capacity + j - overflow_starts[safe_owner]
  overflow_assignment = jnp.where(owner < num_experts, _take(order, overflow_sorted), assignments)
  row_assignment = jnp.concatenate([main_assignment, overflow_assignment])
  return row_assignment, assignment_row.astype(jnp.int32), sizes, overflow_sizes.astype(jnp.int32)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class Dropless:
  """Every routed assignment is computed: nothing is dropped.

  Choices with gate 0 (not routed) skip the experts. Two layouts:
  - "cblas" / "ragged_dot" / "blocked" (sorted): sort every assignment by expert and run the grouped
    matmul on all of them. "ragged_dot" is native on GPU/TPU (on CPU a fallback doing num_experts
    times the work); "cblas" (the default on one CPU device where the CBLAS kernel loads: oneMKL or
    OpenBLAS) is one sgemm per expert over exactly its rows, the whole expert FFN in one custom call
    each way (glam/kernels/expert_ffn.py); "blocked" the
    portable XLA loop (glam/moe/grouped_matmul.py).
  - "padded" (the CPU default elsewhere: several devices, no kernel, other dtypes): each expert
    gets `capacity = ceil(padded_capacity_factor * k * tokens / experts)` slots filled in token
    order and run as one batched einsum (as fast as a dense FFN of the same FLOPs on XLA:CPU);
    assignments past an expert's slots go to overflow rows, sorted by expert and run chunk by chunk
    through the whole expert FFN, which only computes the rows that are there
    (glam/moe/chunked_ffn.py). Moving rows in and out is one gather each way (custom backward: the
    inverse gather), never a scatter.

  Args:
    implementation: "auto" (ragged_dot on GPU/TPU, cblas where grouped_matmul's "auto" picks it,
      padded elsewhere), "padded", "cblas", "blocked" or "ragged_dot".
    block_size: rows per full chunk of the blocked grouped matmul (tails use eighths of it).
    padded_capacity_factor: slots per expert in the padded layout, as a multiple of the perfectly
      balanced load (1.0: no padding at perfect balance; larger: fewer overflow rows, more padding).
      DECISION: 1.0625 by default. Each expert with overflow rows costs its own pass: its weights
      are copied out and streamed through matmuls of a few rows, forward and backward, about 5 ms
      at d_model 512 / d_ff 1024 on the 2-core CPU, as much as 3-4% more slots for every expert.
      So slack that absorbs an ordinary imbalance is cheaper: with a random router's top-2 at 2048
      tokens, 8 experts (the busiest takes 1.05x its share) the layer went from 1.28-1.35x an
      equal-FLOP dense FFN at 1.0 to 1.18-1.24x, and top-1 (1.09x) from 1.45-1.50x to 1.31-1.35x;
      1.125 was no better (scripts/bench_moe_layer.py, 2026-11-25).
    overflow_chunk: rows per step of the padded layout's overflow pass (each step runs a whole
      expert FFN on that many rows; see glam/moe/chunked_ffn.py).
  """

  implementation: str = "auto"
  block_size: int = 256
  padded_capacity_factor: float = 1.0625
  overflow_chunk: int = 32

  def __post_init__(self):
    if self.implementation not in DROPLESS_IMPLEMENTATIONS:
      raise ValueError(f"Dropless.implementation={self.implementation!r}: expected one of "
                       f"{list(DROPLESS_IMPLEMENTATIONS)}")
    if self.block_size < 1:
      raise ValueError(f"Dropless.block_size={self.block_size}: must be >= 1")
    if self.overflow_chunk < 1:
      raise ValueError(f"Dropless.overflow_chunk={self.overflow_chunk}: must be >= 1")
    if not self.padded_capacity_factor > 0:
      raise ValueError(f"Dropless.padded_capacity_factor={self.padded_capacity_factor}: must be > 0")

  def resolved_implementation(self, dtype=jnp.float32) -> str:
    if self.implementation == "auto":
      grouped = resolve_implementation("auto", dtype=dtype)  # ragged_dot (GPU/TPU), cblas or blocked
      return "padded" if grouped == "blocked" else grouped
    return self.implementation

  def __call__(self, x: jax.Array, routing, experts, ctx) -> tuple[jax.Array, dict]:
    if isinstance(routing, ExpertChoiceRouting):
      raise TypeError("Dropless takes token-choice routing; expert choice already has a fixed capacity per "
                      "expert: use MoeLayer.dispatcher = @CapacityEinsum()")
    groups, tokens, d_model = x.shape
    num_experts, k = experts.num_experts, routing.expert_index.shape[-1]
    assignments = groups * tokens * k
    gates = routing.gates.reshape(assignments)
    expert = jnp.where(gates > 0, routing.expert_index.reshape(assignments), num_experts)  # not routed -> last
    if self.resolved_implementation(experts.dtype) == "padded":
      back, group_sizes = self._padded(x.reshape(groups * tokens, d_model), expert, k, experts, ctx)
    else:
      back, group_sizes = self._sorted(x.reshape(groups * tokens, d_model), expert, k, experts, ctx)
    back = back.reshape(groups, tokens, k, d_model)  # token-major
    y = jnp.einsum("gtkm,gtk->gtm", back, routing.gates.astype(back.dtype))  # [groups, tokens, d_model]
    return y, {"dropped_fraction": jnp.zeros((), jnp.float32), "expert_load": _expert_load(group_sizes)}

  def padded_capacity(self, assignments: int, num_experts: int) -> int:
    return max(1, min(assignments, math.ceil(self.padded_capacity_factor * assignments / num_experts)))

  def _padded(self, x_tokens, expert, k, experts, ctx):
    """x_tokens [tokens, d_model] -> (each assignment's expert output [assignments, d_model], sizes)."""
    num_experts, d_model = experts.num_experts, x_tokens.shape[-1]
    assignments = expert.shape[0]
    capacity = self.padded_capacity(assignments, num_experts)
    main_rows = num_experts * capacity
    overflow_rows = assignments - capacity  # the most there can be: every assignment in one expert
    row_assignment, assignment_row, sizes, overflow_sizes = padded_dropless_maps(
        expert, num_experts, capacity, overflow_rows)
    rows = to_expert_rows(x_tokens, row_assignment, assignment_row, k)  # [main + overflow rows, d_model]
    main, overflow = experts.padded(rows[:main_rows].reshape(num_experts, capacity, d_model), rows[main_rows:],
                                    overflow_sizes, ctx, chunk=self.overflow_chunk)  # [E, C, d_model], [overflow, d_model]
    out = jnp.concatenate([main.reshape(main_rows, d_model), overflow.astype(main.dtype)])
    return to_assignments(out, row_assignment, assignment_row), sizes

  def _sorted(self, x_tokens, expert, k, experts, ctx):
    order, inverse, group_sizes = sort_by_expert(expert, experts.num_experts)  # sorted row <-> assignment
    out = experts.grouped_tokens(x_tokens, order, inverse, k, group_sizes, ctx, implementation=self.implementation,
                                 block_size=self.block_size)  # [assignments, d_model] in expert order
    return to_assignments(out, order, inverse), group_sizes

"""CapacityEinsum's gather placement (the padded layout of the kept assignments) equals the einsums."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from glam.layers.context import LayerContext
from glam.moe.dispatch import CapacityEinsum
from glam.moe.experts import Experts
from glam.moe.layer import MoeLayer
from glam.moe.routers import TokenChoiceRouting
from glam.moe.row_maps import padded_rows
from glam.parallel.hlo_stats import collective_stats
from glam.parallel.mesh import MESH_AXES

D_MODEL, EXPERTS, GROUPS, TOKENS = 8, 4, 3, 20
TRAIN = LayerContext(mask=None, query_positions=None, key_positions=None, deterministic=False,
                     rng=jax.random.key(0))


def skewed_routing(k: int, prioritized: bool, seed: int = 0) -> TokenChoiceRouting:
  """Top-k of skewed logits (expert 0 is popular, so it overflows its balanced share and drops);
  one choice has gate 0 (not routed); priority ranks tokens by their top-1 probability."""
  logits = jax.random.normal(jax.random.key(seed), (GROUPS, TOKENS, EXPERTS)) + jnp.array([1.5, 0.5, 0, 0])
  probs = jax.nn.softmax(logits)
  gates, index = jax.lax.top_k(probs, k)
  gates = gates.at[1, 4, 0].set(0.0)
  priority = None
  if prioritized:
    priority = jnp.argsort(jnp.argsort(-probs.max(-1), axis=-1), axis=-1).astype(jnp.int32)
  return TokenChoiceRouting(index.astype(jnp.int32), gates, probs, logits, priority)


def forward_and_grads(dispatcher, experts, x, routing, ctx=TRAIN):
  graphdef, params = nnx.split(experts)
  cotangent = jax.random.normal(jax.random.key(9), x.shape)

  def loss(params, x, gates):
    y, stats = dispatcher(x, routing._replace(gates=gates), nnx.merge(graphdef, params), ctx)
    return jnp.sum(y * cotangent), (y, stats)

  (_, (y, stats)), grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))(params, x, routing.gates)
  return y, stats, grads


def assert_same(got, want):
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, atol=1e-5)


def test_padded_rows_fill_slots_then_overflow_sorted_by_expert():
  # 6 assignments, 2 experts, 2 slots each: expert 0 keeps ranks 0..2 (rank 2 overflows), expert 1
  # keeps ranks 0 and 1; assignment 5 is dropped.
  expert = jnp.array([0, 1, 0, 0, 1, 1], jnp.int32)
  rank = jnp.array([1, 0, 0, 2, 1, 2], jnp.int32)
  kept = jnp.array([True, True, True, True, True, False])
  row_assignment, assignment_row, overflow_sizes = padded_rows(expert, rank, kept, jnp.array([3, 2]), 2, 3)
  np.testing.assert_array_equal(overflow_sizes, [1, 0])
  np.testing.assert_array_equal(assignment_row, [1, 2, 0, 4, 3, 7])  # 7 = none
  np.testing.assert_array_equal(row_assignment, [2, 0, 1, 4, 3, 6, 6])  # 6 = none


@pytest.mark.parametrize("k,prioritized,factor,slack", [(2, False, 1.3, 1.0), (2, True, 1.3, 1.0625),
                                                       (1, True, 0.5, 1.0625)])
def test_gather_equals_einsum_with_drops_forward_and_gradients(k, prioritized, factor, slack):
  # factor 1.3: experts keep more than their padded slots (overflow pass) and expert 0 drops;
  # factor 0.5: the capacity is below the balanced share (no overflow rows), many drops.
  # slack (padded_capacity_factor) moves rows between the slots and the overflow pass only.
  experts = Experts(D_MODEL, EXPERTS, d_ff=16, activation="swiglu", rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (GROUPS, TOKENS, D_MODEL))
  routing = skewed_routing(k, prioritized)
  want = forward_and_grads(CapacityEinsum(factor, factor, 1, implementation="einsum"), experts, x, routing)
  got = forward_and_grads(CapacityEinsum(factor, factor, 1, implementation="gather", overflow_chunk=3,
                                         padded_capacity_factor=slack), experts, x, routing)
  assert float(want[1]["dropped_fraction"]) > 0.05  # the comparison covers drops
  assert_same(got, want)


def test_gather_with_expert_dropout_uses_the_einsums_slots_and_mask():
  experts = Experts(D_MODEL, EXPERTS, d_ff=16, activation="gelu", dropout_rate=0.5, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (GROUPS, TOKENS, D_MODEL))
  routing = skewed_routing(2, False)
  want = forward_and_grads(CapacityEinsum(1.3, implementation="einsum"), experts, x, routing)
  got = forward_and_grads(CapacityEinsum(1.3, implementation="gather"), experts, x, routing)
  assert_same(got, want)


def test_gather_moves_tokens_with_all_to_all_under_an_expert_mesh():
  # Each group gathers its own slots, so GSPMD moves them to the experts' devices by all-to-all, as
  # it does for the einsum placement (gathering from all tokens at once all-gathered them instead).
  mesh = jax.make_mesh(tuple(8 if name == "expert" else 1 for name in MESH_AXES), MESH_AXES,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))
  x = jax.random.normal(jax.random.key(1), (8, 16, D_MODEL))  # 8 groups of 16 tokens
  ctx = LayerContext(mask=None, query_positions=None, key_positions=None)

  def hlo(implementation):
    layer = MoeLayer(D_MODEL, num_experts=8, d_ff=16, group_size=16, rngs=nnx.Rngs(0),
                     dispatcher=CapacityEinsum(2.0, 2.0, implementation=implementation))
    graphdef, params = nnx.split(layer)
    split = lambda w: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("expert" if w.ndim == 3 else None))
    params, data = jax.device_put((params, x), (jax.tree.map(split, params), split(x)))
    with jax.set_mesh(mesh):
      return jax.jit(lambda p, x: nnx.merge(graphdef, p)(x, ctx)[0]).lower(params, data).compile().as_text()

  gather = collective_stats(hlo("gather"))
  assert gather["all-to-all"]["count"] > 0, gather
  assert collective_stats(hlo("einsum")) == gather

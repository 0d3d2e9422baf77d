"""The padded dropless layout: its index maps, the chunked expert FFN, and agreement with the sorted path."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from glam.layers.context import LayerContext
from glam.layers.feedforward import apply_activation
from glam.moe.chunked_ffn import chunked_ffn
from glam.moe.dispatch import Dropless, padded_dropless_maps
from glam.moe.experts import Experts
from glam.moe.routers import TokenChoiceRouting
from glam.moe.row_maps import sort_by_expert

CTX = LayerContext(mask=None, query_positions=None, key_positions=None)
D_MODEL, D_FF = 8, 16


def test_maps_fill_slots_in_token_order_then_overflow_sorted_by_expert():
  # 7 assignments, 3 experts, capacity 2; 3 = not routed. Expert 0 gets a0 a2 a5 (a5 overflows),
  # expert 1 gets a1, expert 2 gets a3 a4 a6 (a6 overflows).
  expert = jnp.array([0, 1, 0, 2, 2, 0, 3, 2], jnp.int32)
  row_assignment, assignment_row, sizes, overflow_sizes = padded_dropless_maps(expert, 3, 2, overflow_rows=4)
  none_row, none_assignment = 3 * 2 + 4, 8
  np.testing.assert_array_equal(sizes, [3, 1, 3])
  np.testing.assert_array_equal(overflow_sizes, [1, 0, 1])
  # slots: e0 <- a0, a2; e1 <- a1, empty; e2 <- a3, a4; overflow: a5 (e0), a7 (e2), two empty rows
  np.testing.assert_array_equal(row_assignment, [0, 2, 1, none_assignment, 3, 4, 5, 7,
                                                 none_assignment, none_assignment])
  np.testing.assert_array_equal(assignment_row, [0, 2, 1, 4, 5, 6, none_row, 7])


def reference_ffn(x, w_in, w_gate, w_out, sizes, activation):
  """Row by row: the expert of row r is the group r falls in; rows past the groups give zeros."""
  owner = np.repeat(np.arange(len(sizes)), sizes)
  out = []
  for r in range(x.shape[0]):
    if r >= len(owner):
      out.append(jnp.zeros((w_out.shape[2],)))
      continue
    e = owner[r]
    gate = x[r] @ w_gate[e] if w_gate is not None else None
    out.append(apply_activation(activation, x[r] @ w_in[e], gate) @ w_out[e])
  return jnp.stack(out)


@pytest.mark.parametrize("activation,sizes,chunk", [("swiglu", (3, 0, 5, 1), 2), ("gelu", (0, 4, 0, 2), 3),
                                                    ("swiglu", (2, 2, 2, 2), 8)])
def test_chunked_ffn_matches_a_row_by_row_reference_with_gradients(activation, sizes, chunk):
  keys = jax.random.split(jax.random.key(0), 5)
  rows = 11  # more rows than the groups hold: the tail gives zeros
  x = jax.random.normal(keys[0], (rows, D_MODEL))
  w_in = jax.random.normal(keys[1], (4, D_MODEL, D_FF)) * 0.3
  w_gate = jax.random.normal(keys[2], (4, D_MODEL, D_FF)) * 0.3 if activation == "swiglu" else None
  w_out = jax.random.normal(keys[3], (4, D_FF, D_MODEL)) * 0.3
  cotangent = jax.random.normal(keys[4], (rows, D_MODEL))
  group_sizes = jnp.array(sizes, jnp.int32)
  act = lambda h, g: apply_activation(activation, h, g)

  def loss(fn):
    return lambda x, w_in, w_gate, w_out: jnp.sum(fn(x, w_in, w_gate, w_out) * cotangent)

  got_fn = lambda x, wi, wg, wo: chunked_ffn(x, wi, wg, wo, group_sizes, act, chunk=chunk)
  want_fn = lambda x, wi, wg, wo: reference_ffn(x, wi, wg, wo, sizes, activation)
  np.testing.assert_allclose(got_fn(x, w_in, w_gate, w_out), want_fn(x, w_in, w_gate, w_out), atol=1e-5)
  argnums = (0, 1, 2, 3) if w_gate is not None else (0, 1, 3)
  got = jax.grad(loss(got_fn), argnums)(x, w_in, w_gate, w_out)
  want = jax.grad(loss(want_fn), argnums)(x, w_in, w_gate, w_out)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, atol=1e-4)
  assert not np.any(np.asarray(got_fn(x, w_in, w_gate, w_out))[sum(sizes):])


@pytest.fixture(scope="module")
def experts():
  return Experts(D_MODEL, 4, d_ff=D_FF, activation="swiglu", rngs=nnx.Rngs(0))


def skewed_routing(groups, tokens, seed):
  """Top-2 routing where expert 0 is almost everyone's first choice: most of it overflows."""
  logits = jax.random.normal(jax.random.key(seed), (groups, tokens, 4)).at[..., 0].add(3.0)
  probs = jax.nn.softmax(logits)
  gates, index = jax.lax.top_k(probs, 2)
  gates = gates.at[0, 1, 1].set(0.0)  # one choice not routed: it must contribute nothing
  return TokenChoiceRouting(index.astype(jnp.int32), gates, probs, logits, None)


@pytest.mark.parametrize("factor,chunk", [(1.0, 4), (0.25, 1), (3.0, 32)])
def test_padded_equals_sorted_dropless_under_heavy_imbalance(experts, factor, chunk):
  x = jax.random.normal(jax.random.key(1), (2, 10, D_MODEL))
  routing = skewed_routing(2, 10, seed=2)
  graphdef, params = nnx.split(experts)
  cotangent = jax.random.normal(jax.random.key(3), x.shape)

  def run(dispatcher):
    def loss(params, x, gates):
      y, stats = dispatcher(x, routing._replace(gates=gates), nnx.merge(graphdef, params), CTX)
      return jnp.sum(y * cotangent), stats
    (_, stats), grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))(params, x, routing.gates)
    return grads, stats

  padded = Dropless(implementation="padded", padded_capacity_factor=factor, overflow_chunk=chunk)
  assert padded.padded_capacity(40, 4) == max(1, min(40, int(np.ceil(factor * 10))))
  got, got_stats = run(padded)
  want, want_stats = run(Dropless(implementation="blocked", block_size=4))
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, atol=1e-5)
  np.testing.assert_allclose(got_stats["expert_load"], want_stats["expert_load"], atol=1e-7)
  assert float(got_stats["expert_load"][0]) > 0.4  # the routing really is skewed: expert 0 overflows


def test_auto_is_padded_on_cpu_and_ragged_dot_on_accelerators():
  want = "ragged_dot" if jax.default_backend() in ("gpu", "tpu") else "padded"
  assert Dropless().resolved_implementation() == want
  assert Dropless(implementation="blocked").resolved_implementation() == "blocked"


@pytest.mark.parametrize("assignments,num_experts", [(37, 5), (1, 1), (65536, 40000)])  # last: keys past int32
def test_sort_by_expert_is_a_stable_sort_by_expert_with_unrouted_last(assignments, num_experts):
  expert = np.random.default_rng(assignments).integers(0, num_experts + 1, assignments).astype(np.int32)
  order, inverse, sizes = jax.jit(sort_by_expert, static_argnums=1)(jnp.asarray(expert), num_experts)
  np.testing.assert_array_equal(order, np.argsort(expert, kind="stable"))
  np.testing.assert_array_equal(inverse[order], np.arange(assignments))
  np.testing.assert_array_equal(sizes, np.bincount(expert, minlength=num_experts + 1)[:num_experts])

"""The grouped CBLAS matmul (glam/kernels/grouped.py): products, gradients, and the dispatchers on it."""
import platform
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from glam.kernels.grouped import grouped_gemm, grouped_matmul, grouped_outer
from glam.layers.context import LayerContext
from glam.moe.dispatch import CapacityEinsum, Dropless
from glam.moe.experts import Experts
from glam.moe.grouped_matmul import grouped_matmul as portable_grouped_matmul
from glam.moe.grouped_matmul import resolve_implementation
from glam.moe.routers import TokenChoiceRouting

pytestmark = [
    pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler to build the kernel"),
    pytest.mark.skipif(platform.machine() != "x86_64" or sys.platform != "linux", reason="no mkl wheel here"),
]

SIZES = jnp.array([10, 0, 25, 7], jnp.int32)  # an empty group, and 8 rows after the last group


def random(shape, seed):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def per_group(sizes, rows):
  """[(group, first row, end row)] as numpy slices, clamped to `rows` as the kernel does."""
  out, start = [], 0
  for e, size in enumerate(np.asarray(sizes)):
    end = min(start + max(int(size), 0), rows)
    out.append((e, start, end))
    start = end
  return out, start


@pytest.mark.parametrize("transpose_w", [False, True])
def test_each_group_is_multiplied_by_its_own_weights(transpose_w):
  x, w = random((50, 6), 0), random((4, 6, 5), 1)
  w_in = jnp.swapaxes(w, 1, 2) if transpose_w else w  # [E, F, K] when transposed
  got = np.asarray(jax.jit(lambda x, w: grouped_gemm(x, w, SIZES, transpose_w=transpose_w))(x, w_in))
  groups, used = per_group(SIZES, 50)
  for e, start, end in groups:
    np.testing.assert_allclose(got[start:end], np.asarray(x)[start:end] @ np.asarray(w)[e], rtol=1e-5, atol=1e-5)
  assert used == 42 and np.all(got[used:] == 0)  # rows after the last group: zeros


def test_group_sizes_past_the_rows_are_clamped():
  """Sizes summing past N (a caller's bug) must not read or write out of bounds: the last group
  is cut at the last row."""
  x, w = random((12, 3), 2), random((2, 3, 4), 3)
  got = np.asarray(grouped_gemm(x, w, jnp.array([8, 9], jnp.int32)))
  np.testing.assert_allclose(got[8:], np.asarray(x)[8:] @ np.asarray(w)[1], rtol=1e-5, atol=1e-5)


def test_weight_gradients_are_each_groups_outer_product():
  x, dy = random((50, 6), 4), random((50, 5), 5)
  got = np.asarray(jax.jit(lambda x, dy: grouped_outer(x, dy, SIZES))(x, dy))
  assert got.shape == (4, 6, 5)
  for e, start, end in per_group(SIZES, 50)[0]:
    want = np.asarray(x)[start:end].T @ np.asarray(dy)[start:end]
    np.testing.assert_allclose(got[e], want, rtol=1e-5, atol=1e-5)
  assert np.all(got[1] == 0)  # the empty group


def test_gradients_match_the_portable_grouped_matmul():
  x, w = random((50, 6), 6), random((4, 6, 5), 7)

  def loss(fn):
    return jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(jnp.sin(fn(x, w))), argnums=(0, 1)))(x, w)

  v_kernel, (dx_kernel, dw_kernel) = loss(lambda x, w: grouped_matmul(x, w, SIZES))
  v_blocked, (dx_blocked, dw_blocked) = loss(
      lambda x, w: portable_grouped_matmul(x, w, SIZES, implementation="blocked", block_size=8))
  np.testing.assert_allclose(v_kernel, v_blocked, rtol=1e-5)
  np.testing.assert_allclose(dx_kernel, dx_blocked, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(dw_kernel, dw_blocked, rtol=1e-4, atol=1e-5)
  assert np.all(np.asarray(dx_kernel)[42:] == 0)  # rows in no group get no gradient


def test_bad_operands_are_refused():
  with pytest.raises(ValueError, match=r"float32 only"):
    grouped_gemm(random((4, 3), 0).astype(jnp.bfloat16), random((2, 3, 4), 1), jnp.array([2, 2]))
  with pytest.raises(ValueError, match=r"group_sizes \[E\], got \(4, 3\), \(2, 3, 4\) and \(3,\)"):
    grouped_gemm(random((4, 3), 0), random((2, 3, 4), 1), jnp.array([2, 2, 0]))
  with pytest.raises(ValueError, match=r"got \(4, 3\), \(2, 4, 4\) and \(2,\) \(transpose_w=True\)"):
    grouped_gemm(random((4, 3), 0), random((2, 4, 4), 1), jnp.array([2, 2]), transpose_w=True)
  with pytest.raises(ValueError, match=r"grouped_outer: expected x \[N, K\], dy \[N, F\]"):
    grouped_outer(random((4, 3), 0), random((5, 2), 1), jnp.array([2, 2]))


def test_who_runs_on_the_kernel(matmul_backend):
  # 8 simulated devices: "auto" keeps XLA (the custom call has no sharding rule).
  matmul_backend("auto")
  assert resolve_implementation("auto") == "blocked" and Dropless().resolved_implementation() == "padded"
  matmul_backend("cblas")  # what "auto" picks on one CPU device when the kernel loads
  assert resolve_implementation("auto") == "cblas" and Dropless().resolved_implementation() == "cblas"
  assert resolve_implementation("auto", dtype=jnp.bfloat16) == "blocked"  # the kernel is float32 only
  assert Dropless().resolved_implementation(jnp.bfloat16) == "padded"
  assert Dropless(implementation="padded").resolved_implementation() == "padded"


def moe_setup(tokens=24, d_model=8, num_experts=4, k=2):
  x = random((2, tokens, d_model), 8)
  experts = Experts(d_model, num_experts, d_ff=16, activation="swiglu", rngs=nnx.Rngs(0))
  logits = jnp.einsum("gtm,me->gte", x, random((d_model, num_experts), 9) * 2)  # [groups, tokens, experts]
  probs = jax.nn.softmax(logits)
  gates, index = jax.lax.top_k(probs, k)
  routing = TokenChoiceRouting(index.astype(jnp.int32), gates / gates.sum(-1, keepdims=True), probs, logits, None)
  return x, experts, routing


def dispatch_value_and_grads(dispatcher, x, experts, routing):
  ctx = LayerContext(mask=None, query_positions=None, key_positions=None, deterministic=False,
                     rng=jax.random.key(0))
  graphdef, params = nnx.split(experts)

  def loss(params, x, gates):
    y, stats = dispatcher(x, routing._replace(gates=gates), nnx.merge(graphdef, params), ctx)
    return jnp.sum(jnp.sin(y)), stats

  (value, stats), grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))(params, x, routing.gates)
  return value, stats, jax.tree.leaves(grads)


def assert_same(a, b):
  (value_a, stats_a, grads_a), (value_b, stats_b, grads_b) = a, b
  np.testing.assert_allclose(value_a, value_b, rtol=1e-5)
  np.testing.assert_allclose(stats_a["dropped_fraction"], stats_b["dropped_fraction"])
  np.testing.assert_allclose(stats_a["expert_load"], stats_b["expert_load"])
  assert len(grads_a) == len(grads_b) == 5  # wi, wi_gate, wo, x and the gates
  for got, want in zip(grads_a, grads_b):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_dropless_on_the_kernel_matches_the_padded_layout(matmul_backend):
  x, experts, routing = moe_setup()
  matmul_backend("cblas")
  on_kernel = dispatch_value_and_grads(Dropless(), x, experts, routing)  # auto -> the grouped kernel
  matmul_backend("xla")
  assert_same(on_kernel, dispatch_value_and_grads(Dropless(implementation="padded"), x, experts, routing))


def test_capacity_on_the_kernel_drops_what_the_einsums_drop(matmul_backend):
  """A capacity of 3 slots per expert and group drops assignments: the kept ones run on the
  grouped kernel, sorted by expert, and give the one-hot einsums' result and gradients."""
  x, experts, routing = moe_setup()
  capacity = dict(capacity_factor=0.25, min_capacity=1)
  matmul_backend("cblas")
  on_kernel = dispatch_value_and_grads(CapacityEinsum(**capacity), x, experts, routing)
  assert float(on_kernel[1]["dropped_fraction"]) > 0.3
  matmul_backend("xla")
  assert_same(on_kernel, dispatch_value_and_grads(CapacityEinsum(implementation="einsum", **capacity),
                                                  x, experts, routing))


def test_forced_onto_a_mesh_it_still_computes_the_right_values():
  """The custom call has no sharding rule: with its rows split over the 8 simulated devices GSPMD
  gathers the operands around it (slow, which is why "auto" never picks it there), but the
  values and gradients stay right."""
  from jax.sharding import AxisType, NamedSharding, PartitionSpec
  mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(AxisType.Auto,))
  x, w = random((64, 6), 10), random((4, 6, 5), 11)
  sizes = jnp.array([16, 8, 24, 16], jnp.int32)
  rows_split = jax.device_put(x, NamedSharding(mesh, PartitionSpec("data", None)))

  def grads(fn, x):
    return jax.jit(jax.grad(lambda x, w: jnp.sum(jnp.sin(fn(x, w))), argnums=(0, 1)))(x, w)

  got = grads(lambda x, w: grouped_matmul(x, w, sizes), rows_split)
  want = grads(lambda x, w: portable_grouped_matmul(x, w, sizes, implementation="blocked", block_size=8), x)
  for g, h in zip(got, want):
    np.testing.assert_allclose(g, h, rtol=1e-4, atol=1e-5)

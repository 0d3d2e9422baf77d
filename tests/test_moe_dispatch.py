"""Dispatchers: capacity rule, dropless == capacity when nothing drops, expert choice, stats."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from glam.kernels import cblas
from glam.layers.context import LayerContext
from glam.moe.dispatch import CapacityEinsum, Dropless, capacity_slots
from glam.moe.experts import Experts
from glam.moe.routers import ExpertChoiceRouting, TokenChoiceRouting

CTX = LayerContext(mask=None, query_positions=None, key_positions=None)  # deterministic: eval capacity factor
D_MODEL, EXPERTS = 8, 4


def make_experts(activation="swiglu", num_experts=EXPERTS):
  return Experts(D_MODEL, num_experts, d_ff=16, activation=activation, rngs=nnx.Rngs(0))


def softmax_routing(groups, tokens, k, seed=0, num_experts=EXPERTS):
  logits = jax.random.normal(jax.random.key(seed), (groups, tokens, num_experts))
  probs = jax.nn.softmax(logits)
  gates, index = jax.lax.top_k(probs, k)
  return TokenChoiceRouting(index.astype(jnp.int32), gates, probs, logits, None)


def hand_routing(expert_index, gates=None, priority=None, num_experts=2):
  index = jnp.asarray(expert_index, jnp.int32)[None]  # one group
  gates = jnp.full(index.shape, 0.5) if gates is None else jnp.asarray(gates, jnp.float32)[None]
  empty = jnp.zeros(index.shape[:2] + (num_experts,))
  priority = None if priority is None else jnp.asarray(priority, jnp.int32)[None]
  return TokenChoiceRouting(index, gates, empty, empty, priority)


def per_assignment(experts, x, routing, kept):
  """What the rule says: y[t] = sum over kept choices j of gate * expert_j(x[t]), written out."""
  tokens_flat = x.reshape(1, -1, D_MODEL)
  every = jnp.broadcast_to(tokens_flat, (experts.num_experts,) + tokens_flat.shape[1:])
  all_experts = experts(every, CTX)  # [experts, g * t, d_model]: every expert on every token
  groups, tokens, k = routing.expert_index.shape
  y = np.zeros((groups * tokens, D_MODEL), np.float32)
  index, gates, kept = (np.asarray(a).reshape(groups * tokens, k)
                        for a in (routing.expert_index, routing.gates, kept))
  for t in range(groups * tokens):
    for j in range(k):
      if kept[t, j]:
        y[t] += gates[t, j] * np.asarray(all_experts[index[t, j], t])
  return y.reshape(groups, tokens, D_MODEL)


def test_capacity_multiplies_by_k_with_a_floor_and_a_cap():
  dispatcher = CapacityEinsum(capacity_factor=1.25, eval_capacity_factor=2.0, min_capacity=4)
  assert dispatcher.capacity(1024, 8, 2, deterministic=False) == 320  # ceil(1.25 * 2 * 1024 / 8)
  assert dispatcher.capacity(1024, 8, 2, deterministic=True) == 512
  assert dispatcher.capacity(16, 64, 1, deterministic=False) == 4   # min_capacity
  assert dispatcher.capacity(3, 2, 2, deterministic=False) == 3     # never more than the tokens
  assert CapacityEinsum(capacity_factor=1.0).capacity(64, 8, 2, False) == 16  # cf 1 = perfect balance


def test_capacity_rejects_bad_bindings():
  with pytest.raises(ValueError, match="CapacityEinsum.capacity_factor=0"):
    CapacityEinsum(capacity_factor=0)
  with pytest.raises(ValueError, match="CapacityEinsum.padded_capacity_factor=0"):
    CapacityEinsum(padded_capacity_factor=0)
  with pytest.raises(ValueError, match="CapacityEinsum.implementation='dense'"):
    CapacityEinsum(implementation="dense")
  with pytest.raises(ValueError, match="Dropless.implementation='fast'"):
    Dropless(implementation="fast")
  with pytest.raises(ValueError, match="Dropless.padded_capacity_factor=0"):
    Dropless(padded_capacity_factor=0)
  with pytest.raises(ValueError, match="Dropless.overflow_chunk=0"):
    Dropless(overflow_chunk=0)


# 6 tokens, 2 experts, top-2, capacity 3. First choices: expert 0 <- t0, t1; expert 1 <- t2..t5.
# Token order: expert 1 keeps t2, t3, t4 and drops t5; the second choices of t0, t1 (expert 1) find it
# full although they come before t2..t5 in token order; expert 0 has one slot left: t2's second choice.
INDEX = [[0, 1], [0, 1], [1, 0], [1, 0], [1, 0], [1, 0]]
KEPT_TOKEN_ORDER = [[1, 0], [1, 0], [1, 1], [1, 0], [1, 0], [0, 0]]
# Priority = reversed token order (t5 claims first): expert 1 keeps t5, t4, t3; expert 0's last slot: t5.
REVERSED = [5, 4, 3, 2, 1, 0]
KEPT_REVERSED = [[1, 0], [1, 0], [0, 0], [1, 0], [1, 0], [1, 1]]
CAPACITY_3 = CapacityEinsum(capacity_factor=0.5, eval_capacity_factor=0.5, min_capacity=1)  # ceil(.5*2*6/2) = 3


@pytest.mark.parametrize("implementation", ["einsum", "gather"])
@pytest.mark.parametrize("priority,kept", [(None, KEPT_TOKEN_ORDER), (REVERSED, KEPT_REVERSED)])
def test_small_capacity_drops_exactly_what_the_rule_says(implementation, priority, kept):
  routing = hand_routing(INDEX, priority=priority)
  assert CAPACITY_3.capacity(6, 2, 2, deterministic=True) == 3
  _, _, keep = capacity_slots(routing, 2, 3)
  np.testing.assert_array_equal(keep[0], np.asarray(kept, bool))

  experts = make_experts(num_experts=2)
  x = jax.random.normal(jax.random.key(0), (1, 6, D_MODEL))
  dispatcher = CapacityEinsum(0.5, 0.5, 1, implementation=implementation)
  y, stats = dispatcher(x, routing, experts, CTX)
  np.testing.assert_allclose(y, per_assignment(experts, x, routing, np.asarray(kept)[None]), atol=1e-5)
  np.testing.assert_allclose(stats["dropped_fraction"], 6 / 12)  # 6 of the 12 routed assignments kept
  np.testing.assert_allclose(stats["expert_load"], [0.5, 0.5])   # 3 slots of each expert filled


def test_unrouted_choices_claim_no_capacity():
  # t0's first choice has gate 0 (e.g. padding): t5 gets expert 0's last slot instead.
  index = [[0, 1], [0, 1], [0, 1], [1, 0], [1, 0], [0, 1]]
  gates = [[0.0, 0.0], [0.6, 0.4], [0.6, 0.4], [0.6, 0.4], [0.6, 0.4], [0.6, 0.4]]
  routing = hand_routing(index, gates)
  _, _, keep = capacity_slots(routing, 2, 3)
  want = [[0, 0], [1, 1], [1, 0], [1, 0], [1, 0], [1, 0]]  # expert 1's last slot: t1's second choice
  np.testing.assert_array_equal(keep[0], np.asarray(want, bool))
  experts = make_experts(num_experts=2)
  x = jax.random.normal(jax.random.key(0), (1, 6, D_MODEL))
  y, stats = CAPACITY_3(x, routing, experts, CTX)
  np.testing.assert_allclose(y, per_assignment(experts, x, routing, np.asarray(want)[None]), atol=1e-5)
  np.testing.assert_allclose(stats["dropped_fraction"], 4 / 10)  # 10 routed, 6 kept
  np.testing.assert_allclose(stats["expert_load"], [0.5, 0.5])
  y_dropless, stats = Dropless(implementation="blocked")(x, routing, experts, CTX)
  np.testing.assert_allclose(y_dropless, per_assignment(experts, x, routing, np.asarray(gates)[None] > 0), atol=1e-5)
  np.testing.assert_allclose(stats["expert_load"], [5 / 10, 5 / 10])
  assert float(stats["dropped_fraction"]) == 0.0


def forward_and_grads(dispatcher, experts, x, routing):
  graphdef, params = nnx.split(experts)
  cotangent = jax.random.normal(jax.random.key(9), x.shape)

  def loss(params, x, gates):
    y, _ = dispatcher(x, routing._replace(gates=gates), nnx.merge(graphdef, params), CTX)
    return jnp.sum(y * cotangent), y

  (_, y), grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))(params, x, routing.gates)
  return y, grads


@pytest.mark.parametrize("k", [1, 2])
def test_dropless_equals_capacity_when_nothing_drops(k):
  experts = make_experts()
  x = jax.random.normal(jax.random.key(1), (2, 12, D_MODEL))
  routing = softmax_routing(2, 12, k)
  roomy = dict(capacity_factor=100.0, eval_capacity_factor=100.0)  # capacity = tokens: nothing drops
  y_ref, grads_ref = forward_and_grads(CapacityEinsum(**roomy, implementation="einsum"), experts, x, routing)
  for dispatcher in (CapacityEinsum(**roomy, implementation="gather"),
                     Dropless(implementation="blocked", block_size=4), Dropless(implementation="ragged_dot"),
                     Dropless(implementation="padded", padded_capacity_factor=0.5, overflow_chunk=3),  # overflows
                     *([Dropless(implementation="cblas")] if cblas.load() is None else [])):  # the oneMKL kernel
    y, grads = forward_and_grads(dispatcher, experts, x, routing)
    np.testing.assert_allclose(y, y_ref, atol=1e-5, err_msg=str(dispatcher))
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):  # experts, x, gates
      np.testing.assert_allclose(got, want, atol=1e-5, err_msg=str(dispatcher))
  _, stats = CapacityEinsum(**roomy)(x, routing, experts, CTX)
  assert float(stats["dropped_fraction"]) == 0.0


def test_dropless_equals_a_per_assignment_loop():
  experts = make_experts("gelu")
  x = jax.random.normal(jax.random.key(1), (2, 12, D_MODEL))
  routing = softmax_routing(2, 12, 2, seed=3)
  y, stats = Dropless(implementation="blocked", block_size=4)(x, routing, experts, CTX)
  np.testing.assert_allclose(y, per_assignment(experts, x, routing, np.ones((2, 12, 2), bool)), atol=1e-5)
  counts = np.bincount(np.asarray(routing.expert_index).ravel(), minlength=EXPERTS)
  np.testing.assert_allclose(stats["expert_load"], counts / counts.sum(), atol=1e-6)


def test_dropless_rejects_expert_choice():
  routing = ExpertChoiceRouting(jnp.zeros((1, 2, 2), jnp.int32), jnp.ones((1, 2, 2)), None, None)
  with pytest.raises(TypeError, match="CapacityEinsum"):
    Dropless()(jnp.zeros((1, 4, D_MODEL)), routing, make_experts(num_experts=2), CTX)


@pytest.mark.parametrize("implementation", ["einsum", "gather"])
def test_expert_choice_equals_a_loop_over_experts(implementation):
  experts = make_experts()
  groups, tokens, capacity = 2, 6, 3
  x = jax.random.normal(jax.random.key(1), (groups, tokens, D_MODEL))
  # each expert's chosen tokens; token 5 of group 0 is chosen by nobody, token 0 by all four
  token_index = jnp.array([[[0, 1, 2], [0, 3, 4], [0, 2, 1], [4, 0, 3]],
                           [[5, 4, 3], [0, 1, 2], [2, 5, 0], [1, 3, 5]]], jnp.int32)
  gates = jax.random.uniform(jax.random.key(2), (groups, EXPERTS, capacity))
  routing = ExpertChoiceRouting(token_index, gates, None, None)
  y, stats = CapacityEinsum(implementation=implementation)(x, routing, experts, CTX)

  want = np.zeros((groups, tokens, D_MODEL), np.float32)
  for g in range(groups):
    for e in range(EXPERTS):
      chosen = x[g, token_index[g, e]]  # [capacity, d_model]
      out = experts(jnp.broadcast_to(chosen, (EXPERTS,) + chosen.shape), CTX)[e]
      for c in range(capacity):
        want[g, int(token_index[g, e, c])] += float(gates[g, e, c]) * np.asarray(out[c])
  np.testing.assert_allclose(y, want, atol=1e-5)
  assert not np.any(want[0, 5])
  np.testing.assert_allclose(stats["expert_load"], np.full(EXPERTS, 1 / EXPERTS))
  assert float(stats["dropped_fraction"]) == 0.0


@pytest.mark.skipif(cblas.load() is not None, reason="the CBLAS kernel does not load here")
def test_expert_choice_on_the_fused_kernel_equals_the_einsums(matmul_backend):
  """Expert choice's gather placement on the fused expert FFN (the kernel gathers each expert's
  tokens and sums the gradients of tokens that several experts chose): values and gradients of the
  weights, tokens and gates as the one-hot einsums give them, and the kernel really runs."""
  experts = make_experts()
  groups, tokens, capacity = 2, 8, 3
  x = jax.random.normal(jax.random.key(3), (groups, tokens, D_MODEL))
  logits = jax.random.normal(jax.random.key(4), (groups, tokens, EXPERTS))
  logits += 3 * jax.random.normal(jax.random.key(5), (groups, tokens, 1))  # tokens all experts like
  scores = jax.nn.sigmoid(logits)
  gates, token_index = jax.lax.top_k(jnp.swapaxes(scores, 1, 2), capacity)  # [groups, experts, capacity]
  routing = ExpertChoiceRouting(token_index.astype(jnp.int32), gates, scores, None)
  chosen = np.bincount(np.asarray(token_index[0]).ravel(), minlength=tokens)
  assert chosen.max() > 1 and chosen.min() == 0  # some token by several experts, some by none
  matmul_backend("xla")
  y_ref, grads_ref = forward_and_grads(CapacityEinsum(implementation="einsum"), experts, x, routing)
  matmul_backend("cblas")  # what "auto" picks on one CPU device
  gather = CapacityEinsum(implementation="gather")
  y, grads = forward_and_grads(gather, experts, x, routing)
  np.testing.assert_allclose(y, y_ref, atol=1e-5)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):  # experts, x, gates
    np.testing.assert_allclose(got, want, atol=1e-5)
  hlo = jax.jit(lambda x: gather(x, routing, experts, CTX)[0]).lower(x).as_text()
  assert "glam_expert_ffn" in hlo


def test_expert_load_sums_to_one_and_drops_are_counted():
  experts = make_experts()
  x = jax.random.normal(jax.random.key(1), (2, 16, D_MODEL))
  routing = softmax_routing(2, 16, 2, seed=5)
  tight = CapacityEinsum(capacity_factor=0.5, eval_capacity_factor=0.5, min_capacity=1)  # 4 slots per expert
  _, stats = tight(x, routing, experts, CTX)
  np.testing.assert_allclose(jnp.sum(stats["expert_load"]), 1.0, rtol=1e-6)
  index = np.asarray(routing.expert_index)
  kept = 0
  for g in range(2):  # hand count: every expert keeps min(demand, 4) per group
    kept += sum(min(int(np.sum(index[g] == e)), 4) for e in range(EXPERTS))
  np.testing.assert_allclose(stats["dropped_fraction"], 1 - kept / index.size, rtol=1e-6)
  assert float(stats["dropped_fraction"]) > 0

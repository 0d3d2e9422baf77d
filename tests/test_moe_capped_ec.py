"""Capped expert choice (Zhou et al. 2022, §3.3): the Dykstra solver alone, the router's cap, and
a tiny capped-EC model trained through the `glam` command."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import glam.config
from cli_helpers import TINY_RUN
from glam.cli import main
from glam.moe.capped_assignment import capped_assignment, log_capped_assignment
from glam.moe.routers import ExpertChoiceRouter


def experts_per_token(token_index, tokens):
  """[groups, experts, k] chosen token ids -> [groups, tokens] how many experts took each token."""
  one_hot = jax.nn.one_hot(token_index, tokens, dtype=jnp.int32)  # [groups, experts, k, tokens]
  return np.asarray(one_hot.sum(axis=(1, 2)))


def top_k_tokens(values, k):
  return np.sort(np.asarray(jax.lax.top_k(values, k)[1]), axis=-1)


# --- the solver ------------------------------------------------------------------------------

@pytest.mark.parametrize("entropy_start", [None, 1.0])
def test_solution_meets_the_three_constraints(entropy_start):
  scores = jax.random.uniform(jax.random.key(0), (2, 4, 12))  # [groups, experts, tokens]
  k, b = 4, 2  # 4 experts x 4 tokens = 16 <= 12 tokens x 2: feasible, not tight
  # A large entropy converges in 300 rounds to 1e-3; the paper's 0.001 needs many more (README).
  a = np.asarray(capped_assignment(scores, k, b, entropy=0.1, iterations=300, entropy_start=entropy_start))
  np.testing.assert_allclose(a.sum(axis=2), k, atol=1e-3)
  assert a.sum(axis=1).max() <= b + 1e-3
  assert a.min() >= 0 and a.max() <= 1 + 1e-3
  uncapped = np.exp(np.asarray(scores) / 0.1)
  uncapped = uncapped / uncapped.sum(axis=2, keepdims=True) * k
  assert uncapped.sum(axis=1).max() > b + 0.1  # without the cap some column would be over b


def test_paper_settings_stay_finite_in_float32_on_peaked_scores():
  # S / 0.001 reaches 1000: exp() of it overflows float32, the log-space solver must not.
  logits = 4.0 * jax.random.normal(jax.random.key(1), (3, 24, 6))
  scores = jax.nn.softmax(logits, axis=-1).swapaxes(1, 2)  # [groups, experts, tokens]
  for start in (None, 1.0):
    log_a = log_capped_assignment(scores, 8, 2, entropy=0.001, iterations=100, entropy_start=start)
    assert bool(jnp.all(jnp.isfinite(log_a)))
    np.testing.assert_allclose(jnp.exp(log_a).sum(axis=2), 8, atol=1e-3)


@pytest.mark.parametrize("entropy_start", [None, 1.0])
def test_inactive_cap_picks_the_uncapped_top_k(entropy_start):
  # Well-separated scores: every row a permutation of 0, 1/12, ..., 11/12.
  keys = jax.random.split(jax.random.key(2), 8)
  scores = jnp.stack([jax.random.permutation(key, 12) for key in keys]).reshape(2, 4, 12) / 12.0
  log_a = log_capped_assignment(scores, 3, 4, 0.001, 100, entropy_start=entropy_start)  # b = 4 experts: no cap
  np.testing.assert_array_equal(top_k_tokens(log_a, 3), top_k_tokens(scores, 3))


@pytest.mark.parametrize("entropy_start, iterations", [(1.0, 100), (None, 3000)])
def test_cap_of_one_gives_a_token_all_experts_want_to_one_expert(entropy_start, iterations):
  # Every expert's favourite is token 0; expert j's runner-up is token j + 1. Uncapped EC (k = 1)
  # gives token 0 to all 4 experts. With b = 1 the LP optimum gives it to the expert that loses
  # most without it (expert 0: 0.9 - 0.5) and the others take their runner-up. The rule tested:
  # every token is taken by at most b = 1 expert, and that optimum is the selection.
  scores = np.full((1, 4, 8), 0.1, np.float32)
  scores[0, :, 0] = [0.9, 0.8, 0.7, 0.6]
  for j in range(4):
    scores[0, j, j + 1] = 0.5
  assert experts_per_token(jax.lax.top_k(scores, 1)[1], 8)[0, 0] == 4  # uncapped: all on token 0
  log_a = log_capped_assignment(jnp.asarray(scores), 1, 1, 0.001, iterations, entropy_start=entropy_start)
  chosen = top_k_tokens(log_a, 1)[0, :, 0]
  np.testing.assert_array_equal(chosen, [0, 2, 3, 4])
  assert experts_per_token(jax.lax.top_k(log_a, 1)[1], 8).max() == 1
  if entropy_start is not None:  # why annealing is the router's default: 100 plain rounds are not enough
    plain = log_capped_assignment(jnp.asarray(scores), 1, 1, 0.001, iterations)
    assert experts_per_token(jax.lax.top_k(plain, 1)[1], 8)[0, 0] > 1


def test_padding_tokens_get_nothing_and_nothing_is_nan():
  scores = jax.random.uniform(jax.random.key(3), (3, 4, 6))
  mask = jnp.array([[True, False, True, True, False, True],
                    [True, False, False, False, False, False],  # fewer real tokens than k: infeasible
                    [False] * 6])  # all padding
  log_a = log_capped_assignment(scores, 2, 2, entropy=0.001, iterations=100, token_mask=mask, entropy_start=1.0)
  pad = ~np.asarray(mask)[:, None, :].repeat(4, axis=1)
  assert np.all(np.isneginf(np.asarray(log_a)[pad]))
  assert np.all(np.isfinite(np.asarray(log_a)[~pad]))
  np.testing.assert_allclose(jnp.exp(log_a[0]).sum(axis=1), 2, atol=1e-3)
  assert set(np.asarray(jax.lax.top_k(log_a[0], 2)[1]).ravel()) <= {0, 2, 3, 5}


def test_solver_passes_no_gradient():
  scores = jax.random.uniform(jax.random.key(4), (1, 3, 5))
  grad = jax.grad(lambda s: jnp.sum(capped_assignment(s, 2, 2, 0.01, 5) * jnp.arange(5.0)))(scores)
  assert not np.any(np.asarray(grad))


@pytest.mark.parametrize("kwargs, message", [
    (dict(k=0), "k=0"), (dict(k=7), "k=7"), (dict(b=0), "b=0"), (dict(entropy=0.0), "entropy=0.0"),
    (dict(iterations=0), "iterations=0"), (dict(entropy_start=1e-4), "entropy_start=0.0001"),
])
def test_solver_rejects_bad_arguments(kwargs, message):
  args = dict(k=2, b=2, entropy=0.001, iterations=10) | kwargs
  with pytest.raises(ValueError, match=message):
    capped_assignment(jnp.ones((1, 2, 6)), **args)


# --- the router ------------------------------------------------------------------------------

def identity_router(num_experts, **kwargs):
  router = ExpertChoiceRouter(num_experts, num_experts, rngs=nnx.Rngs(0), **kwargs)
  router.kernel[...] = jnp.eye(num_experts)  # logits = input
  return router


X = 3.0 * jax.random.normal(jax.random.key(5), (4, 32, 8))  # [groups, tokens, experts]: peaked scores


@pytest.fixture(scope="module")
def routings():
  uncapped = identity_router(8, capacity_factor=2.0)(X, deterministic=True, rng=None)
  capped = identity_router(8, capacity_factor=2.0, max_experts_per_token=2)(X, deterministic=True, rng=None)
  return uncapped, capped


def test_capped_router_respects_the_cap_far_better(routings):
  uncapped, capped = routings
  before, after = experts_per_token(uncapped.token_index, 32), experts_per_token(capped.token_index, 32)
  over_before, over_after = (before > 2).mean(), (after > 2).mean()
  assert over_before > 0.15 and over_after < over_before / 2, (over_before, over_after)
  assert after.max() < before.max()
  assert before.sum() == after.sum() == 4 * 8 * 8  # same compute: every expert takes k = 32 * 2 / 8 tokens
  for row in np.asarray(capped.token_index).reshape(-1, 8):
    assert len(set(row)) == 8  # k distinct tokens per expert
  chosen = jnp.take_along_axis(capped.probs.swapaxes(1, 2), capped.token_index, axis=2)
  np.testing.assert_array_equal(capped.gates, chosen)  # gates are the router scores S
  np.testing.assert_array_equal(capped.probs, uncapped.probs)


def test_uncapped_router_is_unchanged_bit_for_bit(routings):
  uncapped, _ = routings
  scores = jax.nn.softmax(X, axis=-1).swapaxes(1, 2)  # the original rule: top-capacity tokens of S
  gates, index = jax.lax.top_k(scores, 8)
  np.testing.assert_array_equal(uncapped.token_index, index)
  np.testing.assert_array_equal(uncapped.gates, gates)


def test_capped_router_never_picks_padding_and_keeps_gate_gradients():
  mask = jnp.arange(32)[None, :] % 4 != 1  # every 4th token is padding
  mask = jnp.broadcast_to(mask, (2, 32))
  router = ExpertChoiceRouter(8, 8, capacity_factor=2.0, max_experts_per_token=2, rngs=nnx.Rngs(0))
  x = X[:2]
  out = router(x, deterministic=True, rng=None, token_mask=mask)
  assert not np.any(np.asarray(out.token_index) % 4 == 1)

  grad = jax.grad(lambda x: jnp.sum(router(x, deterministic=True, rng=None, token_mask=mask).gates))(x)
  assert float(jnp.max(jnp.abs(grad))) > 0  # through S, as in uncapped EC


def test_capped_router_handles_groups_too_small_for_the_cap():
  # 1 token per group: capacity rounds up to 1, so 8 experts share it although b = 2 (as in a
  # short prompt); the router must still return in-range indices and finite gates.
  out = identity_router(8, max_experts_per_token=2)(X[:, :1], deterministic=True, rng=None)
  assert np.all(np.asarray(out.token_index) == 0) and bool(jnp.all(jnp.isfinite(out.gates)))


@pytest.mark.parametrize("kwargs, binding", [
    (dict(max_experts_per_token=0), "max_experts_per_token=0"),
    (dict(max_experts_per_token=True), "max_experts_per_token=True"),
    (dict(max_experts_per_token=1), "max_experts_per_token=1: must be >= capacity_factor=2.0"),
    (dict(max_experts_per_token=2, cap_entropy=0.0), "cap_entropy=0.0"),
    (dict(max_experts_per_token=2, cap_iterations=0), "cap_iterations=0"),
    (dict(max_experts_per_token=2, cap_entropy_start=1e-4), "cap_entropy_start=0.0001"),
])
def test_bad_cap_bindings_name_the_binding(kwargs, binding):
  with pytest.raises(ValueError, match=f"ExpertChoiceRouter.{binding}"):
    ExpertChoiceRouter(8, 8, capacity_factor=2.0, rngs=nnx.Rngs(0), **kwargs)


def test_config_binds_the_cap():
  glam.config.parse(["configs/models/ec_capped_tiny.gin"])
  router = ExpertChoiceRouter(8, 8, rngs=nnx.Rngs(0))
  assert (router.max_experts_per_token, router.cap_entropy, router.cap_iterations) == (2, 0.001, 100)
  assert router.cap_entropy_start == 1.0
  assert router.capacity_factor == 2.0


# --- end to end ------------------------------------------------------------------------------

def test_tiny_capped_ec_model_trains_and_generates(tmp_path):
  model_dir = str(tmp_path / "run")
  run = [arg for arg in TINY_RUN if not arg.startswith("--gin.DecoderLM.num_blocks")] + [
      "--gin_file=configs/models/ec_capped_tiny.gin", "--gin.DecoderLM.num_blocks=1",
      "--gin.MoeLayer.num_experts=4", "--gin.MoeLayer.d_ff=64", "--gin.MoeLayer.group_size=64",
      "--gin.train.num_steps=12", "--gin.constant_then_rsqrt.peak=0.003", f"--model_dir={model_dir}"]
  assert main(["train", *run]) == 0
  with open(os.path.join(model_dir, "metrics.jsonl")) as f:
    losses = [row["loss"] for row in map(json.loads, f) if row.get("prefix") == "train"]
  assert len(losses) == 12 and np.all(np.isfinite(losses))
  assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.2, losses
  with open(os.path.join(model_dir, "config.gin")) as f:
    assert "ExpertChoiceRouter.max_experts_per_token = 2" in f.read()
  assert main(["generate", f"--model_dir={model_dir}", "--prompt=1+1=", "--max_new_tokens=4"]) == 0

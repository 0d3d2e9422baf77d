"""The pure train/eval steps: gradient accumulation, non-finite skipping, per-domain sums."""
import functools

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from glam.models.lm import DecoderLM
from glam.train.optimizers import adamw, make_optimizer
from glam.train.step import make_eval_step, make_train_step, token_losses


@pytest.fixture(scope="module")
def setup():
  gin.clear_config()
  with gin.unlock_config():
    gin.bind_parameter("Attention.num_heads", 2)
    gin.bind_parameter("Attention.head_dim", 8)
    gin.bind_parameter("FeedForward.d_ff", 32)
    model = DecoderLM(vocab_size=30, d_model=16, num_blocks=2, rngs=nnx.Rngs(0))
  gin.clear_config()
  graphdef, state = nnx.split(model)
  return graphdef, nnx.to_pure_dict(state)


def batch(rows=4, length=8, seed=0):
  rng = np.random.default_rng(seed)
  targets = rng.integers(3, 30, (rows, length)).astype(np.int32)
  segments = np.ones((rows, length), np.int32)
  segments[:, -2:] = 0  # some padding
  weights = (segments > 0).astype(np.float32)
  inputs = np.concatenate([np.zeros((rows, 1), np.int32), targets[:, :-1]], 1)
  return {"inputs": inputs, "targets": targets, "segment_ids": segments,
          "positions": np.tile(np.arange(length, dtype=np.int32), (rows, 1)), "loss_weights": weights,
          "domain_ids": np.where(segments > 0, np.arange(rows)[:, None] % 2, -1).astype(np.int32)}


def fresh_state(params, optimizer):
  return {"step": jnp.int32(0), "params": params, "opt_state": optimizer.init(params)}


def test_token_losses_match_log_softmax():
  logits = jax.random.normal(jax.random.key(0), (2, 3, 5))
  targets = jnp.array([[0, 1, 2], [3, 4, 0]])
  nll, _, _ = token_losses(logits, targets)
  expected = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]
  np.testing.assert_allclose(nll, expected, rtol=1e-6)


def test_gradient_accumulation_equals_one_big_batch(setup):
  graphdef, params = setup
  optimizer = make_optimizer(optimizer=functools.partial(adamw, learning_rate=1e-2), skip_nonfinite=False)
  one = jax.jit(make_train_step(graphdef, optimizer))
  four = jax.jit(make_train_step(graphdef, optimizer, grad_accum_steps=4))
  b = batch()
  state_one, m_one = one(fresh_state(params, optimizer), b)
  state_four, m_four = four(fresh_state(params, optimizer), b)
  np.testing.assert_allclose(m_one["loss"], m_four["loss"], rtol=1e-5)
  np.testing.assert_allclose(m_one["grad_norm"], m_four["grad_norm"], rtol=1e-4)
  for a, c in zip(jax.tree.leaves(state_one["params"]), jax.tree.leaves(state_four["params"])):
    np.testing.assert_allclose(a, c, atol=1e-5)


def test_nonfinite_gradients_skip_the_update_and_count(setup):
  graphdef, params = setup
  optimizer = make_optimizer(optimizer=functools.partial(adamw, learning_rate=1e-2))
  step = jax.jit(make_train_step(graphdef, optimizer))
  state = fresh_state(params, optimizer)
  poisoned = jax.tree.map(lambda x: x, state)
  poisoned["params"] = jax.tree.map(lambda x: x, params)
  poisoned["params"]["logits_kernel"] = params["logits_kernel"].at[0, 0].set(jnp.nan)
  new_state, metrics = step(poisoned, batch())
  assert int(metrics["skipped_updates"]) == 1
  np.testing.assert_array_equal(np.asarray(new_state["params"]["embed"]["embedding"]),
                                np.asarray(params["embed"]["embedding"]))
  _, metrics = step(fresh_state(params, optimizer), batch())
  assert int(metrics["skipped_updates"]) == 0 and np.isfinite(float(metrics["loss"]))


def test_training_reduces_loss_on_a_repeated_batch(setup):
  graphdef, params = setup
  optimizer = make_optimizer(optimizer=functools.partial(adamw, learning_rate=3e-2))
  step = jax.jit(make_train_step(graphdef, optimizer))
  state, b = fresh_state(params, optimizer), batch()
  first = None
  for _ in range(30):
    state, metrics = step(state, b)
    first = first if first is not None else float(metrics["loss"])
  assert float(metrics["loss"]) < 0.5 * first
  assert int(state["step"]) == 30


def test_eval_step_sums_per_domain(setup):
  graphdef, params = setup
  b = batch()
  sums = jax.jit(make_eval_step(graphdef, num_domains=2))(params, b)
  model = nnx.merge(graphdef, params)
  nll, _, _ = token_losses(model(b["inputs"], segment_ids=b["segment_ids"], positions=b["positions"]).logits,
                        b["targets"])
  for domain in (0, 1):
    rows = b["domain_ids"] == domain
    np.testing.assert_allclose(sums["nll"][domain], np.sum(np.where(rows, nll, 0)), rtol=1e-5)
    assert sums["tokens"][domain] == rows.sum()


def test_token_losses_top_prediction_matches_argmax():
  logits = jax.random.normal(jax.random.key(3), (4, 16, 50))
  targets = jnp.argmax(logits, -1).at[:, ::2].set(7)  # half the rows' targets are the argmax, the rest mostly not
  nll, log_z, top = token_losses(logits, targets)
  np.testing.assert_array_equal(top, jnp.argmax(logits, -1) == targets)
  np.testing.assert_allclose(nll, -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0],
                             rtol=1e-5, atol=1e-5)
  assert 0 < int(top.sum()) < top.size
  # an exact tie counts as correct (argmax would pick the lower id)
  assert bool(token_losses(jnp.zeros((1, 1, 5)), jnp.array([[3]]))[2][0, 0])


def test_norm_metrics_only_on_the_steps_the_trainer_logs(setup):
  graphdef, params = setup
  optimizer = make_optimizer(optimizer=functools.partial(adamw, learning_rate=1e-2), skip_nonfinite=False)
  every = jax.jit(make_train_step(graphdef, optimizer))
  sparse = jax.jit(make_train_step(graphdef, optimizer, norms_every=2, last_step=3))
  state_every = state_sparse = fresh_state(params, optimizer)
  for step in (1, 2, 3):
    state_every, m_every = every(state_every, batch(seed=step))
    state_sparse, m_sparse = sparse(state_sparse, batch(seed=step))
    for name in ("grad_norm", "param_norm"):
      if step == 1:  # neither a multiple of 2 nor the last step
        assert np.isnan(m_sparse[name])
      else:
        np.testing.assert_allclose(m_sparse[name], m_every[name], rtol=1e-6)
        assert m_every[name] > 0
  np.testing.assert_allclose(m_sparse["loss"], m_every["loss"], rtol=1e-6)  # training itself is unchanged
  with pytest.raises(ValueError, match="norms_every=0"):
    make_train_step(graphdef, optimizer, norms_every=0)

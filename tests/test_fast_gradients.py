"""The attention core's hand-written gradient equals automatic differentiation of the plain formula,
and skipping the blocks above a causal diagonal changes nothing on real tokens."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glam.layers.attention import attend, attend_causal_blocks
from glam.layers.masks import attention_mask


def reference_attend(q, k, v, mask, bias):
  logits = jnp.einsum("bhqd,bhkd->bhqk", q, k)
  if bias is not None:
    logits = logits + bias
  probs = jax.nn.softmax(jnp.where(mask, logits, jnp.finfo(jnp.float32).min), axis=-1)
  return jnp.einsum("bhqk,bhkd->bhqd", probs, v)


@pytest.mark.parametrize("with_bias", [False, True])
def test_attend_gradients_match_autodiff(with_bias):
  keys = jax.random.split(jax.random.key(0), 5)
  q, k, v, d_out = (jax.random.normal(key, (2, 3, 6, 4)) for key in keys[:4])
  bias = jax.random.normal(keys[4], (2, 3, 6, 6)) if with_bias else None
  segments = jnp.array([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 1]])  # two documents, one padding slot
  index = jnp.arange(6)
  mask = attention_mask(segments, segments, index, index)  # the padding row attends nothing
  inputs = (q, k, v) + ((bias,) if with_bias else ())
  with_mask = lambda fn: (lambda q, k, v, bias=None: fn(q, k, v, mask, bias))
  fast = jax.vjp(with_mask(attend), *inputs)
  slow = jax.vjp(with_mask(reference_attend), *inputs)
  np.testing.assert_allclose(fast[0], slow[0], rtol=1e-5, atol=1e-6)
  for fast_grad, slow_grad in zip(fast[1](d_out), slow[1](d_out)):
    np.testing.assert_allclose(fast_grad, slow_grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("blocks,with_bias", [(2, False), (4, True), (3, False)])
def test_causal_blocks_equal_whole_attention(blocks, with_bias):
  keys = jax.random.split(jax.random.key(1), 5)
  q, k, v, d_out = (jax.random.normal(key, (2, 3, 8, 4)) for key in keys[:4])
  bias = jax.random.normal(keys[4], (1, 3, 8, 8)) if with_bias else None
  segments = jnp.array([[1, 1, 1, 2, 2, 2, 2, 0], [1, 1, 1, 1, 1, 1, 1, 1]])  # packed, one padding slot
  index = jnp.arange(8)
  mask = attention_mask(segments, segments, index, index)
  real = (segments > 0)[:, None, :, None]  # a padding row attends nothing: uniform over whatever keys it is given
  d_out = jnp.where(real, d_out, 0.0)  # and the loss never reads it
  blocked = jax.vjp(lambda q, k, v, bias: attend_causal_blocks(q, k, v, mask, bias, blocks), q, k, v, bias)
  whole = jax.vjp(lambda q, k, v, bias: attend(q, k, v, mask, bias), q, k, v, bias)
  np.testing.assert_allclose(jnp.where(real, blocked[0], 0), jnp.where(real, whole[0], 0), rtol=1e-5, atol=1e-6)
  for blocked_grad, whole_grad in zip(blocked[1](d_out), whole[1](d_out)):
    if whole_grad is not None:
      np.testing.assert_allclose(blocked_grad, whole_grad, rtol=1e-4, atol=1e-5)


def test_causal_blocks_skip_the_keys_above_the_diagonal():
  q = k = v = jnp.ones((1, 1, 8, 4))
  mask = jnp.tril(jnp.ones((8, 8), bool))[None, None]
  jaxpr = jax.make_jaxpr(lambda q, k, v: attend_causal_blocks(q, k, v, mask, None, 4))(q, k, v)
  calls = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "custom_vjp_call"]  # one `attend` per query block
  assert [e.outvars[0].aval.shape for e in calls] == [(1, 1, 2, 4)] * 4  # 2 query rows each
  assert [e.invars[1].aval.shape[2] for e in calls] == [2, 4, 6, 8]  # keys up to the diagonal: 20 of 32 pairs

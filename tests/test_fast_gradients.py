"""The attention core's hand-written gradient equals automatic differentiation of the plain formula."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glam.layers.attention import attend
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

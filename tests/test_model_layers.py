"""Layers: norms, positions, masks and feed-forward variants against hand computations."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from glam.layers.context import LayerContext
from glam.layers.feedforward import FeedForward
from glam.layers.masks import attention_mask
from glam.layers.norms import RMSNorm
from glam.layers.position import apply_rotary, relative_bucket


def test_rmsnorm_gives_unit_rms():
  x = jax.random.normal(jax.random.key(0), (3, 5, 16)) * 7.0
  y = RMSNorm(16)(x)
  np.testing.assert_allclose(np.sqrt(np.mean(np.square(y), -1)), 1.0, rtol=1e-4)


def test_rotary_keeps_norms_and_depends_only_on_relative_position():
  q = jax.random.normal(jax.random.key(0), (1, 1, 2, 8))
  k = jax.random.normal(jax.random.key(1), (1, 1, 2, 8))
  rot = lambda x, p: apply_rotary(x, jnp.array([[p]]))
  np.testing.assert_allclose(jnp.linalg.norm(rot(q, 5)), jnp.linalg.norm(q), rtol=1e-5)
  score = lambda pq, pk: jnp.sum(rot(q, pq) * rot(k, pk))
  np.testing.assert_allclose(score(7, 3), score(14, 10), rtol=1e-4)
  assert abs(float(score(7, 3) - score(7, 4))) > 1e-4


def test_relative_bucket_exact_then_logarithmic():
  offsets = -jnp.array([0, 1, 15, 16, 100, 128, 5000])
  buckets = relative_bucket(offsets, num_buckets=32, max_distance=128)
  assert buckets.tolist()[:3] == [0, 1, 15]  # exact below num_buckets // 2
  assert 16 <= buckets[3] < buckets[4] < 32
  assert buckets[5] == buckets[6] == 31  # far keys share the last bucket
  assert relative_bucket(jnp.array([3]), 32, 128).tolist() == [0]  # future keys: unused, bucket 0


def test_mask_is_causal_within_segments_and_prefix_bidirectional():
  segments = jnp.array([[1, 1, 1, 2, 2, 0]])
  index = jnp.arange(6)
  mask = attention_mask(segments, segments, index, index)[0, 0]
  expected = np.array([[1, 0, 0, 0, 0, 0],
                       [1, 1, 0, 0, 0, 0],
                       [1, 1, 1, 0, 0, 0],
                       [0, 0, 0, 1, 0, 0],
                       [0, 0, 0, 1, 1, 0],
                       [0, 0, 0, 0, 0, 0]], bool)
  np.testing.assert_array_equal(mask, expected)
  prefix = jnp.array([[1, 1, 0, 1, 0, 0]])
  pmask = attention_mask(segments, segments, index, index, prefix, prefix)[0, 0]
  assert pmask[0, 1] and not pmask[0, 2]  # prefix sees prefix ahead of it, not targets
  assert not pmask[0, 3]  # never across documents


@pytest.mark.parametrize("activation,gated", [("gelu", False), ("relu", False), ("geglu", True), ("swiglu", True)])
def test_feedforward_matches_formula(activation, gated):
  ffn = FeedForward(8, d_ff=16, activation=activation, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(2), (2, 3, 8))
  ctx = LayerContext(mask=None, query_positions=None, key_positions=None)
  y, _, _ = ffn(x, ctx)
  h = x @ ffn.wi[...]
  if gated:
    act = jax.nn.gelu if activation == "geglu" else jax.nn.silu
    h = act(x @ ffn.wi_gate[...]) * h
  else:
    h = {"gelu": jax.nn.gelu, "relu": jax.nn.relu}[activation](h)
  np.testing.assert_allclose(y, h @ ffn.wo[...], rtol=1e-5, atol=1e-5)
  assert (ffn.wi_gate is not None) == gated


def test_bad_activation_names_the_binding():
  with pytest.raises(ValueError, match=r"FeedForward.activation='tanh'.*geglu"):
    FeedForward(8, d_ff=16, activation="tanh", rngs=nnx.Rngs(0))


def test_attention_causal_blocks_change_nothing_on_real_tokens():
  from glam.layers.attention import Attention
  segments = jnp.array([[1, 1, 1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 1, 1, 1, 1]])  # packed, one padding slot
  positions = jnp.array([[0, 1, 2, 3, 0, 1, 2, 0], list(range(8))])
  index = jnp.arange(8)
  ctx = LayerContext(attention_mask(segments, segments, index, index), positions, positions, causal=True)
  x = jax.random.normal(jax.random.key(0), (2, 8, 16))
  whole = Attention(16, num_heads=2, head_dim=8, causal_blocks=1, rngs=nnx.Rngs(0))
  split = Attention(16, num_heads=2, head_dim=8, causal_blocks=4, causal_blocks_min_length=8, rngs=nnx.Rngs(0))
  short = Attention(16, num_heads=2, head_dim=8, causal_blocks=4, rngs=nnx.Rngs(0))  # 8 < the default 256

  def run(layer):
    out = jax.jit(lambda x: layer(x, ctx)[0])
    return out(x), jax.make_jaxpr(lambda x: layer(x, ctx)[0])(x)

  (y_whole, _), (y_split, jaxpr_split), (y_short, jaxpr_short) = run(whole), run(split), run(short)
  real = (segments > 0)[..., None]
  np.testing.assert_allclose(jnp.where(real, y_split, 0), jnp.where(real, y_whole, 0), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(y_short, y_whole)
  count = lambda jaxpr: str(jaxpr).count("custom_vjp_call")
  assert count(jaxpr_split) == 4 and count(jaxpr_short) == 1

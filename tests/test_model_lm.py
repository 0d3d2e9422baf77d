"""The decoder LM: packing isolation, prefix-LM, KV cache, scan, remat, dtypes, summary."""
import functools

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from glam.models.decode import generate, init_cache
from glam.models.lm import DecoderLM, unstack_layers
from glam.models.summary import abstract_model, count_parameters, flops_per_token

TINY = dict(vocab_size=40, d_model=32, num_blocks=2)


@pytest.fixture(autouse=True)
def small_heads():
  gin.clear_config()
  gin.bind_parameter("Attention.num_heads", 2)
  gin.bind_parameter("Attention.head_dim", 8)
  gin.bind_parameter("FeedForward.d_ff", 64)
  yield
  gin.clear_config()


def tokens(shape, seed=0):
  return jax.random.randint(jax.random.key(seed), shape, 3, TINY["vocab_size"])


@pytest.fixture(scope="module")
def model():
  gin.bind_parameter("Attention.num_heads", 2)
  gin.bind_parameter("Attention.head_dim", 8)
  gin.bind_parameter("FeedForward.d_ff", 64)
  return DecoderLM(**TINY, rngs=nnx.Rngs(0))


def test_packed_documents_do_not_see_each_other(model):
  doc_a, doc_b = tokens((1, 5), 1), tokens((1, 4), 2)
  packed = jnp.concatenate([doc_a, doc_b], axis=1)
  segments = jnp.array([[1] * 5 + [2] * 4])
  positions = jnp.array([list(range(5)) + list(range(4))])
  together = model(packed, segment_ids=segments, positions=positions).logits
  np.testing.assert_allclose(together[:, 5:], model(doc_b).logits, atol=1e-5)
  np.testing.assert_allclose(together[:, :5], model(doc_a).logits, atol=1e-5)


def test_causal_future_tokens_do_not_change_the_past(model):
  x = tokens((1, 8))
  changed = x.at[0, 6].set(3)
  np.testing.assert_allclose(model(x).logits[:, :6], model(changed).logits[:, :6], atol=1e-6)
  assert not np.allclose(model(x).logits[:, 6:], model(changed).logits[:, 6:])


def test_prefix_lm_prefix_is_bidirectional(model):
  x = tokens((1, 8))
  prefix = jnp.array([[1, 1, 1, 1, 0, 0, 0, 0]])
  changed = x.at[0, 3].set(3)  # last prefix token
  before = model(x, prefix_mask=prefix).logits
  after = model(changed, prefix_mask=prefix).logits
  assert not np.allclose(before[:, :3], after[:, :3])  # earlier prefix tokens see it
  np.testing.assert_allclose(model(x).logits[:, :3], model(changed).logits[:, :3], atol=1e-6)  # causal: not


@pytest.mark.parametrize("position,scan_layers", [("rotary", True), ("relative_bias", True), ("rotary", False)])
def test_kv_cache_decoding_matches_full_forward(position, scan_layers):
  gin.bind_parameter("Attention.position", position)
  model = DecoderLM(**TINY, scan_layers=scan_layers, rngs=nnx.Rngs(1))
  x = tokens((2, 9))
  full = model(x).logits
  cache = init_cache(model, 2, 12)
  out = model(x[:, :5], cache=cache)
  pieces = [out.logits]
  for t in range(5, 9):
    out = model(x[:, t:t + 1], positions=jnp.full((2, 1), t), cache=out.cache)
    pieces.append(out.logits)
  np.testing.assert_allclose(jnp.concatenate(pieces, 1), full, atol=2e-5)


def test_generate_greedy_equals_argmax_of_full_forward_with_ragged_prompts(model):
  prompts = [[5, 6, 7, 8, 9], [10, 11]]
  generated = generate(model, prompts, 4)
  for prompt, new in zip(prompts, generated):
    seq = list(prompt)
    for _ in range(4):
      seq.append(int(jnp.argmax(model(jnp.array([seq])).logits[0, -1])))
    assert new == seq[len(prompt):]


def test_generate_sampling_is_seeded_and_top_k_restricts(model):
  a = generate(model, [[5, 6]], 6, temperature=1.0, seed=3)
  b = generate(model, [[5, 6]], 6, temperature=1.0, seed=3)
  assert a == b
  top1 = generate(model, [[5, 6]], 6, temperature=1.0, top_k=1, seed=4)
  assert top1 == generate(model, [[5, 6]], 6)  # top-1 sampling is greedy


def test_scan_and_unrolled_agree_and_remat_keeps_gradients():
  x = tokens((2, 6))
  loss = lambda m: jnp.mean(m(x).logits ** 2)
  base = DecoderLM(**TINY, rngs=nnx.Rngs(2))
  grads = nnx.grad(loss)(base)
  for kwargs in (dict(scan_layers=False), dict(remat_policy="full"), dict(remat_policy="dots"),
                 dict(scan_layers=False, remat_policy="full")):
    other = DecoderLM(**TINY, **kwargs, rngs=nnx.Rngs(2))
    np.testing.assert_allclose(other(x).logits, base(x).logits, atol=1e-5)
    for a, b in zip(jax.tree.leaves(nnx.grad(loss)(other)), jax.tree.leaves(grads)):
      np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


def test_unrolled_blocks_stack_their_gradients_without_zero_padded_copies():
  stacked = {"w": jnp.arange(12.0).reshape(3, 2, 2), "b": jnp.ones((3, 2))}
  loss = lambda s: sum(jnp.sum(layer["w"] ** 2) * (i + 1) + jnp.sum(layer["b"]) * i
                       for i, layer in enumerate(unstack_layers(s, 3)))
  grads = jax.grad(loss)(stacked)
  np.testing.assert_allclose(grads["w"], 2 * stacked["w"] * jnp.arange(1.0, 4.0)[:, None, None])
  np.testing.assert_allclose(grads["b"], jnp.broadcast_to(jnp.arange(3.0)[:, None], (3, 2)))
  # Plain slices' transpose pads each layer's gradient to the whole stack and sums the pads
  hlo = lambda f: jax.jit(jax.grad(f)).lower(stacked).as_text()
  sliced = lambda s: sum(
      jnp.sum(s["w"][i] ** 2) * (i + 1) + jnp.sum(s["b"][i]) * i for i in range(3))
  assert "stablehlo.pad" in hlo(sliced)
  assert "stablehlo.pad" not in hlo(loss) and "stablehlo.concatenate" in hlo(loss)


def test_bfloat16_compute_keeps_float32_params_and_close_logits(model):
  low = DecoderLM(**TINY, dtype="bfloat16", rngs=nnx.Rngs(0))
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(low, nnx.Param)))
  x = tokens((1, 8))
  assert low(x).logits.dtype == jnp.float32
  np.testing.assert_allclose(low(x).logits, model(x).logits, atol=0.15)


def test_tied_embeddings_have_no_output_kernel():
  tied = DecoderLM(**TINY, tie_embeddings=True, rngs=nnx.Rngs(0))
  assert not hasattr(tied, "logits_kernel")
  assert tied(tokens((1, 4))).logits.shape == (1, 4, TINY["vocab_size"])


def test_summary_counts_match_hand_computation():
  model = abstract_model(functools.partial(DecoderLM, **TINY))
  d, v, h, f, layers = 32, 40, 2 * 8, 64, 2
  per_layer = 4 * d * h + 3 * d * f + 2 * d  # q k v o, geglu (3 matrices), two norms
  expected = layers * per_layer + 2 * v * d + d
  counts = count_parameters(model)
  assert counts["total"] == counts["activated"] == expected
  flops = flops_per_token(model, seq_len=16)
  assert flops["matmul_params"] == layers * (4 * d * h + 3 * d * f) + v * d
  assert flops["train"] == 6 * flops["matmul_params"] + 12 * layers * h * 16


@pytest.mark.parametrize("kwargs,message", [
    (dict(block=("attn", "conv")), r"unknown sub-layer kind 'conv'.*'attn', 'ffn'"),
    (dict(num_blocks=0), r"DecoderLM.num_blocks=0"),
    (dict(remat_policy="some"), r"DecoderLM.remat_policy='some'"),
    (dict(dtype="int8"), r"DecoderLM.dtype='int8'"),
])
def test_bad_model_config_names_the_binding(kwargs, message):
  with pytest.raises(ValueError, match=message):
    DecoderLM(**{**TINY, **kwargs}, rngs=nnx.Rngs(0))

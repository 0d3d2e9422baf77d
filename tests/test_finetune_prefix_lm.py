"""Packed instruction batches through the model: prefix-LM over the inputs, no attention across
examples, and a train-step loss over the target tokens only."""
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from glam.data.examples import Example
from glam.data.pipeline import LmPipeline
from glam.data.vocab import ByteVocabulary
from glam.models.lm import DecoderLM
from glam.train.step import forward, make_train_step, token_losses
from glam.train.optimizers import adamw

VOCAB = ByteVocabulary()


class FixedExamples:
  yields_examples = True

  def __init__(self, examples, prefix_lm):
    self.examples, self.prefix_lm = examples, prefix_lm
    self.num_documents, self.domain_names = len(examples), ("t",)

  def document(self, index):
    return self.examples[index]


@pytest.fixture(scope="module")
def model_and_logits():
  with gin.unlock_config():
    gin.bind_parameter("Attention.num_heads", 2)
    gin.bind_parameter("Attention.head_dim", 8)
    gin.bind_parameter("FeedForward.d_ff", 32)
    model = DecoderLM(vocab_size=260, d_model=16, num_blocks=1, rngs=nnx.Rngs(0))
  gin.clear_config()
  graphdef, params = nnx.split(model)
  run = jax.jit(lambda batch: forward(graphdef, params, batch, deterministic=True).logits)
  return graphdef, params, run


def packed(first_inputs="abcd", second_target="xy", prefix_lm=True):
  examples = [Example(first_inputs, "ef", "t"), Example("gh", second_target, "t")]
  return next(LmPipeline(FixedExamples(examples, prefix_lm), VOCAB, 1, 16, shuffle=False))


def changed(run, a, b, positions) -> bool:
  a, b = np.asarray(run(a)), np.asarray(run(b))
  return not np.allclose(a[0, positions], b[0, positions], atol=1e-6)


def test_prefix_lm_inputs_see_later_inputs_but_never_targets(model_and_logits):
  _, _, run = model_and_logits
  base = packed()
  # Row: [a b c d e f eos][g h x y eos]; example one's input positions are 0..4.
  np.testing.assert_array_equal(base["prefix_mask"][0, :7], [1, 1, 1, 1, 1, 0, 0])
  # The last input token ("d", read at position 4) reaches position 0 with the prefix mask ...
  assert changed(run, base, packed(first_inputs="abcz"), [0])
  # ... but not without it (causal).
  assert not changed(run, packed(prefix_lm=False), packed(first_inputs="abcz", prefix_lm=False), [0, 1, 2, 3])
  # Target tokens never leak back into input positions, and examples never see each other.
  other_target = packed(second_target="zz")
  assert not changed(run, base, other_target, list(range(7)) + [7, 8, 9])
  assert changed(run, base, other_target, [11])
  assert not changed(run, base, packed(first_inputs="zzzz"), list(range(7, 12)))  # 12.. is padding


def test_train_loss_counts_target_tokens_only(model_and_logits):
  graphdef, params, run = model_and_logits
  batch = packed()
  optimizer = adamw(learning_rate=0.0)
  pure = nnx.to_pure_dict(params)
  state = {"step": jnp.int32(0), "params": pure, "opt_state": optimizer.init(pure)}
  _, metrics = jax.jit(make_train_step(graphdef, optimizer))(state, batch)
  nll, _, _ = token_losses(run(batch), batch["targets"])
  targets_only = batch["loss_weights"][0] > 0
  assert targets_only.sum() == 3 + 3  # "ef" + eos, "xy" + eos
  np.testing.assert_allclose(float(metrics["loss"]), float(np.asarray(nll)[0][targets_only].mean()), rtol=1e-5)
  assert float(metrics["loss"]) != pytest.approx(float(np.asarray(nll)[0][batch["segment_ids"][0] > 0].mean()))

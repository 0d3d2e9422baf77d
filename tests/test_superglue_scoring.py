"""Prompts, the T5 cast, batched rank classification and generation (with and without KV cache)."""
import gin
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from glam.data.vocab import ByteVocabulary
from glam.eval.superglue import prompts
from glam.eval.superglue.runner import rank_task
from glam.eval.superglue.scoring import greedy_generate, score_continuations
from glam.eval.superglue.tasks import TASKS
from glam.models.lm import DecoderLM, LmOutput

VOCAB = ByteVocabulary()


class BigramModel(nnx.Module):
  """logits[t] = table[input t]: a model whose preferences we set by hand."""

  def __init__(self, table: np.ndarray):
    self.table = nnx.Param(jnp.asarray(table, jnp.float32))

  def __call__(self, inputs, *, segment_ids=None, positions=None, prefix_mask=None, cache=None,
               deterministic=True):
    return LmOutput(self.table[...][inputs], jnp.zeros(()), {}, None)


def bigram(prefer_after_space: str, size: int = 259, seed: int = 0) -> np.ndarray:
  table = np.random.default_rng(seed).normal(size=(size, size)).astype(np.float32)
  table[VOCAB.encode(" ")[0], VOCAB.encode(prefer_after_space)[0]] = 20.0
  return table


def log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_batched_scores_equal_hand_computed_bigram_log_likelihoods():
  table = bigram("y")
  model = BigramModel(table)
  rows = [(VOCAB.encode("abc"), VOCAB.encode(" yes")), (VOCAB.encode("a much longer context here"), VOCAB.encode("!")),
          (VOCAB.encode(""), VOCAB.encode("xy")), (VOCAB.encode("q" * 40), VOCAB.encode(" no")),
          (VOCAB.encode("hello"), VOCAB.encode(" maybe"))]
  totals, counts = score_continuations(model, rows, batch_size=2, max_length=64)
  logp = log_softmax(table.astype(np.float64))
  for (context, option), total, count in zip(rows, totals, counts):
    sequence = [0] + context + option  # 0 is the start input
    expected = sum(logp[sequence[i - 1], sequence[i]] for i in range(len(context) + 1, len(sequence)))
    assert count == len(option) and total == pytest.approx(expected, abs=1e-4)
  # truncation keeps the end of the context: a 40-token context cut to fit 8 tokens
  short, _ = score_continuations(model, [(VOCAB.encode("q" * 40), VOCAB.encode(" no"))], batch_size=1, max_length=8)
  assert short[0] == pytest.approx(totals[3], abs=1e-4)  # bigram: only the last context token matters


@pytest.mark.parametrize("preferred,label", [("y", 1), ("n", 0)])
def test_rank_classification_picks_the_option_the_model_prefers(preferred, label):
  examples = [{"idx": i, "question": f"q{i}", "passage": f"passage {i}", "label": i % 2} for i in range(5)]
  results = rank_task(BigramModel(bigram(preferred)), VOCAB, TASKS["boolq"], examples, [], shots=0, seed=0,
                      batch_size=4, max_length=64, length_normalised=True, prefix_lm=False, progress=None)
  assert [r["prediction"] for r in results] == [label] * 5
  assert all(set(r["scores"]) == {"False", "True"} for r in results)


def test_record_ranks_candidate_entities():
  table = bigram("M")  # after a space, "M" is likely: " Merkel" wins
  example = {"idx": {"passage": 0, "query": 0}, "passage": "Obama met Merkel.\n@highlight\nTalks",
             "query": "They said @placeholder hosted", "entities": ["Obama", "Merkel", "Berlin"],
             "answers": ["Merkel"], "label": None}
  prompt = prompts.rank_prompt(TASKS["record"], example)
  assert prompt.context.endswith("- Talks\nThey said") and prompt.options[1] == " Merkel hosted"
  results = rank_task(BigramModel(table), VOCAB, TASKS["record"], [example], [], shots=0, seed=0, batch_size=2,
                      max_length=128, length_normalised=True, prefix_lm=False, progress=None)
  assert results[0]["prediction"] == "Merkel"


def test_t5_casting_and_postprocessing():
  rte = {"idx": 0, "premise": "P.", "hypothesis": "H.", "label": 1}
  assert prompts.to_text_to_text("rte", rte) == ("rte hypothesis: H. premise: P.\n", "not_entailment")
  axb = {"idx": 0, "sentence1": "S1.", "sentence2": "S2.", "label": 0}
  assert prompts.to_text_to_text("axb", axb) == ("rte hypothesis: S2. premise: S1.\n", "entailment")
  copa = {"idx": 0, "premise": "P.", "choice1": "A.", "choice2": "B.", "question": "cause", "label": 1}
  assert prompts.to_text_to_text("copa", copa)[0] == "copa choice1: A. choice2: B. premise: P. question: cause\n"
  multirc = {"idx": {}, "paragraph": "<b>Sent 1: </b>Hi.<br>", "question": "Q?", "answer": "A", "label": 1}
  assert prompts.to_text_to_text("multirc", multirc) == ("multirc question: Q? answer: A paragraph: Sent 1: Hi.\n", "True")
  wsc = {"idx": 0, "text": "Mark told Pete that he was late.", "span1_text": "Mark", "span1_index": 0,
         "span2_text": "he", "span2_index": 4, "label": 0}
  assert prompts.to_text_to_text("wsc", wsc) == ("wsc: Mark told Pete that *he* was late.\n", "Mark")
  assert prompts.text_to_text_training_pairs("wsc", wsc) == []  # only correct referents are learnt
  record = {"idx": {}, "passage": "A went.\n@highlight\nB came", "query": "@placeholder left",
            "entities": ["A", "B"], "answers": ["A", "B"], "label": None}
  assert prompts.to_text_to_text("record", record)[0] == "record query: @placeholder left entities: A, B passage: A went. B came\n"
  assert [t for _, t in prompts.text_to_text_training_pairs("record", record)] == ["A", "B"]
  assert prompts.postprocess(TASKS["cb"], {}, " Neutral\n") == 2
  assert prompts.postprocess(TASKS["cb"], {}, "perhaps") is None
  assert prompts.postprocess(TASKS["wsc"], wsc, "mark") == 1 and prompts.postprocess(TASKS["wsc"], wsc, "Pete") == 0
  assert prompts.wsc_refers("the dog", "The big dog") and not prompts.wsc_refers("the dog's", "the dog")


@pytest.fixture(scope="module")
def tiny_lm():
  with gin.unlock_config():
    gin.bind_parameter("Attention.num_heads", 2)
    gin.bind_parameter("Attention.head_dim", 8)
    gin.bind_parameter("FeedForward.d_ff", 32)
    model = DecoderLM(vocab_size=259, d_model=16, num_blocks=2, rngs=nnx.Rngs(3))
  gin.clear_config()
  return model


@pytest.mark.parametrize("prefix_lm", [False, True])
def test_generation_with_and_without_kv_cache_gives_the_same_tokens(tiny_lm, prefix_lm):
  texts = ["rte h: a p: b\n", "cb x\n", "wsc: *he* ran\n"]  # one length bucket: one compile
  prompts_ids = [[0] + VOCAB.encode(t) for t in texts]
  settings = dict(max_new_tokens=6, batch_size=2, max_length=64, eos_id=-1, prefix_lm=prefix_lm)
  cached = greedy_generate(tiny_lm, prompts_ids, use_cache=True, **settings)
  uncached = greedy_generate(tiny_lm, prompts_ids, use_cache=False, **settings)
  assert cached == uncached and all(len(ids) == 6 for ids in cached)
  # batching does not change a row's tokens
  alone = greedy_generate(tiny_lm, prompts_ids[1:2], use_cache=True, **settings)
  assert alone[0] == cached[1]

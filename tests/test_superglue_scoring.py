"""Prompts, the T5 cast, batching, rank classification (shared-context cache against whole rows) and
generation (with and without KV cache, early stop at eos)."""
import json
import os

import gin
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from glam.data.vocab import ByteVocabulary
from glam.eval.superglue import prompts
from glam.eval.superglue.batching import bucket_length, padded_rows, plan_calls
from glam.eval.superglue.generation import greedy_generate
from glam.eval.superglue.runner import rank_task
from glam.eval.superglue.scoring import score_options
from glam.eval.superglue.tasks import TASKS
from glam.models.lm import DecoderLM, LmOutput

VOCAB = ByteVocabulary()


class BigramModel(nnx.Module):
  """logits[t] = table[input t]: a model whose preferences we set by hand. It has no attention,
  so its KV cache (glam.models.decode.init_cache) holds no layers and passes through."""
  block_spec, num_blocks, dtype = ("ffn",), 1, jnp.float32

  def __init__(self, table: np.ndarray):
    self.table = nnx.Param(jnp.asarray(table, jnp.float32))

  def __call__(self, inputs, *, segment_ids=None, positions=None, prefix_mask=None, cache=None,
               deterministic=True):
    return LmOutput(self.table[...][inputs], jnp.zeros(()), {}, cache)


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
  groups = [("abc", [" yes", "n"]), ("a much longer context here", ["!"]), ("", ["xy", "z", "xyz"]),
            ("q" * 40, [" no"]), ("hello", [" maybe", " so"])]
  groups = [(VOCAB.encode(context), [VOCAB.encode(o) for o in options]) for context, options in groups]
  logp = log_softmax(table.astype(np.float64))
  for use_cache in (True, False):
    scores = score_options(model, groups, batch_size=2, max_length=64, use_cache=use_cache)
    for (context, options), totals in zip(groups, scores):
      assert len(totals) == len(options)
      for option, total in zip(options, totals):
        sequence = [0] + context + option  # 0 is the start input
        expected = sum(logp[sequence[i - 1], sequence[i]] for i in range(len(context) + 1, len(sequence)))
        assert total == pytest.approx(expected, abs=1e-4)
  # truncation keeps the end of the context: a 40-token context cut to fit 8 tokens
  short = score_options(model, groups[3:4], batch_size=1, max_length=8)
  assert short[0][0] == pytest.approx(scores[3][0], abs=1e-4)  # bigram: only the last context token matters


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


@pytest.mark.parametrize("length_normalised", [True, False])
def test_rank_scores_are_mean_or_summed_option_log_likelihoods(length_normalised):
  """ReCoRD candidates of different lengths: each score is the option's summed token log-probability,
  divided by its token count when length-normalised (GLaM's default), and the best one wins."""
  table = bigram("M")
  example = {"idx": {"passage": 0, "query": 0}, "passage": "A met B.\n@highlight\nTalks", "query": "So @placeholder",
             "entities": ["A", "Merkel Angela", "Bo"], "answers": ["A"], "label": None}
  results = rank_task(BigramModel(table), VOCAB, TASKS["record"], [example], [], shots=0, seed=0, batch_size=2,
                      max_length=128, length_normalised=length_normalised, prefix_lm=False, progress=None)
  prompt, logp = prompts.rank_prompt(TASKS["record"], example), log_softmax(table.astype(np.float64))
  context = VOCAB.encode(prompt.context)
  expected = {}
  for entity, option in zip(example["entities"], prompt.options):
    sequence = [0] + context + VOCAB.encode(option)
    total = sum(logp[sequence[i - 1], sequence[i]] for i in range(len(context) + 1, len(sequence)))
    expected[entity] = total / len(VOCAB.encode(option)) if length_normalised else total
  assert results[0]["scores"] == pytest.approx(expected, abs=1e-4)
  assert results[0]["prediction"] == max(expected, key=expected.get)


def test_a_failure_mid_evaluation_writes_nothing(tmp_path, monkeypatch):
  from glam.eval.superglue import runner
  from glam.eval.superglue.readers import Split
  rte = [{"idx": i, "premise": f"p{i}", "hypothesis": "h", "label": i % 2} for i in range(2)]
  cb = [{"idx": i, "premise": f"p{i}", "hypothesis": "h", "label": i % 3} for i in range(2)]
  data = [(Split(TASKS["rte"], "validation", rte, "rte"), []), (Split(TASKS["cb"], "validation", cb, "cb"), [])]
  real_rank_task = runner.rank_task

  def fails_on_cb(model, vocab, task, *args, **kwargs):
    if task.name == "cb":
      raise RuntimeError("the model broke on cb")
    return real_rank_task(model, vocab, task, *args, **kwargs)

  monkeypatch.setattr(runner, "rank_task", fails_on_cb)
  out = tmp_path / "out"
  with pytest.raises(RuntimeError, match="broke on cb"):
    runner.evaluate_superglue(BigramModel(bigram("y")), VOCAB, data, str(out), max_length=64, progress_bar=False)
  assert not out.exists()  # rte was scored, but nothing is written until every task is
  monkeypatch.setattr(runner, "rank_task", real_rank_task)
  summary = runner.evaluate_superglue(BigramModel(bigram("y")), VOCAB, data, str(out), max_length=64,
                                      share_context=False, progress_bar=False)
  assert sorted(os.listdir(out)) == ["cb.predictions.jsonl", "metrics.json", "results.md", "rte.predictions.jsonl"]
  assert set(summary["tasks"]) == {"rte", "cb"} and summary["settings"]["share_context"] is False
  # the bigram model ignores context, so whole rows and the shared cache give the same scores
  shared = runner.rank_task(BigramModel(bigram("y")), VOCAB, TASKS["cb"], cb, [], shots=0, seed=0, batch_size=4,
                            max_length=64, length_normalised=True, prefix_lm=False, progress=None)
  with open(out / "cb.predictions.jsonl") as f:
    for line, result in zip(f, shared):
      assert json.loads(line)["scores"] == pytest.approx(result["scores"], abs=1e-4)


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
  texts = ["rte h: a p: b\n", "cb x\n", "wsc: *he* ran\n"]  # one length bucket, one call: one compile
  prompts_ids = [[0] + VOCAB.encode(t) for t in texts]
  settings = dict(max_new_tokens=6, batch_size=4, max_length=64, eos_id=-1, prefix_lm=prefix_lm)
  cached = greedy_generate(tiny_lm, prompts_ids, use_cache=True, **settings)
  uncached = greedy_generate(tiny_lm, prompts_ids, use_cache=False, **settings)
  assert cached == uncached and all(len(ids) == 6 for ids in cached)
  # the other rows of a call (and its padding) do not change a row's tokens
  others = [[0] + VOCAB.encode(t) for t in ["wic w\n", "copa: a b\n"]]
  regrouped = greedy_generate(tiny_lm, [prompts_ids[1]] + others, use_cache=True, **settings)
  assert regrouped[0] == cached[1]


def test_generation_stops_at_eos_with_the_same_tokens(tiny_lm):
  prompts_ids = [[0] + VOCAB.encode(t) for t in ["rte h: a p: b\n", "cb x\n", "wsc: *he* ran\n"]]
  settings = dict(max_new_tokens=6, batch_size=4, max_length=64, prefix_lm=False)  # the compiles above
  free = greedy_generate(tiny_lm, prompts_ids, use_cache=False, eos_id=-1, **settings)
  eos = free[0][2]  # a token row 0 emits third: decoding may stop early for that call
  stopped = greedy_generate(tiny_lm, prompts_ids, use_cache=True, eos_id=eos, **settings)
  assert stopped == [ids[:ids.index(eos) + 1] if eos in ids else ids for ids in free]
  assert len(stopped[0]) <= 3


@pytest.mark.parametrize("prefix_lm", [False, True])
def test_shared_context_scores_equal_whole_rows(tiny_lm, prefix_lm):
  """A real model (rotary positions, prefix-LM masks): each option scored after the context's KV
  cache equals the option scored in its own (context + option) row."""
  texts = [("cat sat. ok?", [" yes", " no", "!"]), ("x", [" true", " false"]), ("long one here", [" a", " long"]),
           ("", ["q", "qq"])]  # one width bucket: few compiles
  groups = [(VOCAB.encode(c), [VOCAB.encode(o) for o in options]) for c, options in texts]
  whole = score_options(tiny_lm, groups, batch_size=4, max_length=48, prefix_lm=prefix_lm, use_cache=False)
  # one call: rows of different lengths (left-padded differently) and a padded option slot
  cached = score_options(tiny_lm, groups, batch_size=4, max_length=48, prefix_lm=prefix_lm)
  for got, want in zip(cached, whole):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
  assert [len(s) for s in whole] == [3, 2, 2, 2] and np.all(np.concatenate(whole) < 0)


def test_calls_hold_few_shapes_within_the_token_budget():
  assert [bucket_length(n) for n in (1, 16, 17, 25, 33, 100, 129, 200, 513)] == [16, 16, 24, 32, 48, 128, 192, 256, 768]
  assert bucket_length(700, cap=512) == 512 and bucket_length(0, minimum=4) == 4 and bucket_length(5, minimum=2) == 6
  assert [padded_rows(n, 16) for n in (1, 2, 3, 5, 9, 16)] == [1, 2, 4, 8, 16, 16] and padded_rows(5, 6) == 6
  costs = list(np.random.default_rng(0).integers(10, 900, size=200)) + [5000]
  calls = plan_calls(costs, batch_size=16, max_batch_tokens=1024)
  assert sorted(i for call in calls for i in call) == list(range(len(costs)))
  for call in calls:
    biggest = max(costs[i] for i in call)
    assert len(call) <= 16 and (len(call) == 1 or len(call) * biggest <= 1024)
  assert calls[-1] == [200]  # over the budget: a call of its own, last (cheapest first)
  with pytest.raises(ValueError, match="max_batch_tokens=0: must be 1 or more"):
    plan_calls(costs, batch_size=4, max_batch_tokens=0)

"""Instruction data: templates, few-shot formatting, proportional mixing with caps, packing of
input/target examples (targets-only loss, prefix-LM mask, no attention across examples), resume."""
import json

import gin
import numpy as np
import pytest

from glam import config as glam_config
from glam.data.examples import Example, truncate
from glam.data.instructions import (ClassLabelFields, ExampleTask, InstructionMixture, JsonlTask,
                                    SyntheticTask, mixing_rates)
from glam.data.pipeline import LmPipeline, eval_batches
from glam.data.sources import source_from_spec
from glam.data.synthetic import split_example
from glam.data.templates import Template, few_shot, load_templates, options_text
from glam.data.vocab import ByteVocabulary
from glam.layers.masks import attention_mask

VOCAB = ByteVocabulary()


def write_templates(tmp_path, data) -> str:
  path = tmp_path / "templates.json"
  path.write_text(json.dumps(data))
  return str(path)


# --- templates and few-shot formatting -------------------------------------------------------

def test_flan_layout_templates_fill_and_errors(tmp_path):
  path = write_templates(tmp_path, {"rte": [{"input": "{premise} -> {hypothesis}?\n{options_}", "target": "{answer}"},
                                            {"input": "P: {premise}", "target": "{answer}!"}]})
  templates = load_templates(path)
  assert templates["rte"][1] == Template("P: {premise}", "{answer}!")
  fields = ClassLabelFields(["yes", "no"])({"premise": "a", "hypothesis": "b", "label": "1"})
  assert templates["rte"][0].fill(fields, "rte 0") == ("a -> b?\nOPTIONS:\n- yes\n- no", "no")
  with pytest.raises(ValueError, match=r"rte 1: placeholder \{premise\} has no field in the example \(fields: x\)"):
    templates["rte"][1].fill({"x": "1"}, "rte 1")
  bad = write_templates(tmp_path, {"rte": [{"input": "x"}]})
  with pytest.raises(ValueError, match=r"templates.json: task 'rte' template 0: expected"):
    load_templates(bad)
  (tmp_path / "broken.json").write_text('{"rte": [\n  {"input": }]}')
  with pytest.raises(ValueError, match=r"broken.json:2: malformed JSON"):
    load_templates(str(tmp_path / "broken.json"))


def test_few_shot_layout():
  assert few_shot([("1+1=", "2"), ("2+2=", "4")], "3+3=") == "1+1=\n2\n\n2+2=\n4\n\n3+3="
  assert few_shot([("a", "b")], "c", exemplar_separator=" | ", answer_separator=" => ") == "a => b | c"
  assert few_shot([], "q") == "q"
  assert options_text(["x", "y"]) == "OPTIONS:\n- x\n- y"


def test_synthetic_examples_split_at_the_answer():
  assert split_example("12+30=42, 7*8=56", "arithmetic") == ("12+30=42, 7*8=", "56")
  assert split_example("copy: abc | abc", "copy") == ("copy: abc | ", "abc")
  assert split_example("c:4 a:9 ; a ? 9", "kv_recall") == ("c:4 a:9 ; a ? ", "9")
  assert split_example("the cat sees a dog .", "sentences") == ("the cat sees a ", "dog .")
  task = SyntheticTask("reverse", seed=5)
  fields = task.fields(3)
  word = fields["question"].split(" | ")[0].removeprefix("reverse: ")
  assert fields["answer"] == word[::-1] and len(word) >= 5


# --- mixing ----------------------------------------------------------------------------------

def test_examples_proportional_rates_with_cap():
  # sizes 2, 10, 1000 with cap 100 -> weights 2 : 10 : 100; infinite tasks count as the cap.
  np.testing.assert_allclose(mixing_rates([2, 10, 1000], 100, "abc"), np.array([2, 10, 100]) / 112)
  np.testing.assert_allclose(mixing_rates([2, 10, 1000], None, "abc"), np.array([2, 10, 1000]) / 1012)
  np.testing.assert_allclose(mixing_rates([None, 50], 100, "ab"), [2 / 3, 1 / 3])
  with pytest.raises(ValueError, match=r"cap=None: task 'a' is infinite"):
    mixing_rates([None, 5], None, "ab")


def pair_task(name, count):
  return ExampleTask(name, [(f"{name}-q{i}", f"{name}-a{i}") for i in range(count)])


def test_mixture_draws_tasks_in_proportion_and_examples_uniformly():
  tasks = [pair_task("small", 2), pair_task("mid", 10), pair_task("big", 1000)]
  mixture = InstructionMixture(tasks, cap=100, seed=3)
  draws = [mixture.document(i) for i in range(6000)]
  counts = {name: sum(d.domain == name for d in draws) for name in ("small", "mid", "big")}
  expected = {"small": 6000 * 2 / 112, "mid": 6000 * 10 / 112, "big": 6000 * 100 / 112}
  for name in counts:  # within 4 binomial standard deviations
    p = expected[name] / 6000
    assert abs(counts[name] - expected[name]) < 4 * np.sqrt(6000 * p * (1 - p)) + 1, (name, counts)
  small = [d for d in draws if d.domain == "small"]
  assert {d.inputs for d in small} == {"small-q0", "small-q1"}  # identity template: the pair as is
  assert all(d.targets == d.inputs.replace("-q", "-a") for d in draws)
  assert mixture.document(17) == InstructionMixture(tasks, cap=100, seed=3).document(17)  # pure in (seed, i)
  assert [mixture.document(i) for i in range(20)] != [InstructionMixture(tasks, cap=100, seed=4).document(i)
                                                      for i in range(20)]


def test_templates_are_sampled_per_example_and_few_shot_uses_the_same_task(tmp_path):
  path = write_templates(tmp_path, {"qa": [{"input": "Q1 {q}", "target": "{a}"},
                                           {"input": "Q2 {q}", "target": "<{a}>"}]})
  task = ExampleTask("qa", [{"q": f"x{i}", "a": f"y{i}"} for i in range(50)])
  mixture = InstructionMixture([task], templates_path=path, num_shots=2, few_shot_fraction=0.5, seed=1)
  examples = [mixture.document(i) for i in range(400)]
  first = [e for e in examples if e.inputs.startswith("Q1")]
  assert 120 < len(first) < 280  # two templates, uniformly
  zero_shot = [e for e in examples if "\n\n" not in e.inputs]
  assert 120 < len(zero_shot) < 280  # few_shot_fraction 0.5
  for example in examples:
    *shots, query = example.inputs.split("\n\n")
    assert len(shots) in (0, 2)
    number = query.split(" ")[1][1:]
    assert example.targets == (f"y{number}" if query.startswith("Q1") else f"<y{number}>")
    for shot in shots:  # "Q2 x7\n<y7>": same template as the query, its own answer, never the query
      shot_input, shot_target = shot.split("\n")
      assert shot_input.split(" ")[0] == query.split(" ")[0]
      assert shot_target.strip("<>") == "y" + shot_input.split(" ")[1][1:]
      assert shot_input != query


def test_mixture_errors_name_the_problem(tmp_path):
  path = write_templates(tmp_path, {"other": [{"input": "{q}", "target": "{a}"}]})
  with pytest.raises(ValueError, match=r"task 'qa': no templates of its own, none under 'qa'.*it has: other"):
    InstructionMixture([ExampleTask("qa", [{"q": "1", "a": "2"}])], templates_path=path)
  with pytest.raises(ValueError, match=r"repeat a name"):
    InstructionMixture([pair_task("a", 2), pair_task("a", 3)])
  with pytest.raises(ValueError, match=r"no tasks given"):
    InstructionMixture([])
  with pytest.raises(ValueError, match=r"task 'x' example 1: expected an \(input, target\) pair"):
    ExampleTask("x", [("a", "b"), 7])
  (tmp_path / "t.jsonl").write_text('{"input": "a", "target": "b"}\n\n[1]\n')
  with pytest.raises(ValueError, match=r"t.jsonl:3: expected a JSON object of fields"):
    JsonlTask("t", str(tmp_path / "t.jsonl"))


def test_jsonl_task_and_gin_spec_with_scopes(tmp_path):
  (tmp_path / "a.jsonl").write_text('{"input": "hi", "target": "there"}\n{"input": "2+2", "target": "4"}\n')
  glam_config.register_configurables()
  gin.parse_config(f"""
      InstructionMixture.tasks = [@JsonlTask(), @SyntheticTask()]
      JsonlTask.name = "notes"
      JsonlTask.patterns = "{tmp_path}/*.jsonl"
      SyntheticTask.domain = "copy"
      SyntheticTask.templates = [{{"input": "Q {{question}}", "target": "A {{answer}}"}}]
      InstructionMixture.cap = 10
      heldout/SyntheticTask.seed = 99
      heldout/InstructionMixture.seed = 1
  """)
  train, held = source_from_spec("mixture"), source_from_spec("mixture:heldout")
  assert train.domain_names == ("notes", "copy") and train.yields_examples
  np.testing.assert_allclose(train.rates, [2 / 12, 10 / 12])
  assert (train.seed, held.seed, held.tasks[1].corpus.seed) == (0, 1, 99)
  notes = {(e.inputs, e.targets) for e in map(train.document, range(60)) if e.domain == "notes"}
  assert notes == {("hi", "there"), ("2+2", "4")}
  copies = [e for e in map(train.document, range(20)) if e.domain == "copy"]
  assert copies and all(e.inputs.startswith("Q copy: ") and e.targets.startswith("A ") for e in copies)


# --- packing ---------------------------------------------------------------------------------

class FixedExamples:
  """A finite example source with hand-made examples."""
  yields_examples = True

  def __init__(self, examples, prefix_lm=False):
    self.examples, self.prefix_lm = examples, prefix_lm
    self.num_documents = len(examples)
    self.domain_names = tuple(sorted({e.domain for e in examples}))

  def document(self, index):
    return self.examples[index]


def test_packing_targets_only_loss_segments_and_prefix_mask():
  examples = [Example("ab", "c", "t"), Example("de", "fg", "t"), Example("hijk", "l", "t")]
  pipeline = LmPipeline(FixedExamples(examples, prefix_lm=True), VOCAB, 1, 12, shuffle=False)
  batch = next(pipeline)
  # Row: [a b c eos][d e f g eos][pad...]: "hijkl"+eos (6) does not fit in the 3 left, so it opens the next row.
  tokens = lambda text: [VOCAB.encode(ch)[0] for ch in text]
  eos = VOCAB.eos_id
  np.testing.assert_array_equal(batch["targets"][0], tokens("abc") + [eos] + tokens("defg") + [eos] + [0] * 3)
  np.testing.assert_array_equal(batch["inputs"][0], [0, *tokens("abc"), 0, *tokens("defg"), 0, 0, 0])
  np.testing.assert_array_equal(batch["segment_ids"][0], [1] * 4 + [2] * 5 + [0] * 3)
  np.testing.assert_array_equal(batch["positions"][0], [0, 1, 2, 3, 0, 1, 2, 3, 4, 0, 0, 0])
  # Loss only where the target is a target token (c, eos; f, g, eos): input tokens weigh 0.
  np.testing.assert_array_equal(batch["loss_weights"][0], [0, 0, 1, 1, 0, 0, 1, 1, 1, 0, 0, 0])
  # Prefix: the input positions plus the one reading the last input token.
  np.testing.assert_array_equal(batch["prefix_mask"][0], [1, 1, 1, 0, 1, 1, 1, 0, 0, 0, 0, 0])
  second = next(pipeline)
  np.testing.assert_array_equal(second["targets"][0, :6], tokens("hijkl") + [eos])
  np.testing.assert_array_equal(second["loss_weights"][0, :6], [0, 0, 0, 0, 1, 1])

  mask = np.asarray(attention_mask(batch["segment_ids"], batch["segment_ids"], np.arange(12), np.arange(12),
                                   batch["prefix_mask"], batch["prefix_mask"]))[0, 0]
  assert mask[0, 2] and mask[1, 2]            # inputs see each other both ways (prefix-LM)
  assert not mask[2, 3] and mask[3, 2]        # targets stay causal
  assert not mask[:4, 4:].any() and not mask[4:, :4].any()  # never across examples
  assert not mask[9:].any() and not mask[:, 9:].any()       # padding sees and is seen by nothing


def test_without_prefix_lm_there_is_no_prefix_mask_and_attention_is_causal():
  pipeline = LmPipeline(FixedExamples([Example("ab", "c", "t")]), VOCAB, 1, 8, shuffle=False)
  batch = next(pipeline)
  assert "prefix_mask" not in batch
  np.testing.assert_array_equal(batch["loss_weights"][0], [0, 0, 1, 1, 0, 0, 1, 1])


def test_truncation_keeps_the_end_of_inputs_and_at_least_half_for_targets():
  ids = lambda n, base: np.arange(base, base + n)
  assert [len(x) for x in truncate(ids(3, 0), ids(2, 10), 8)] == [3, 2]
  inputs, targets = truncate(ids(10, 0), ids(2, 100), 8)
  np.testing.assert_array_equal(inputs, ids(6, 4))
  np.testing.assert_array_equal(targets, ids(2, 100))
  inputs, targets = truncate(ids(10, 0), ids(10, 100), 8)
  assert len(inputs) == 4 and len(targets) == 4 and targets[0] == 100 and inputs[-1] == 9
  inputs, targets = truncate(ids(0, 0), ids(20, 100), 8)
  assert len(inputs) == 0 and len(targets) == 8


def test_mixture_pipeline_resumes_exactly():
  tasks = [SyntheticTask("arithmetic"), SyntheticTask("copy"), pair_task("pairs", 7)]
  args = dict(source=InstructionMixture(tasks, cap=50, num_shots=1, few_shot_fraction=0.5, prefix_lm=True),
              vocab=VOCAB, batch_size=4, seq_len=64, seed=2)
  original = LmPipeline(**args)
  for taken in (0, 3, 7):
    while original.batches < taken:
      next(original)
    state = json.loads(json.dumps(original.state()))  # as a checkpoint stores it
    resumed = LmPipeline(**args)
    resumed.restore(state)
    for _ in range(3):
      a, b = next(original), next(resumed)
      assert a.keys() == b.keys() and "prefix_mask" in a
      for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert resumed.state() == original.state()
  assert original.state()["cursors"][0][1] == 0  # whole examples: the offset stays 0
  bad = dict(state, cursors=[[0, 5], [1, 0], [2, 0], [3, 0]])
  with pytest.raises(ValueError, match=r"examples are never split"):
    LmPipeline(**args).restore(bad)
  # Several processes read disjoint slots whose rows together are the single-process batch.
  whole = eval_batches(args["source"], VOCAB, 4, 64, num_batches=1)[0]
  halves = [eval_batches(args["source"], VOCAB, 4, 64, num_batches=1, process_index=p, process_count=2)[0]
            for p in (0, 1)]
  for name in whole:
    np.testing.assert_array_equal(whole[name], np.concatenate([h[name] for h in halves]), err_msg=name)

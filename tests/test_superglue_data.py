"""SuperGLUE readers: the official JSONL layout (fixtures for all tasks), FewGLUE names, TFDS mock
data, and bad rows named by file, line and field."""
import json
import os

import pytest

from glam.eval.superglue.readers import read_jsonl_split, read_tfds_split
from glam.eval.superglue.tasks import TASKS, parse_tasks

PASSAGE = "Obama met Merkel in Berlin.\n@highlight\nThe leaders talked"


def rows_for(task: str, split: str) -> list[dict]:
  """A few rows per task in the release's own field layout (labels alternate)."""
  n = 4 if split == "train" else 3
  rows = []
  for i in range(n):
    flag = i % 2 == 0
    if task == "BoolQ":
      rows.append({"question": f"is it {i}", "passage": f"passage {i}.", "idx": i, "label": flag})
    elif task == "CB":
      rows.append({"premise": f"p{i}", "hypothesis": f"h{i}", "idx": i,
                   "label": ["entailment", "contradiction", "neutral"][i % 3]})
    elif task == "COPA":
      rows.append({"premise": f"The man fell {i}.", "choice1": "He slipped.", "choice2": "He sang.",
                   "question": ["cause", "effect"][i % 2], "idx": i, "label": i % 2})
    elif task == "MultiRC":
      rows.append({"idx": i, "version": 1.1, "passage": {"text": f"<b>Sent 1: </b>Text {i}.<br>", "questions": [
          {"question": "Who?", "idx": 10 * i, "answers": [{"text": "Ann", "idx": 100 * i, "label": 1},
                                                        {"text": "Bob", "idx": 100 * i + 1, "label": 0}]},
          {"question": "Where?", "idx": 10 * i + 1, "answers": [{"text": "Rome", "idx": 100 * i + 2, "label": 1}]}]}})
    elif task == "ReCoRD":
      rows.append({"source": "x", "idx": i, "passage": {"text": PASSAGE, "entities": [
          {"start": 0, "end": 4}, {"start": 10, "end": 15}, {"start": 20, "end": 25}, {"start": 0, "end": 4}]},
          "qas": [{"query": "@placeholder hosted the meeting", "idx": 50 + i,
                   "answers": [{"start": 10, "end": 15, "text": "Merkel"}]}]})
    elif task == "RTE":
      rows.append({"premise": f"p{i}", "hypothesis": f"h{i}", "idx": i,
                   "label": "entailment" if flag else "not_entailment"})
    elif task == "WiC":
      rows.append({"word": "bank", "sentence1": "The bank closed.", "sentence2": "The river bank.",
                   "idx": i, "label": flag, "start1": 4, "end1": 8, "start2": 10, "end2": 14, "version": 1.1})
    elif task == "WSC":
      rows.append({"text": "Mark told Pete that he was late.", "idx": i, "label": flag,
                   "target": {"span1_text": "Mark" if flag else "Pete", "span1_index": 0 if flag else 2,
                              "span2_text": "he", "span2_index": 4}})
  return rows


def ax_rows(task: str) -> list[dict]:
  if task == "AX-b":
    return [{"sentence1": f"s{i}", "sentence2": f"t{i}", "idx": i, "logic": "Negation",
             "label": ["entailment", "not_entailment"][i % 2]} for i in range(4)]
  return [{"premise": f"The nurse said {'he' if i % 2 else 'she'} was tired.", "hypothesis": "x",
           "idx": i, "pair_id": i // 2, "label": "entailment"} for i in range(4)]


def write_jsonl(path, rows) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.writelines(json.dumps(row) + "\n" for row in rows)


def write_superglue_dir(root, layout: str = "official") -> str:
  """All eight tasks (train + val.jsonl, or FewGLUE's dev32.jsonl) and, officially, AX-b and AX-g."""
  validation = "val.jsonl" if layout == "official" else "dev32.jsonl"
  for task in ("BoolQ", "CB", "COPA", "MultiRC", "ReCoRD", "RTE", "WiC", "WSC"):
    write_jsonl(os.path.join(root, task, "train.jsonl"), rows_for(task, "train"))
    write_jsonl(os.path.join(root, task, validation), rows_for(task, "validation"))
  if layout == "official":
    for task in ("AX-b", "AX-g"):
      write_jsonl(os.path.join(root, task, f"{task}.jsonl"), ax_rows(task))
  return str(root)


@pytest.fixture(scope="module")
def official(tmp_path_factory):
  return write_superglue_dir(tmp_path_factory.mktemp("superglue"))


def test_every_task_reads_into_flat_examples(official):
  for task in TASKS.values():
    split = read_jsonl_split(task, official, "validation")
    assert split.examples, task.name
    for example in split.examples:
      for name in task.text_fields:
        assert isinstance(example[name], str)
      if task.labels is not None:
        assert example["label"] in range(len(task.labels))
  boolq = read_jsonl_split(TASKS["boolq"], official, "validation").examples
  assert [e["label"] for e in boolq] == [1, 0, 1]  # true -> "True" (index 1)
  copa = read_jsonl_split(TASKS["copa"], official, "train").examples
  assert [e["label"] for e in copa] == [0, 1, 0, 1]
  wsc = read_jsonl_split(TASKS["wsc"], official, "validation").examples[1]
  assert (wsc["span1_text"], wsc["span2_index"], wsc["label"]) == ("Pete", 4, 0)


def test_multirc_nesting_is_one_example_per_answer(official):
  examples = read_jsonl_split(TASKS["multirc"], official, "validation").examples
  assert len(examples) == 3 * 3
  assert examples[4] == {"idx": {"paragraph": 1, "question": 10, "answer": 101}, "paragraph": "<b>Sent 1: </b>Text 1.<br>",
                         "question": "Who?", "answer": "Bob", "label": 0}


def test_record_entity_spans_are_inclusive_and_deduplicated(official):
  example = read_jsonl_split(TASKS["record"], official, "validation").examples[0]
  assert example["entities"] == ["Berlin", "Merkel", "Obama"]  # end inclusive, sorted, distinct
  assert example["answers"] == ["Merkel"] and example["idx"] == {"passage": 0, "query": 50}


def test_fewglue_layout_uses_dev32(tmp_path):
  root = write_superglue_dir(tmp_path, layout="fewglue")
  split = read_jsonl_split(TASKS["rte"], root, "validation")
  assert split.origin.endswith("RTE/dev32.jsonl") and len(split.examples) == 3


def test_unlabelled_test_split_reads_without_labels(tmp_path):
  write_jsonl(tmp_path / "RTE" / "test.jsonl", [{"premise": "p", "hypothesis": "h", "idx": 0}])
  assert read_jsonl_split(TASKS["rte"], str(tmp_path), "test").examples[0]["label"] is None


@pytest.mark.parametrize("task,row,message", [
    ("RTE", {"premise": "p", "idx": 0, "label": "entailment"}, r"RTE/val.jsonl:2: missing field 'hypothesis'"),
    ("RTE", {"premise": "p", "hypothesis": "h", "idx": 0, "label": "maybe"},
     r"RTE/val.jsonl:2: field 'label': 'maybe' is not a rte label \(expected entailment / not_entailment\)"),
    ("BoolQ", {"question": "q", "passage": "p", "idx": 0, "label": 2},
     r"BoolQ/val.jsonl:2: field 'label': 2 is not a boolq label"),
    ("MultiRC", {"idx": 0, "passage": {"text": "t", "questions": [
        {"question": "q", "idx": 0, "answers": [{"text": "a", "idx": 0}]}]}},
     r"MultiRC/val.jsonl:2: missing field 'passage.questions\[0\].answers\[0\].label'"),
    ("ReCoRD", {"idx": 0, "passage": {"text": "short", "entities": [{"start": 0, "end": 9}]}, "qas": []},
     r"ReCoRD/val.jsonl:2: field 'passage.entities\[0\]': span \[0, 9\] is outside the passage"),
    ("WSC", {"text": "t", "idx": 0, "label": True, "target": {"span1_text": "a", "span2_text": "b",
                                                             "span1_index": "0", "span2_index": 1}},
     r"WSC/val.jsonl:2: field 'span1_index': expected int"),
])
def test_bad_rows_name_file_line_and_field(tmp_path, task, row, message):
  good = rows_for(task, "validation")[0]
  write_jsonl(tmp_path / task / "val.jsonl", [good, row])
  with pytest.raises(ValueError, match=message):
    read_jsonl_split(parse_tasks(task)[0], str(tmp_path), "validation")


def test_empty_split_missing_file_and_unknown_task(tmp_path):
  (tmp_path / "CB").mkdir()
  (tmp_path / "CB" / "val.jsonl").write_text("\n")
  with pytest.raises(ValueError, match=r"CB/val.jsonl: the validation split of cb is empty"):
    read_jsonl_split(TASKS["cb"], str(tmp_path), "validation")
  with pytest.raises(FileNotFoundError, match=r"copa: no validation split .*COPA/val.jsonl or .*COPA/dev32.jsonl"):
    read_jsonl_split(TASKS["copa"], str(tmp_path), "validation")
  with pytest.raises(ValueError, match=r"unknown SuperGLUE task 'glue'; valid tasks: boolq, cb, copa"):
    parse_tasks("rte,glue")
  assert [t.name for t in parse_tasks("BoolQ,AX-b,rte,boolq")] == ["boolq", "axb", "rte"]
  assert len(parse_tasks("all")) == 10 and len(parse_tasks("superglue")) == 8


def test_tfds_mock_data_reads_every_task(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=4, data_dir=str(tmp_path)):
    for name in ("boolq", "multirc", "record", "wsc", "axg"):
      task = TASKS[name]
      split = read_tfds_split(task, "validation", str(tmp_path))
      assert len(split.examples) == 4 and split.origin.startswith(f"tfds:{task.tfds_name}")
      for example in split.examples:
        for field in task.text_fields:
          assert isinstance(example[field], str)
        if name == "record":
          assert all(isinstance(e, str) for e in example["entities"]) and set(example["idx"]) == {"passage", "query"}
        else:
          assert example["label"] is None or example["label"] in range(len(task.labels))
      if name == "multirc":
        assert set(split.examples[0]["idx"]) == {"paragraph", "question", "answer"}


def test_text_to_text_tasks_for_the_finetuning_mixture(official):
  from glam.eval.superglue.finetune_data import superglue_text_to_text_tasks
  tasks = {t.name: t for t in superglue_text_to_text_tasks(tasks="all", data_dir=official)}
  assert sorted(tasks) == ["boolq", "cb", "copa", "multirc", "record", "rte", "wic", "wsc"]  # no diagnostics
  assert tasks["wsc"].num_examples == 2  # only the two train rows whose candidate is the referent
  assert tasks["multirc"].num_examples == 4 * 3 and tasks["record"].num_examples == 4
  assert tasks["rte"].fields(1) == {"input": "rte hypothesis: h1 premise: p1\n", "target": "not_entailment"}


def test_demonstrations_are_distinct_and_fixed_by_seed():
  from glam.eval.superglue.prompts import demonstration, few_shot_context
  from glam.eval.superglue.runner import draw_demonstrations
  pool = [{"idx": i, "premise": f"p{i}", "hypothesis": f"h{i}", "label": i % 2} for i in range(10)]
  first = draw_demonstrations(pool, 3, seed=7, number=0)
  assert first == draw_demonstrations(pool, 3, seed=7, number=0) and len({d["idx"] for d in first}) == 3
  assert first != draw_demonstrations(pool, 3, seed=8, number=0) or first != draw_demonstrations(pool, 3, seed=7, number=1)
  shown = [demonstration(TASKS["rte"], d) for d in first]
  assert shown[0].endswith("answer: true" if first[0]["label"] == 0 else "answer: false")
  assert few_shot_context("QUERY", shown).split("\n\n") == shown + ["QUERY"]

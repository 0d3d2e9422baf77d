"""Read SuperGLUE splits into flat example dicts (see tasks.py): JSONL files or TFDS.

JSONL folders may use the official release layout (BoolQ/train.jsonl, val.jsonl, test.jsonl;
AX-b/AX-b.jsonl) or the FewGLUE one (train.jsonl, dev32.jsonl): the validation split is val.jsonl
when present, else dev32.jsonl. Every row is checked as it is read; a problem names the file,
the line and the field (MultiRC and ReCoRD fields by their nested path).
"""
import json
import os
from typing import NamedTuple

from glam.eval.superglue.tasks import Task

SPLITS = ("validation", "test", "train")
SPLIT_FILES = {"train": ("train.jsonl",), "validation": ("val.jsonl", "dev32.jsonl"),
               "test": ("test.jsonl",)}


class Split(NamedTuple):
  task: Task
  name: str            # train / validation / test
  examples: list[dict]
  origin: str          # the file or TFDS name, for messages


class RowError(ValueError):
  """A bad field in one row; the reader adds the file and line."""


def split_path(task: Task, data_dir: str, split: str) -> str:
  """The file holding `split` of `task` under `data_dir` (the diagnostics have one file)."""
  if split not in SPLITS:
    raise ValueError(f"--split={split!r}: expected one of {', '.join(SPLITS)}")
  folder = os.path.join(data_dir, task.directory)
  names = (f"{task.directory}.jsonl",) if task.diagnostic else SPLIT_FILES[split]
  for name in names:
    if os.path.isfile(os.path.join(folder, name)):
      return os.path.join(folder, name)
  what = "no file" if task.diagnostic else f"no {split} split"
  raise FileNotFoundError(f"{task.name}: {what} in {data_dir}: expected "
                          f"{' or '.join(os.path.join(folder, n) for n in names)}")


def read_jsonl_split(task: Task, data_dir: str, split: str) -> Split:
  path = split_path(task, data_dir, split)
  labelled = split != "test" or task.diagnostic  # the diagnostics ship with their labels
  examples = []
  with open(path, encoding="utf-8") as f:
    for line_number, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"{path}:{line_number}"
      try:
        row = json.loads(line)
      except json.JSONDecodeError as error:
        raise ValueError(f"{where}: not valid JSON ({error.msg})") from None
      try:
        if not isinstance(row, dict):
          raise RowError(f"expected a JSON object, got {type(row).__name__}")
        examples.extend(rows_to_examples(task, row, labelled))
      except RowError as error:
        raise ValueError(f"{where}: {error}") from None
  if not examples:
    raise ValueError(f"{path}: the {split} split of {task.name} is empty (no examples)")
  return Split(task, split, examples, path)


def field(row: dict, name: str, kind, where: str = ""):
  """row[name], checked to be of `kind` (str, int, bool, list, dict)."""
  path = f"{where}{name}"
  if name not in row:
    raise RowError(f"missing field '{path}'")
  value = row[name]
  if kind is int and isinstance(value, bool) or not isinstance(value, kind):
    names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
    raise RowError(f"field '{path}': expected {names}, got {value!r:.60}")
  return value


def label_index(task: Task, value, path: str = "label") -> int:
  """A JSONL label (bool, 0/1 or a label name) -> its index in task.labels."""
  if task.name == "copa" or task.labels == ("False", "True"):
    if isinstance(value, bool) or value in (0, 1) and isinstance(value, int):
      return int(value)
    allowed = "0 or 1" if task.name in ("copa", "multirc") else "true or false"
  else:
    if isinstance(value, str) and value in task.labels:
      return task.labels.index(value)
    allowed = " / ".join(task.labels)
  raise RowError(f"field '{path}': {value!r} is not a {task.name} label (expected {allowed})")


def rows_to_examples(task: Task, row: dict, labelled: bool) -> list[dict]:
  if task.name == "multirc":
    return multirc_examples(row, labelled)
  if task.name == "record":
    return record_examples(row)
  if task.name == "wsc":
    row = {**row, **field(row, "target", dict)}  # spans are nested under "target"
  example = {"idx": field(row, "idx", int)}
  for name in task.text_fields:
    example[name] = field(row, name, str)
  for name in task.int_fields:
    example[name] = field(row, name, int)
  example["label"] = label_index(task, field(row, "label", (bool, int, str))) if labelled else None
  return [example]


def multirc_examples(row: dict, labelled: bool) -> list[dict]:
  """One paragraph row -> one example per (question, answer option)."""
  from glam.eval.superglue.tasks import TASKS
  paragraph_id = field(row, "idx", int)
  passage = field(row, "passage", dict)
  text = field(passage, "text", str, "passage.")
  examples = []
  for q, question in enumerate(field(passage, "questions", list, "passage.")):
    where = f"passage.questions[{q}]."
    if not isinstance(question, dict):
      raise RowError(f"field '{where[:-1]}': expected an object")
    question_text = field(question, "question", str, where)
    question_id = field(question, "idx", int, where)
    for a, answer in enumerate(field(question, "answers", list, where)):
      answer_where = f"{where}answers[{a}]."
      if not isinstance(answer, dict):
        raise RowError(f"field '{answer_where[:-1]}': expected an object")
      label = None
      if labelled:
        label = label_index(TASKS["multirc"], field(answer, "label", (bool, int), answer_where),
                            f"{answer_where}label")
      examples.append({"idx": {"paragraph": paragraph_id, "question": question_id,
                               "answer": field(answer, "idx", int, answer_where)},
                       "paragraph": text, "question": question_text,
                       "answer": field(answer, "text", str, answer_where), "label": label})
  return examples


def record_examples(row: dict) -> list[dict]:
  """One passage row -> one example per query. Entity spans are [start, end] with end inclusive
  (as in the release); candidates are the distinct entity strings, sorted as TFDS does."""
  passage_id = field(row, "idx", int)
  passage = field(row, "passage", dict)
  text = field(passage, "text", str, "passage.")
  entities = set()
  for e, span in enumerate(field(passage, "entities", list, "passage.")):
    where = f"passage.entities[{e}]."
    if not isinstance(span, dict):
      raise RowError(f"field '{where[:-1]}': expected an object with start and end")
    start, end = field(span, "start", int, where), field(span, "end", int, where)
    if not 0 <= start <= end < len(text):
      raise RowError(f"field '{where[:-1]}': span [{start}, {end}] is outside the passage "
                     f"({len(text)} characters)")
    entities.add(text[start:end + 1])
  if not entities:
    raise RowError("field 'passage.entities': no candidate entities")
  examples = []
  for q, qa in enumerate(field(row, "qas", list)):
    where = f"qas[{q}]."
    if not isinstance(qa, dict):
      raise RowError(f"field '{where[:-1]}': expected an object")
    query = field(qa, "query", str, where)
    if "@placeholder" not in query:
      raise RowError(f"field '{where}query': has no @placeholder")
    answers = set()
    for a, answer in enumerate(qa.get("answers", [])):
      answers.add(field(answer, "text", str, f"{where}answers[{a}].") if isinstance(answer, dict)
                  else field({"text": answer}, "text", str, f"{where}answers[{a}]"))
    examples.append({"idx": {"passage": passage_id, "query": field(qa, "idx", int, where)},
                     "passage": text, "query": query, "entities": sorted(entities),
                     "answers": sorted(answers), "label": None})
  return examples


def read_tfds_split(task: Task, split: str, data_dir: str | None = None) -> Split:
  """The same examples from TFDS `super_glue/<task>` (its diagnostics have a test split only)."""
  import tensorflow_datasets as tfds
  if split not in SPLITS:
    raise ValueError(f"--split={split!r}: expected one of {', '.join(SPLITS)}")
  split = "test" if task.diagnostic else split
  origin = f"tfds:{task.tfds_name}:{split}"
  rows = tfds.as_numpy(tfds.load(task.tfds_name, split=split, data_dir=data_dir, shuffle_files=False))
  examples = [tfds_example(task, row) for row in rows]
  if not examples:
    raise ValueError(f"{origin}: the {split} split of {task.name} is empty (no examples)")
  return Split(task, split, examples, origin)


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def tfds_example(task: Task, row: dict) -> dict:
  idx = row["idx"]
  example = {"idx": {k: int(v) for k, v in idx.items()} if isinstance(idx, dict) else int(idx)}
  for name in task.text_fields:
    example[name] = _text(row[name])
  for name in task.int_fields:
    example[name] = int(row[name])
  if task.name == "record":
    example["entities"] = sorted({_text(e) for e in row["entities"]})
    example["answers"] = sorted({_text(a) for a in row["answers"]})
    example["label"] = None
  else:
    label = int(row["label"])
    example["label"] = None if label < 0 else label
  return example


def read_split(task: Task, split: str, *, data_dir: str | None = None, use_tfds: bool = False,
               tfds_data_dir: str | None = None) -> Split:
  if use_tfds:
    return read_tfds_split(task, split, tfds_data_dir)
  if not data_dir:
    raise ValueError("give --data_dir=DIR (official or FewGLUE layout) or --tfds")
  return read_jsonl_split(task, data_dir, split)

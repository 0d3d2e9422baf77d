"""Turning SuperGLUE examples into text: rank-classification prompts and the T5 text-to-text cast.

Rank classification (GLaM / GPT-3 style evaluation of a decoder LM): each example becomes a
context and one continuation ("option") per label (per candidate entity for ReCoRD); the model
picks the option with the highest length-normalised log-likelihood given the context. Few-shot
prompts put k solved training examples (context + gold option) before the query, separated by a
blank line.

Text-to-text (T5, Raffel et al. 2020): `<task> key: value ...` inputs with the keys in sorted
order (MultiRC and ReCoRD in T5's own order), the label name as target; AX-b and AX-g are cast as
RTE; WSC marks the pronoun with asterisks and targets the referent's text (T5's `wsc_simple`).
A decoder-only model reads input, separator and target as one sequence; the separator marks
where the target starts and is the same in fine-tuning (`text_to_text_training_pairs`) and in
evaluation (`to_text_to_text`).
"""
import re
import string
from typing import NamedTuple

import gin

from glam.eval.superglue.tasks import Task, get_task

UNLABELLED_TARGET = "<unk>"  # T5's target for a test row without a label
DEMO_SEPARATOR = "\n\n"


class RankPrompt(NamedTuple):
  context: str
  options: list[str]  # option i scores label i (ReCoRD: entity i)


def record_passage(passage: str, highlight: str) -> str:
  """ReCoRD passages end with `@highlight` lines (the article's bullet points)."""
  return passage.replace("\n@highlight\n", highlight)


def lower_first(text: str) -> str:
  return text[:1].lower() + text[1:]


def rank_prompt(task: Task, example: dict) -> RankPrompt:
  name = task.name
  yes_no = [" no", " yes"]  # False, True
  if name == "boolq":
    return RankPrompt(f"{example['passage']}\nquestion: {example['question']}?\nanswer:", yes_no)
  if name == "cb":
    return RankPrompt(f"{example['premise']}\nquestion: {example['hypothesis']} true, false, or neither?"
                      "\nanswer:", [" true", " false", " neither"])
  if name == "copa":
    connector = {"cause": "because", "effect": "so"}.get(example["question"], example["question"])
    premise = example["premise"].rstrip().rstrip(".")
    return RankPrompt(f"{premise} {connector}",
                      [" " + lower_first(example["choice1"]), " " + lower_first(example["choice2"])])
  if name == "multirc":
    paragraph = strip_html(example["paragraph"])
    return RankPrompt(f"{paragraph}\nquestion: {example['question']}\nanswer: {example['answer']}\n"
                      "is the answer correct?", yes_no)
  if name == "record":
    # Everything up to the placeholder is shared by all candidates: it belongs to the context.
    before, _, after = example["query"].partition("@placeholder")
    context = f"{record_passage(example['passage'], chr(10) + '- ')}\n{before}".rstrip(" ")
    space = " " if before.endswith(" ") else ""  # the space before the entity goes with it
    return RankPrompt(context, [f"{space}{entity}{after}" for entity in example["entities"]])
  if name in ("rte", "axb", "axg"):
    premise, hypothesis = nli_pair(task, example)
    return RankPrompt(f"{premise}\nquestion: {hypothesis} true or false?\nanswer:", [" true", " false"])
  if name == "wic":
    return RankPrompt(f"sentence 1: {example['sentence1']}\nsentence 2: {example['sentence2']}\n"
                      f"question: is the word '{example['word']}' used in the same sense in the two "
                      "sentences above?\nanswer:", yes_no)
  if name == "wsc":
    return RankPrompt(f"{example['text']}\nquestion: in the passage above, does the pronoun "
                      f"'{example['span2_text']}' refer to '{example['span1_text']}'?\nanswer:", yes_no)
  raise ValueError(f"no rank-classification prompt for task {name!r}")


def nli_pair(task: Task, example: dict) -> tuple[str, str]:
  if task.name == "axb":
    return example["sentence1"], example["sentence2"]
  return example["premise"], example["hypothesis"]


def gold_option(task: Task, example: dict) -> int | None:
  """Index of the correct option, or None when the example has no label."""
  if task.name == "record":
    answers = set(example["answers"])
    hits = [i for i, entity in enumerate(example["entities"]) if entity in answers]
    return hits[0] if hits else None
  return example["label"]


def demonstration(task: Task, example: dict) -> str:
  prompt = rank_prompt(task, example)
  gold = gold_option(task, example)
  if gold is None:
    raise ValueError(f"{task.name} example {example['idx']}: a demonstration needs a label")
  return prompt.context + prompt.options[gold]


def few_shot_context(context: str, demonstrations: list[str]) -> str:
  return DEMO_SEPARATOR.join(list(demonstrations) + [context])


# --- T5 text-to-text casting -------------------------------------------------------------

def strip_html(text: str) -> str:
  """MultiRC paragraphs carry <br> and <b>...</b> markup; T5 removes it."""
  return re.sub(r"<br>|</?b>", " ", text).replace("  ", " ").strip()


def glue_style(benchmark: str, pairs: list[tuple[str, str]]) -> str:
  return " ".join([benchmark] + [f"{key}: {value}" for key, value in pairs])


def wsc_marked_text(example: dict) -> str:
  """The WSC text with the pronoun (word span2_index) marked as *pronoun*."""
  words = example["text"].split(" ")
  index, pronoun = example["span2_index"], example["span2_text"]
  if 0 <= index < len(words) and words[index].lower().startswith(pronoun.lower()):
    words[index] = f"*{pronoun}*" + words[index][len(pronoun):]
    return " ".join(words)
  return example["text"].replace(pronoun, f"*{pronoun}*", 1)  # index off: mark the first match


def t5_input(task: Task, example: dict) -> str:
  name = task.name
  if name in ("boolq", "cb", "copa", "wic"):
    keys = sorted(task.text_fields)
    return glue_style(name, [(key, example[key]) for key in keys])
  if name in ("rte", "axb", "axg"):
    premise, hypothesis = nli_pair(task, example)
    return glue_style("rte", [("hypothesis", hypothesis), ("premise", premise)])
  if name == "multirc":
    return glue_style("multirc", [("question", example["question"]), ("answer", example["answer"]),
                                  ("paragraph", strip_html(example["paragraph"]))])
  if name == "record":
    passage = re.sub(r"([.?!\"'])\n@highlight\n", r"\1 ", example["passage"])
    passage = record_passage(passage, ". ")
    return glue_style("record", [("query", example["query"]), ("entities", ", ".join(example["entities"])),
                                 ("passage", passage)])
  if name == "wsc":
    return f"wsc: {wsc_marked_text(example)}"
  raise ValueError(f"no text-to-text cast for task {name!r}")


def t5_targets(task: Task, example: dict) -> list[str]:
  """Every target the example teaches: one label name; ReCoRD one per gold answer; WSC the
  referent text."""
  if task.name == "record":
    return list(example["answers"]) or [UNLABELLED_TARGET]
  if task.name == "wsc":
    return [example["span1_text"]]
  if example["label"] is None:
    return [UNLABELLED_TARGET]
  return [task.labels[example["label"]]]


@gin.configurable
def to_text_to_text(task: Task | str, example: dict, separator: str = "\n") -> tuple[str, str]:
  """The (input, target) pair of one example for text-to-text fine-tuning and generation.

  Args:
    task: a Task or task name.
    example: a flat example dict from readers.py.
    separator: appended to the input; a decoder-only model generates the target after it.
  """
  task = get_task(task) if isinstance(task, str) else task
  return t5_input(task, example) + separator, t5_targets(task, example)[0]


def text_to_text_training_pairs(task: Task | str, example: dict) -> list[tuple[str, str]]:
  """The pairs fine-tuning learns from one example, as T5's training mixture does: ReCoRD one per
  gold answer; WSC only the examples whose candidate is the referent (label True)."""
  task = get_task(task) if isinstance(task, str) else task
  if task.name == "wsc" and example["label"] != 1:
    return []
  source, _ = to_text_to_text(task, example)
  return [(source, target) for target in t5_targets(task, example) if target != UNLABELLED_TARGET]


# --- generated text -> prediction ----------------------------------------------------------

DETERMINERS = frozenset("a an few her his each every many much my our some that the their these "
                        "this those which whose your".split())


def wsc_refers(prediction: str, referent: str) -> bool:
  """Does the generated referent name the candidate? Compared as word sets without determiners
  (a possessive on one side only is a mismatch), one contained in the other."""
  def words(text: str) -> set[str]:
    return {w for w in text.strip().lower().split() if w not in DETERMINERS}
  predicted, candidate = words(prediction), words(referent)
  if not predicted or ("'" in prediction) != ("'" in referent):
    return False
  return predicted <= candidate or candidate <= predicted


def postprocess(task: Task, example: dict, text: str):
  """Generated text -> a prediction: a label index (None if it names no label), ReCoRD the text."""
  text = text.strip()
  if task.name == "record":
    return text
  if task.name == "wsc":
    return int(wsc_refers(text, example["span1_text"]))
  folded = {label.lower(): i for i, label in enumerate(task.labels)}
  return folded.get(text.lower().strip(string.whitespace + "."))

"""FLAN-style instruction mixtures: tasks of examples, templates, zero/few-shot, proportional mixing.

Interface (for anyone plugging a dataset in, e.g. SuperGLUE):

  A *task* has `name`, `num_examples` (None = infinite), `templates` (its own tuple of
  templates.Template, or None to take the mixture's templates file entry `template_key`, by
  default its name) and `fields(index) -> dict[str, str]`, the placeholders of example `index`.
  Any (input, target) example iterator becomes a task with

      ExampleTask("boolq", examples)     # examples: (input, target) pairs or dicts of fields,
                                         # an iterable or a zero-argument callable returning one

  Pairs get the fields {"input", "target"} and, with no templates, are used as they are.
  Built-in tasks: `JsonlTask` (JSON-lines files, one object of fields per line), `TfdsTask` (any
  TFDS dataset; `ClassLabelFields` turns a class label into FLAN's `answer` / `options_`) and
  `SyntheticTask` (the built-in corpus as question -> answer, with templates of its own, so a
  mixture works offline).

  `InstructionMixture(tasks, templates_path, cap, num_shots, few_shot_fraction, prefix_lm, seed)`
  is a pipeline source (`yields_examples`): `document(i)` returns an examples.Example whose domain
  is the task name. It is a pure function of (seed, i): the task is drawn with probability
  proportional to min(num_examples, cap) (examples-proportional mixing, T5 / FLAN), then an
  example of it uniformly (with replacement), then one of its templates, and with probability
  `few_shot_fraction` `num_shots` exemplars of the same task and template are put before it. So
  LmPipeline's state()/restore() resume a mixture exactly, and per-host slices come for free.

  As a data spec: `train.data = "mixture"` builds the gin-configured InstructionMixture();
  "mixture:SCOPE" builds it inside the gin scope SCOPE, so one config can hold several (e.g.
  `heldout/InstructionMixture.seed = 1` for `train.eval_data = "mixture:heldout"`).
"""
import json
from typing import Callable, Iterable, Mapping, Sequence

import gin
import numpy as np

from glam.data.examples import Example
from glam.data.sources import expand_patterns
from glam.data.synthetic import DOMAINS, SyntheticCorpus, split_example
from glam.data.templates import IDENTITY, Template, few_shot, load_templates, options_text


def _as_fields(record, where: str) -> dict[str, str]:
  """A pair -> {"input", "target"}; a mapping -> its fields as strings (bytes decoded, a list of
  strings under "options" also gives FLAN's "options_")."""
  if isinstance(record, (tuple, list)) and len(record) == 2 and all(isinstance(v, str) for v in record):
    return {"input": record[0], "target": record[1]}
  if not isinstance(record, Mapping):
    raise ValueError(f"{where}: expected an (input, target) pair of strings or a mapping of fields, "
                     f"got {type(record).__name__}")
  fields = {}
  for key, value in record.items():
    if isinstance(value, bytes):
      value = value.decode("utf-8", errors="replace")
    elif isinstance(value, np.ndarray) and value.ndim == 0:
      value = value.item()
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value) and key == "options":
      fields["options_"] = options_text(value)
    fields[str(key)] = value if isinstance(value, str) else str(value)
  return fields


def as_templates(templates: Sequence | None, task: str) -> tuple[Template, ...] | None:
  """Templates given in code or gin: Template objects or {"input": ..., "target": ...} dicts."""
  if templates is None:
    return None
  out = []
  for t in templates:
    if isinstance(t, Mapping) and set(t) == {"input", "target"}:
      t = Template(t["input"], t["target"])
    if not isinstance(t, Template):
      raise ValueError(f"task {task!r}: template {t!r:.100} is not {{\"input\": str, \"target\": str}}")
    out.append(t)
  return tuple(out)


@gin.configurable
class ExampleTask:
  """A task from any examples, read into memory once.

  Args:
    name: the task's name (its domain in the batches and its key in the templates file).
    examples: (input, target) string pairs or mappings of fields; an iterable, or a callable with
      no arguments returning one (so gin can name a reader without running it at parse time).
    templates: its own templates (Template or {"input", "target"} dicts); None = the mixture's
      templates file entry `template_key`, or the pair as is.
    template_key: the templates file entry to use (default: name).
    max_examples: read at most this many (default None: all).
  """

  def __init__(self, name: str, examples, templates: Sequence | None = None,
               template_key: str | None = None, max_examples: int | None = None):
    if callable(examples):
      examples = examples()
    self.name, self.template_key = name, template_key or name
    self.templates = as_templates(templates, name)
    self._fields = []
    for i, record in enumerate(examples):
      if max_examples is not None and i >= max_examples:
        break
      self._fields.append(_as_fields(record, f"task {name!r} example {i}"))
    if not self._fields:
      raise ValueError(f"task {name!r}: no examples")
    self.num_examples = len(self._fields)

  def fields(self, index: int) -> dict[str, str]:
    return self._fields[index]

  def __repr__(self) -> str:
    return f"{type(self).__name__}({self.name!r}, {self.num_examples} examples)"


@gin.configurable
class JsonlTask(ExampleTask):
  """Examples from JSON-lines files: each non-blank line one object whose keys are the fields
  (`patterns`: a glob or a list of them, as for TextFiles). Other args as ExampleTask."""

  def __init__(self, name: str, patterns: str | Sequence[str], templates: Sequence | None = None,
               template_key: str | None = None, max_examples: int | None = None):
    super().__init__(name, lambda: self._read(expand_patterns(patterns)), templates, template_key, max_examples)

  @staticmethod
  def _read(files: list[str]) -> Iterable[dict]:
    for path in files:
      with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
          if not line.strip():
            continue
          try:
            record = json.loads(line)
          except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: malformed JSON ({error.msg})") from None
          if not isinstance(record, dict):
            raise ValueError(f"{path}:{number}: expected a JSON object of fields, got {type(record).__name__}")
          yield record


@gin.configurable
class ClassLabelFields:
  """A TfdsTask `preprocess`: adds FLAN's `answer` (the name of the integer label) and `options_`
  (all names). names: the label names in label order; label_field: the feature holding it."""

  def __init__(self, names: Sequence[str], label_field: str = "label"):
    self.names, self.label_field = tuple(names), label_field

  def __call__(self, fields: dict[str, str]) -> dict[str, str]:
    label = int(fields[self.label_field])
    if not 0 <= label < len(self.names):
      raise ValueError(f"ClassLabelFields: label {label} is outside the {len(self.names)} names {self.names}")
    return {**fields, "answer": self.names[label], "options_": options_text(self.names)}


@gin.configurable
class TfdsTask(ExampleTask):
  """Examples from a TFDS dataset (downloaded and prepared into `data_dir` if missing, as
  tfds.load does); every feature becomes a field (text decoded, numbers as strings).

  Args:
    name: the task name; dataset: TFDS name ("super_glue/rte"); split: default "train".
    max_examples: read at most this many (default None: all; examples are held in memory).
    preprocess: fields -> fields, e.g. @ClassLabelFields() (default None: none).
    data_dir: TFDS's data folder (default: its own). Other args as ExampleTask.
  """

  def __init__(self, name: str, dataset: str, split: str = "train", max_examples: int | None = None,
               preprocess: Callable | None = None, data_dir: str | None = None,
               templates: Sequence | None = None, template_key: str | None = None):
    def read():
      import tensorflow_datasets as tfds  # here: importing TFDS takes a while
      loaded = tfds.load(dataset, split=split, data_dir=data_dir, shuffle_files=False)
      for example in tfds.as_numpy(loaded.take(max_examples) if max_examples else loaded):
        fields = _as_fields(example, f"tfds:{dataset}:{split}")
        yield preprocess(fields) if preprocess else fields

    super().__init__(name, read, templates, template_key, max_examples)


# Several phrasings per synthetic task, so template sampling shows up offline too.
SYNTHETIC_TEMPLATES = {
    "arithmetic": (Template("{question}", "{answer}"), Template("Compute: {question}", "{answer}"),
                   Template("Q: what comes after {question}\nA:", "{answer}")),
    "copy": (Template("{question}", "{answer}"), Template("Repeat the letters. {question}", "{answer}")),
    "reverse": (Template("{question}", "{answer}"), Template("Write it backwards. {question}", "{answer}")),
    "sentences": (Template("{question}", "{answer}"), Template("Finish the sentence: {question}", "{answer}")),
    "kv_recall": (Template("{question}", "{answer}"), Template("Look the key up. {question}", "{answer}")),
}


@gin.configurable
class SyntheticTask:
  """A domain of the built-in corpus as question -> answer (synthetic.split_example): infinite,
  offline, with the templates above. seed: which documents (default 0; another for held-out)."""
  num_examples = None

  def __init__(self, domain: str, seed: int = 0, templates: Sequence | None = None):
    self.corpus = SyntheticCorpus(seed=seed, domains=(domain,))
    self.name = self.template_key = domain
    self.templates = as_templates(templates, domain) or SYNTHETIC_TEMPLATES[domain]

  def fields(self, index: int) -> dict[str, str]:
    document = self.corpus.document(index)
    question, answer = split_example(document.text, document.domain)
    return {"question": question, "answer": answer}

  def __repr__(self) -> str:
    return f"SyntheticTask({self.name!r}, seed={self.corpus.seed})"


@gin.configurable
def synthetic_tasks(domains: Sequence[str] = DOMAINS, seed: int = 0) -> list[SyntheticTask]:
  """One SyntheticTask per domain (default: all five), for `InstructionMixture.tasks = @synthetic_tasks()`."""
  return [SyntheticTask(domain, seed=seed) for domain in domains]


def mixing_rates(sizes: Sequence[int | None], cap: int | None, names: Sequence[str]) -> np.ndarray:
  """Examples-proportional mixing: rate_i = min(size_i, cap) / sum; an infinite task needs a cap."""
  weights = []
  for name, size in zip(names, sizes):
    if size is None and cap is None:
      raise ValueError(f"InstructionMixture.cap=None: task {name!r} is infinite, so examples-proportional "
                       "mixing needs a cap (the number of examples an infinite task counts as)")
    weights.append(cap if size is None else size if cap is None else min(size, cap))
  weights = np.asarray(weights, np.float64)
  return weights / weights.sum()


@gin.configurable
class InstructionMixture:
  """A source of templated input/target examples mixed over tasks (see the module docstring).

  Args:
    tasks: the tasks (ExampleTask, JsonlTask, TfdsTask, SyntheticTask, or anything with their
      interface); names must differ.
    templates_path: a FLAN-layout templates file for tasks without templates of their own
      (default None); a task in neither uses its examples' "input" / "target" fields as they are.
    cap: examples-proportional mixing limit: a task counts as at most this many examples
      (default 3000: FLAN's mixing rate maximum, Wei et al. 2021; None = no cap).
    num_shots: exemplars in a few-shot example (default 0).
    few_shot_fraction: probability that an example is few-shot (default 0.0: all zero-shot).
    exemplar_separator / answer_separator: few-shot layout (default "\\n\\n" / "\\n").
    prefix_lm: batches carry prefix_mask so inputs attend bidirectionally (default False).
    seed: which draws (default 0).
  """
  yields_examples = True
  num_documents = None  # infinite: examples are drawn, index by index

  def __init__(self, tasks: Sequence = (), templates_path: str | None = None, cap: int | None = 3000,
               num_shots: int = 0, few_shot_fraction: float = 0.0, exemplar_separator: str = "\n\n",
               answer_separator: str = "\n", prefix_lm: bool = False, seed: int = 0):
    if not tasks:
      raise ValueError("InstructionMixture.tasks: no tasks given (bind InstructionMixture.tasks in gin)")
    names = [task.name for task in tasks]
    if len(set(names)) != len(names):
      raise ValueError(f"InstructionMixture.tasks: task names {names} repeat a name")
    if cap is not None and cap < 1:
      raise ValueError(f"InstructionMixture.cap={cap}: expected a positive number or None")
    if num_shots < 0 or not 0.0 <= few_shot_fraction <= 1.0:
      raise ValueError(f"InstructionMixture: num_shots={num_shots} must be >= 0 and "
                       f"few_shot_fraction={few_shot_fraction} in [0, 1]")
    if seed < 0:
      raise ValueError(f"InstructionMixture.seed={seed}: expected a non-negative integer")
    file_templates = load_templates(templates_path) if templates_path else {}
    self.tasks, self.templates = tuple(tasks), []
    for task in self.tasks:
      own = getattr(task, "templates", None)
      key = getattr(task, "template_key", task.name)
      if (own is None and key not in file_templates
          and not {"input", "target"} <= set(task.fields(0))):
        raise ValueError(f"task {task.name!r}: no templates of its own, none under {key!r} in "
                         f"InstructionMixture.templates_path={templates_path!r} (it has: "
                         f"{', '.join(sorted(file_templates)) or 'nothing'}), and its examples "
                         f"have no 'input' / 'target' fields to use as they are")
      self.templates.append(tuple(own) if own is not None else file_templates.get(key, IDENTITY))
    self.domain_names = tuple(names)
    self.rates = mixing_rates([task.num_examples for task in tasks], cap, names)
    self.num_shots, self.few_shot_fraction = num_shots, few_shot_fraction
    self.exemplar_separator, self.answer_separator = exemplar_separator, answer_separator
    self.prefix_lm, self.seed = bool(prefix_lm), seed

  def _example_index(self, task, rng: np.random.Generator, avoid: int | None = None) -> int:
    size = task.num_examples if task.num_examples is not None else 2 ** 62
    index = int(rng.integers(size))
    if avoid is not None and size > 1:
      while index == avoid:  # an exemplar is never the query itself
        index = int(rng.integers(size))
    return index

  def document(self, index: int) -> Example:
    if index < 0:
      raise IndexError(f"InstructionMixture.document({index}): index must be >= 0")
    rng = np.random.default_rng([self.seed, int(index)])  # a pure function of (seed, index)
    t = int(rng.choice(len(self.tasks), p=self.rates))
    task, templates = self.tasks[t], self.templates[t]
    number = int(rng.integers(len(templates)))
    where = f"task {task.name!r} template {number}"
    query = self._example_index(task, rng)
    inputs, targets = templates[number].fill(task.fields(query), where)
    if self.num_shots and rng.random() < self.few_shot_fraction:
      shots = [templates[number].fill(task.fields(self._example_index(task, rng, avoid=query)), where)
               for _ in range(self.num_shots)]
      inputs = few_shot(shots, inputs, self.exemplar_separator, self.answer_separator)
    return Example(inputs, targets, task.name)

  def __repr__(self) -> str:
    return f"InstructionMixture({len(self.tasks)} tasks: {', '.join(self.domain_names)}; seed={self.seed})"


def mixture_from_spec(scope: str = "", **kwargs) -> InstructionMixture:
  """The gin-configured InstructionMixture, built inside gin scope `scope` if one is given."""
  if not scope:
    return InstructionMixture(**kwargs)
  with gin.config_scope(scope):
    return InstructionMixture(**kwargs)

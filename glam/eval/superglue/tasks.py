"""The SuperGLUE task registry: names, label sets, where each task's files live, its metrics.

Every reader turns a task's rows into the same flat example dicts, the shape TFDS `super_glue/*`
uses (MultiRC: one example per answer option; ReCoRD: one per query):

  boolq   question, passage                          label False/True
  cb      premise, hypothesis                        label entailment/contradiction/neutral
  copa    premise, choice1, choice2, question        label choice1/choice2
  multirc paragraph, question, answer                label False/True, idx {paragraph, question, answer}
  record  passage, query, entities, answers          no label, idx {passage, query}
  rte     premise, hypothesis                        label entailment/not_entailment
  wic     word, sentence1, sentence2                 label False/True
  wsc     text, span1_index, span2_index, span1_text, span2_text   label False/True
  axb     sentence1, sentence2                       label entailment/not_entailment (diagnostic)
  axg     premise, hypothesis                        label entailment/not_entailment (diagnostic)

`label` is the index into `Task.labels` (None on unlabelled test rows), `idx` the row's id.
"""
from dataclasses import dataclass

BOOL_LABELS = ("False", "True")
NLI2_LABELS = ("entailment", "not_entailment")


@dataclass(frozen=True)
class Task:
  name: str                      # the --tasks name, e.g. "boolq"
  directory: str                 # folder in the official release layout, e.g. "BoolQ"
  tfds_name: str                 # e.g. "super_glue/boolq"
  labels: tuple[str, ...] | None  # label names, in TFDS ClassLabel order; None for ReCoRD
  text_fields: tuple[str, ...]   # string fields every example has
  int_fields: tuple[str, ...] = ()
  metrics: tuple[str, ...] = ("accuracy",)
  diagnostic: bool = False       # AX-b / AX-g: a test split only, outside the SuperGLUE average
  demo_task: str | None = None   # where few-shot demonstrations come from when not the task itself


TASKS: dict[str, Task] = {task.name: task for task in (
    Task("boolq", "BoolQ", "super_glue/boolq", BOOL_LABELS, ("question", "passage")),
    Task("cb", "CB", "super_glue/cb", ("entailment", "contradiction", "neutral"),
         ("premise", "hypothesis"), metrics=("accuracy", "f1_macro")),
    Task("copa", "COPA", "super_glue/copa", ("choice1", "choice2"),
         ("premise", "choice1", "choice2", "question")),
    Task("multirc", "MultiRC", "super_glue/multirc", BOOL_LABELS, ("paragraph", "question", "answer"),
         metrics=("f1a", "exact_match")),
    Task("record", "ReCoRD", "super_glue/record", None, ("passage", "query"),
         metrics=("f1", "exact_match")),
    Task("rte", "RTE", "super_glue/rte", NLI2_LABELS, ("premise", "hypothesis")),
    Task("wic", "WiC", "super_glue/wic", BOOL_LABELS, ("word", "sentence1", "sentence2")),
    Task("wsc", "WSC", "super_glue/wsc.fixed", BOOL_LABELS, ("text", "span1_text", "span2_text"),
         int_fields=("span1_index", "span2_index")),
    Task("axb", "AX-b", "super_glue/axb", NLI2_LABELS, ("sentence1", "sentence2"),
         metrics=("mcc",), diagnostic=True, demo_task="rte"),
    Task("axg", "AX-g", "super_glue/axg", NLI2_LABELS, ("premise", "hypothesis"),
         metrics=("gender_parity", "accuracy"), diagnostic=True, demo_task="rte"),
)}

MAIN_TASKS = tuple(name for name, task in TASKS.items() if not task.diagnostic)
DIAGNOSTICS = tuple(name for name, task in TASKS.items() if task.diagnostic)
# Group names accepted by --tasks besides single task names.
TASK_GROUPS = {"all": MAIN_TASKS + DIAGNOSTICS, "superglue": MAIN_TASKS, "diagnostics": DIAGNOSTICS}


def get_task(name: str) -> Task:
  key = name.strip().lower().replace("-", "")
  by_directory = {task.directory.lower().replace("-", ""): task for task in TASKS.values()}
  task = TASKS.get(key) or by_directory.get(key)
  if task is None:
    raise ValueError(f"unknown SuperGLUE task {name!r}; valid tasks: {', '.join(TASKS)} "
                     f"(or a group: {', '.join(TASK_GROUPS)})")
  return task


def parse_tasks(spec: str) -> list[Task]:
  """`--tasks` value -> tasks: a comma-separated list of task names (BoolQ or boolq; AX-b or axb)
  and groups (all = the eight tasks and both diagnostics, superglue = the eight, diagnostics)."""
  names: list[str] = []
  for part in (p.strip() for p in spec.split(",")):
    if not part:
      continue
    names.extend(TASK_GROUPS.get(part.lower(), (part,)))
  if not names:
    raise ValueError(f"--tasks={spec!r}: no task named; valid tasks: {', '.join(TASKS)}")
  tasks: list[Task] = []
  for name in names:
    task = get_task(name)
    if task not in tasks:
      tasks.append(task)
  return tasks


def label_name(task: Task, label: int | None) -> str | None:
  return None if label is None or task.labels is None else task.labels[label]

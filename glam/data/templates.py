"""Instruction templates in the FLAN layout, and zero- / few-shot formatting.

A templates file is JSON: {task name: [{"input": "...", "target": "..."}, ...]}, each string with
Python-format placeholders naming the fields of the task's examples, e.g. (FLAN v1, RTE)

  {"input": "{premise}\\n\\nCan we draw the following conclusion?\\n{hypothesis}\\n\\n{options_}",
   "target": "{answer}"}

FLAN's `options_` field is the answer choices as "OPTIONS:\\n- yes\\n- no" (`options_text`).
"""
import json
import string
from typing import Mapping, NamedTuple, Sequence


class Template(NamedTuple):
  input: str
  target: str

  def fill(self, fields: Mapping[str, str], where: str) -> tuple[str, str]:
    """(input, target) with the placeholders replaced by `fields`; a placeholder with no field is
    an error naming `where` (task and template), the placeholder and the fields there are."""
    try:
      return self.input.format_map(fields), self.target.format_map(fields)
    except KeyError as error:
      raise ValueError(f"{where}: placeholder {{{error.args[0]}}} has no field in the example "
                       f"(fields: {', '.join(sorted(fields)) or 'none'})") from None
    except (IndexError, ValueError) as error:
      raise ValueError(f"{where}: bad template {self.input!r} -> {self.target!r}: {error}") from None


# An (input, target) pair used as is: the template of tasks that bring no templates of their own.
IDENTITY = (Template("{input}", "{target}"),)


def placeholders(text: str) -> set[str]:
  return {name for _, name, _, _ in string.Formatter().parse(text) if name is not None}


def load_templates(path: str) -> dict[str, tuple[Template, ...]]:
  """Reads a templates file (see the module docstring); errors name the file and the entry."""
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except FileNotFoundError:
    raise FileNotFoundError(f"templates file {path!r} does not exist") from None
  except json.JSONDecodeError as error:
    raise ValueError(f"{path}:{error.lineno}: malformed JSON ({error.msg})") from None
  if not isinstance(data, dict):
    raise ValueError(f"{path}: expected a JSON object {{task: [{{\"input\": ..., \"target\": ...}}]}}, "
                     f"got {type(data).__name__}")
  templates = {}
  for task, entries in data.items():
    if not isinstance(entries, list) or not entries:
      raise ValueError(f"{path}: task {task!r}: expected a non-empty list of templates")
    parsed = []
    for i, entry in enumerate(entries):
      if (not isinstance(entry, dict) or set(entry) != {"input", "target"}
          or not all(isinstance(v, str) for v in entry.values())):
        raise ValueError(f"{path}: task {task!r} template {i}: expected {{\"input\": str, \"target\": str}}, "
                         f"got {entry!r:.200}")
      parsed.append(Template(entry["input"], entry["target"]))
    templates[task] = tuple(parsed)
  return templates


def options_text(options: Sequence[str]) -> str:
  """FLAN's `options_` field: the answer choices, one per line."""
  return "OPTIONS:\n- " + "\n- ".join(options)


def few_shot(exemplars: Sequence[tuple[str, str]], query: str, exemplar_separator: str = "\n\n",
             answer_separator: str = "\n") -> str:
  """The input of a few-shot example: each exemplar's input, `answer_separator` and its target,
  the exemplars joined by `exemplar_separator`, then the query's input. No exemplars: the query."""
  shots = [f"{inputs}{answer_separator}{target}" for inputs, target in exemplars]
  return exemplar_separator.join(shots + [query])

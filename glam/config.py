"""Gin configuration, T5X style: --gin_file (repeatable), --gin.NAME=VALUE, --gin_search_path.

Every configurable lives in a glam module; `register_configurables` imports them so a gin file
can bind any of them without `import` lines. The operative config (what a run really used) is
saved beside the run and inside every checkpoint.
"""
import importlib
import os
import pathlib
import re
import tokenize
from typing import Iterable, Sequence

import gin

# Modules whose @gin.configurable objects gin files may bind.
CONFIGURABLE_MODULES = (
    "glam.layers.attention",
    "glam.layers.feedforward",
    "glam.models.lm",
    "glam.models.blocks",
    "glam.models.mode",
    "glam.moe.layer",
    "glam.moe.expert_parallel",
    "glam.data.vocab",
    "glam.data.synthetic",
    "glam.data.sources",
    "glam.data.pipeline",
    "glam.data.instructions",
    "glam.train.schedules",
    "glam.train.optimizers",
    "glam.train.checkpoint",
    "glam.train.trainer",
    "glam.train.freezing",
    "glam.train.distill",
    "glam.eval.superglue.prompts",
    "glam.eval.superglue.runner",
    "glam.eval.superglue.finetune_data",
    "glam.surgery.router_bias",
    "glam.parallel.mesh",
    "glam.parallel.axis_rules",
    "glam.parallel.distributed",
    "glam.parallel.plan",
)

REPO_CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
  """A configuration problem; the message names the file, line or binding."""


def register_configurables(modules: Iterable[str] = CONFIGURABLE_MODULES) -> None:
  for module in modules:
    importlib.import_module(module)


def default_search_paths() -> list[str]:
  """The working directory first, then glam's own configs/ folder (and its parent, so that
  `configs/models/x.gin` resolves from anywhere)."""
  paths = [os.getcwd()]
  if REPO_CONFIGS.is_dir():
    paths += [str(REPO_CONFIGS.parent), str(REPO_CONFIGS)]
  return paths


def resolve_gin_file(name: str, search_paths: Sequence[str]) -> str:
  if os.path.isabs(name):
    if os.path.isfile(name):
      return name
    raise ConfigError(f"--gin_file={name}: file not found")
  for folder in search_paths:
    candidate = os.path.join(folder, name)
    if os.path.isfile(candidate):
      return candidate
  raise ConfigError(f"--gin_file={name}: not found in the search path {list(search_paths)} "
                    "(add a folder with --gin_search_path)")


def parse(gin_files: Sequence[str] = (), bindings: Sequence[str] = (),
          search_paths: Sequence[str] = ()) -> None:
  """Clears gin and parses files then bindings (later ones win). Errors name file and line."""
  register_configurables()
  gin.clear_config()
  paths = list(search_paths) + default_search_paths()
  for path in paths:
    gin.add_config_file_search_path(path)
  files = [resolve_gin_file(name, paths) for name in gin_files]
  for path in files:
    parse_one(lambda: gin.parse_config_file(path), f'"{path}"')
  for binding in bindings:
    parse_one(lambda: gin.parse_config(quote_bare_path(binding)), f"binding {binding!r}")


# A value made only of path characters with at least one "/" (runs/a, /tmp/x, gs://b/c) is never
# valid gin, so `--gin.train.init_checkpoint=/tmp/run` means the string, as a T5X user would hope.
BARE_PATH = re.compile(r"[\w.~:-]*/[\w./~:-]*")


def quote_bare_path(binding: str) -> str:
  name, sep, value = binding.partition("=")
  if sep and BARE_PATH.fullmatch(value.strip()):
    return f"{name.strip()} = {value.strip()!r}"
  return binding


def parse_one(action, where: str) -> None:
  try:
    action()
  except tokenize.TokenError as error:
    # An unclosed bracket: the tokenizer reports (line, column) where the file ended.
    message, (line, _) = error.args
    raise ConfigError(f"gin syntax error in {where}, line {line}: {message}") from None
  except (ValueError, SyntaxError, ImportError, NameError, TypeError) as error:
    # gin's message already says 'In file "x.gin", line 3'; keep it, make the kind clear.
    raise ConfigError(f"gin configuration error: {error}") from None


def operative_config() -> str:
  return gin.operative_config_str()


def config_str() -> str:
  """Everything that was bound (operative config only covers what was called so far)."""
  return gin.config_str()


def save_text(path: str, text: str) -> None:
  """Writes atomically (temp file + rename) so a crash never leaves half a file."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def check(condition: bool, binding: str, value, rule: str) -> None:
  """Fails with `binding=value: rule` when a configured value breaks a rule."""
  if not condition:
    raise ConfigError(f"{binding}={value!r}: {rule}")

"""Real data: text and JSON-lines files, TensorFlow Datasets, and the spec strings that name them.

A source is anything with `num_documents` (None = infinite), `domain_names` and
`document(index) -> Document`; the pipeline only ever asks for documents by index, which is what
makes shuffling, sharding across hosts and exact resumption simple.
"""
import glob
import json
import os
import re
from typing import Protocol, Sequence

import gin

from glam.data.document import Document
from glam.data.synthetic import SyntheticCorpus

__all__ = ["Document", "Source", "TextFiles", "TfdsSource", "source_from_spec"]

TXT_MODES = ("line", "paragraph", "file")


class Source(Protocol):
  num_documents: int | None           # None = infinite (random access by any index >= 0)
  domain_names: tuple[str, ...]

  def document(self, index: int) -> Document: ...  # finite sources: 0 <= index < num_documents


def _check_index(name: str, index: int, count: int) -> None:
  if not 0 <= index < count:
    raise IndexError(f"{name}.document({index}): index outside range({count})")


def expand_patterns(patterns: str | Sequence[str]) -> list[str]:
  """Files matching the glob patterns (`~` expanded, `**` recursive), in pattern order, each
  sorted and listed once; a pattern that matches no file is an error naming it."""
  if isinstance(patterns, str):
    patterns = [patterns]
  files: dict[str, None] = {}  # an ordered set
  for pattern in patterns:
    matches = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True)
                     if os.path.isfile(p))
    if not matches:
      raise FileNotFoundError(f"no files match {pattern!r}")
    files.update(dict.fromkeys(matches))
  if not files:
    raise ValueError("TextFiles: no patterns given")
  return list(files)


def _read_text(path: str) -> str:
  with open(path, "rb") as f:
    data = f.read()
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as error:
    line = data.count(b"\n", 0, error.start) + 1
    raise ValueError(f"{path}:{line}: not valid UTF-8 ({error.reason} at byte {error.start})") from None


def read_jsonl(path: str, text_field: str) -> list[str]:
  """The `text_field` string of every non-blank line; an empty text gives no document."""
  texts = []
  for number, line in enumerate(_read_text(path).splitlines(), start=1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as error:
      raise ValueError(f"{path}:{number}: malformed JSON ({error})") from None
    if not isinstance(record, dict):
      raise ValueError(f"{path}:{number}: expected a JSON object with field {text_field!r}, "
                       f"got {type(record).__name__}")
    if text_field not in record:
      raise ValueError(f"{path}:{number}: missing field {text_field!r} "
                       f"(fields: {', '.join(record) or 'none'})")
    text = record[text_field]
    if not isinstance(text, str):
      raise ValueError(f"{path}:{number}: field {text_field!r} is {type(text).__name__}, expected a string")
    if text:
      texts.append(text)
  return texts


def split_text(text: str, txt_mode: str) -> list[str]:
  """"line": each line that is not blank; "paragraph": blocks of lines separated by blank lines
  (their lines joined by "\\n"); "file": the whole text unless blank."""
  if txt_mode == "line":
    return [line for line in text.splitlines() if line.strip()]
  if txt_mode == "paragraph":
    paragraphs, current = [], []
    for line in text.splitlines() + [""]:
      if line.strip():
        current.append(line)
      elif current:
        paragraphs.append("\n".join(current))
        current = []
    return paragraphs
  return [text] if text.strip() else []


@gin.configurable
class TextFiles:
  """Documents from text files, loaded into memory at construction (fine for corpora of up to a
  few GB; larger ones belong in TFDS / ArrayRecord, see `TfdsSource`).

  Args:
    patterns: a glob pattern or a list of them; `~` is expanded, `**` matches folders recursively.
      Every pattern must match at least one file.
    text_field: for `.jsonl` files, the field holding the text (default "text"); each line is one
      JSON object and one document.
    txt_mode: how other files split into documents: "line" (default: each non-blank line),
      "paragraph" (blocks separated by blank lines) or "file" (the whole file).
    domain: the name of the single domain (default "text").
  """

  def __init__(self, patterns: str | Sequence[str], text_field: str = "text", txt_mode: str = "line",
               domain: str | None = None):
    if txt_mode not in TXT_MODES:
      raise ValueError(f"TextFiles: txt_mode={txt_mode!r}, expected one of {', '.join(TXT_MODES)}")
    self.files = expand_patterns(patterns)
    self.texts: list[str] = []
    for path in self.files:
      if path.endswith(".jsonl"):
        self.texts += read_jsonl(path, text_field)
      else:
        self.texts += split_text(_read_text(path), txt_mode)
    if not self.texts:
      raise ValueError(f"corpus is empty: no documents in {', '.join(self.files)} "
                       f"(txt_mode={txt_mode!r}, text_field={text_field!r})")
    self.num_documents = len(self.texts)
    self.domain_names = (domain or "text",)

  def document(self, index: int) -> Document:
    _check_index("TextFiles", index, self.num_documents)
    return Document(self.texts[index], self.domain_names[0])

  def __repr__(self) -> str:
    return f"TextFiles({len(self.files)} files, {self.num_documents} documents)"


def _as_text(value, where: str) -> str:
  if isinstance(value, bytes):
    return value.decode("utf-8", errors="replace")  # one bad byte should not stop a long run
  if isinstance(value, str):
    return value
  raise ValueError(f"{where}: expected text (bytes or str), got {type(value).__name__}")


@gin.configurable
class TfdsSource:
  """Random access over a TensorFlow Datasets split.

  Uses `tfds.data_source` (ArrayRecord files: random access, deterministic, nothing held in
  memory). A dataset already prepared in another file format (TFRecord) has no random access;
  then up to `max_documents` examples (all if None) are read in order with `tfds.load` and kept
  in memory. Like `tfds.load`, it downloads and prepares the dataset if it is not in `data_dir`.

  Args:
    name: dataset name, with config and version if needed ("lm1b", "c4/en:3.0.1").
    split: split, with slicing if wanted ("train" by default, "validation[:1000]").
    text_field: the feature holding the text (default "text"); bytes are decoded as UTF-8, with
      U+FFFD for invalid sequences.
    data_dir: where TFDS keeps datasets (default: TFDS's own, usually ~/tensorflow_datasets).
    domain: the name of the single domain (default: `name`).
    max_documents: use only the first this many examples (default None: all).
  """

  def __init__(self, name: str, split: str = "train", text_field: str = "text",
               data_dir: str | None = None, domain: str | None = None,
               max_documents: int | None = None):
    import tensorflow_datasets as tfds  # here, not at the top: importing TFDS takes a while
    self.name, self.split, self.text_field = name, split, text_field
    self.where = f"tfds:{name}:{split}"
    if max_documents is not None and max_documents < 1:
      raise ValueError(f"{self.where}: max_documents={max_documents}, expected a positive number or None")
    try:
      self._records = tfds.data_source(name, split=split, data_dir=data_dir)
      features = self._records.dataset_info.features
      count = len(self._records)
    except NotImplementedError:  # prepared as TFRecord: no random access
      self._records = None
      features = tfds.builder(name, data_dir=data_dir).info.features
    if text_field not in features:
      raise ValueError(f"{self.where}: no feature {text_field!r} (features: {', '.join(features)}); "
                       "set TfdsSource.text_field")
    if self._records is None:
      dataset = tfds.load(name, split=split, data_dir=data_dir, shuffle_files=False)
      if max_documents is not None:
        dataset = dataset.take(max_documents)
      self._texts = [_as_text(example[text_field], self.where) for example in tfds.as_numpy(dataset)]
      count = len(self._texts)
    self.num_documents = count if max_documents is None else min(count, max_documents)
    if self.num_documents == 0:
      raise ValueError(f"corpus is empty: {self.where} has no examples")
    self.domain_names = (domain or name,)

  def document(self, index: int) -> Document:
    _check_index("TfdsSource", index, self.num_documents)
    if self._records is None:
      text = self._texts[index]
    else:
      text = _as_text(self._records[index][self.text_field], f"{self.where}[{index}]")
    return Document(text, self.domain_names[0])

  def __repr__(self) -> str:
    return f"TfdsSource({self.where}, {self.num_documents} documents)"


# In "tfds:c4/en:3.0.1:validation" the part after the config is a version, not a split.
_VERSION = re.compile(r"^(\d+|\*)(\.(\d+|\*))*$")


def parse_tfds_spec(rest: str) -> tuple[str, str | None]:
  """"NAME[:VERSION][:SPLIT]" -> (name, split or None). The split may contain ":" (slicing)."""
  name, _, split = rest.partition(":")
  version, _, after_version = split.partition(":")
  if _VERSION.match(version):
    name, split = f"{name}:{version}", after_version
  return name, split or None


@gin.configurable
class DomainFiles:
  """Several file globs as named domains, "name=glob,name=glob" (per-domain loss in `glam eval`).

  Documents are the domains' TextFiles documents one after the other (the pipeline shuffles);
  `kwargs` (txt_mode, text_field) go to every TextFiles.
  """

  def __init__(self, spec: str, **kwargs):
    self.parts = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
      name, equals, pattern = item.partition("=")
      if not equals or not name.strip() or not pattern.strip():
        raise ValueError(f"domains:{spec}: entry {item!r} is not NAME=GLOB")
      self.parts.append(TextFiles(pattern.strip(), domain=name.strip(), **kwargs))
    if not self.parts:
      raise ValueError(f"domains:{spec}: expected NAME=GLOB[,NAME=GLOB...]")
    self.domain_names = tuple(part.domain_names[0] for part in self.parts)
    if len(set(self.domain_names)) != len(self.domain_names):
      raise ValueError(f"domains:{spec}: domain names repeat")
    self.num_documents = sum(part.num_documents for part in self.parts)

  def document(self, index: int) -> Document:
    _check_index("DomainFiles", index, self.num_documents)
    for part in self.parts:
      if index < part.num_documents:
        return part.document(index)
      index -= part.num_documents
    raise AssertionError("unreachable")

  def __repr__(self) -> str:
    return f"DomainFiles({', '.join(f'{n}: {p.num_documents}' for n, p in zip(self.domain_names, self.parts))})"


def source_from_spec(spec: str, **kwargs) -> Source:
  """The source a spec string names; `kwargs` go to its constructor.

    "synthetic"                    SyntheticCorpus()
    "synthetic:arithmetic,copy"    SyntheticCorpus(domains=("arithmetic", "copy"))
    "tfds:lm1b", "tfds:c4/en:validation", "tfds:c4/en:3.0.1:train[:1%]"   TfdsSource
    "mixture", "mixture:SCOPE"     the gin-configured InstructionMixture (in gin scope SCOPE)
    "domains:a=GLOB,b=GLOB"        DomainFiles: one TextFiles domain per name (documents concatenated)
    anything else                  TextFiles(spec): a glob of .txt / .jsonl files
  """
  if not spec or not spec.strip():
    raise ValueError("empty data spec; expected 'synthetic', 'tfds:NAME[:SPLIT]' or a file glob")
  kind, colon, rest = spec.partition(":")
  if kind == "synthetic":
    if colon:
      kwargs["domains"] = tuple(d.strip() for d in rest.split(",") if d.strip())
    return SyntheticCorpus(**kwargs)
  if kind == "domains":
    return DomainFiles(rest, **kwargs)
  if kind == "mixture":  # input/target examples: glam/data/instructions.py
    from glam.data.instructions import mixture_from_spec  # pylint: disable=import-outside-toplevel
    return mixture_from_spec(rest.strip(), **kwargs)
  if kind == "tfds":
    name, split = parse_tfds_spec(rest)
    if not name:
      raise ValueError(f"{spec!r}: expected tfds:NAME[:SPLIT], e.g. tfds:lm1b or tfds:c4/en:validation")
    if split:
      kwargs["split"] = split
    return TfdsSource(name, **kwargs)
  return TextFiles(spec, **kwargs)

"""Input/target examples and how they are packed: loss on the targets only, never split across rows.

A source whose `yields_examples` is true returns `Example(inputs, targets, domain)` from
`document(index)` instead of a `Document`; LmPipeline then packs it with `ExamplePacker`:

  * the example's tokens are encode(inputs) + encode(targets) + [eos], one segment of its own, so
    attention never crosses examples (segment ids) and positions restart at 0;
  * loss_weights are 0 on every position whose target is an input token: only the targets (and
    their eos) are learnt;
  * with the source's `prefix_lm` true the batch carries `prefix_mask`, 1 on the input positions
    plus the one that reads the last input token (it predicts the first target token), so the
    inputs attend to each other bidirectionally (prefix-LM); everything after is causal;
  * an example that does not fit in what is left of a row starts the next row (the rest of the
    row is padding: segment 0, weight 0); one longer than a row is truncated (`truncate`).

The slot's cursor keeps LmPipeline's [stream index, offset] form with offset always 0: an example
is consumed whole, so a resumed pipeline repacks exactly the same rows.
"""
from typing import Callable, NamedTuple

import numpy as np

from glam.data.packing import write_segment


class Example(NamedTuple):
  """One input/target example; `domain` (e.g. the task name) is one of the source's domain_names."""
  inputs: str
  targets: str
  domain: str


# fetch(stream_index) -> (input token ids, target token ids ending with eos, domain id)
FetchExample = Callable[[int], tuple[np.ndarray, np.ndarray, int]]


def truncate(inputs: np.ndarray, targets: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
  """Fits an example into seq_len tokens. Targets keep at least half the row when both are long
  (cut at their end, losing eos); inputs keep their *end*, next to the target, which for
  few-shot prompts is the query itself."""
  if len(inputs) + len(targets) <= seq_len:
    return inputs, targets
  targets = targets[:max(seq_len - len(inputs), seq_len // 2, 1)]
  keep = seq_len - len(targets)
  return inputs[len(inputs) - keep:] if keep > 0 else inputs[:0], targets


def fetch_example(pipeline, stream_index: int) -> tuple[np.ndarray, np.ndarray, int]:
  """Tokenizes the example at `stream_index` of an LmPipeline (`pipeline.source` yields examples)."""
  index = pipeline.document_index(stream_index)
  example = pipeline.source.document(index)
  if not isinstance(example, Example):
    raise ValueError(f"{pipeline.source!r}: document {index} is a {type(example).__name__}, "
                     "expected an Example (the source says yields_examples)")
  domain_id = pipeline._domain_ids.get(example.domain)  # pylint: disable=protected-access
  if domain_id is None:
    raise ValueError(f"{pipeline.source!r}: example {index} has domain {example.domain!r}, "
                     f"not one of the source's domain_names {pipeline.domain_names}")
  vocab = pipeline.vocab
  inputs = np.asarray(vocab.encode(example.inputs), np.int32)
  targets = np.asarray(vocab.encode(example.targets) + [vocab.eos_id], np.int32)
  return inputs, targets, domain_id


class ExamplePacker:
  """The rows of one slot of examples; same interface and cursor as packing.SlotPacker."""

  def __init__(self, index: int, offset: int, stride: int, fetch: FetchExample, prefix_lm: bool = False):
    if offset != 0:
      raise ValueError(f"example cursor [{index}, {offset}]: examples are never split, so the "
                       "offset must be 0 (was the state saved from a document source?)")
    self.index, self.offset, self.stride = index, 0, stride
    self.prefix_lm = prefix_lm
    self._fetch = fetch
    self._example = None  # (stream index, inputs, targets, domain id) once fetched

  def _current(self, seq_len: int):
    if self._example is None or self._example[0] != self.index:
      inputs, targets, domain_id = self._fetch(self.index)
      self._example = (self.index, *truncate(inputs, targets, seq_len), domain_id)
    return self._example[1:]

  def fill_row(self, batch: dict[str, np.ndarray], row: int) -> None:
    """Fills `row` with whole examples while they fit and advances the cursor past them."""
    seq_len = batch["targets"].shape[1]
    if self.prefix_lm and "prefix_mask" not in batch:
      batch["prefix_mask"] = np.zeros_like(batch["segment_ids"])
    column, segment_id = 0, 1
    while column < seq_len:
      inputs, targets, domain_id = self._current(seq_len)
      length = len(inputs) + len(targets)
      if column + length > seq_len:
        break  # the next row starts with it
      write_segment(batch, row, column, segment_id, np.concatenate([inputs, targets]), domain_id)
      batch["loss_weights"][row, column:column + len(inputs)] = 0.0
      if self.prefix_lm:
        # Position len(inputs) reads the last input token and predicts the first target token.
        batch["prefix_mask"][row, column:column + len(inputs) + 1] = 1
      column += length
      segment_id += 1
      self.index += self.stride

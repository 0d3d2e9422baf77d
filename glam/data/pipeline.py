"""The language-model input pipeline: packed, deterministic, resumable, and split across hosts.

The global batch has `batch_size` row slots; slot r reads the document stream indices
r, r + B, r + 2B, ... and packs them into its successive rows (glam/data/packing.py). Process p
of P owns slots [p*B/P, (p+1)*B/P) and reads only their documents, so the rows of all processes
put together are exactly the single-process batch, whatever P is. Stream index i is document i
of an infinite source; a finite source of N documents is read in epochs (epoch i // N), each in
the order of a permutation seeded by (seed, epoch) when shuffling.

Batch fields, each [rows, seq_len]:
  inputs        int32    the targets shifted right by one within each segment, 0 at its start
  targets       int32    token ids
  segment_ids   int32    1, 2, 3, ... per document piece in the row; 0 = padding
  positions     int32    position inside the segment, from 0; 0 on padding
  loss_weights  float32  1 on real tokens, 0 on padding
  domain_ids    int32    index into `domain_names`; -1 on padding
Rows are always full (the stream never ends), so padding appears only if a caller makes it.
A source with `yields_examples` (input/target examples, glam/data/examples.py) is packed whole
example by example instead: rows may end in padding, input tokens weigh 0, and with the source's
`prefix_lm` the batch also has `prefix_mask` [rows, seq_len] int32 (1 on the inputs).
"""
import functools

import gin
import numpy as np

from glam.data.examples import ExamplePacker, fetch_example
from glam.data.packing import SlotPacker, empty_batch
from glam.data.permutation import IndexPermutation

STATE_VERSION = 1
# Fields that must match between the pipeline that saved a state and the one restoring it.
CHECKED_FIELDS = ("batch_size", "seq_len", "seed", "shuffle", "process_index", "process_count",
                  "num_documents", "domain_names", "vocab")


@gin.configurable
class LmPipeline:
  """An endless iterator of packed batches, host-local rows [batch_size // process_count, seq_len].

  Args:
    source: documents by index (SyntheticCorpus, TextFiles, TfdsSource, ...).
    vocab: tokenizer; each document gets `vocab.eos_id` appended.
    batch_size: rows of the *global* batch (all processes together).
    seq_len: tokens per row.
    seed: document order of finite sources (default 0); an infinite source is read in index
      order and its own seed decides its content.
    shuffle: shuffle each epoch of a finite source (default True); False reads 0, 1, 2, ...
    process_index, process_count: this host's part of the batch (default 0 of 1).
  """

  def __init__(self, source, vocab, batch_size: int, seq_len: int, seed: int = 0,
               shuffle: bool = True, process_index: int = 0, process_count: int = 1):
    if batch_size < 1 or seq_len < 1:
      raise ValueError(f"LmPipeline: batch_size={batch_size}, seq_len={seq_len}; both must be positive")
    if process_count < 1 or not 0 <= process_index < process_count:
      raise ValueError(f"LmPipeline: process_index={process_index} is not in range(process_count={process_count})")
    if batch_size % process_count:
      raise ValueError(f"LmPipeline: batch_size={batch_size} is not divisible by "
                       f"process_count={process_count} (each process gets an equal share of rows)")
    if seed < 0:
      raise ValueError(f"LmPipeline: seed={seed}, expected a non-negative integer")
    if source.num_documents is not None and source.num_documents < 1:
      raise ValueError(f"LmPipeline: corpus is empty: {source!r} has no documents")
    self.source, self.vocab = source, vocab
    self.batch_size, self.seq_len, self.seed, self.shuffle = batch_size, seq_len, seed, bool(shuffle)
    self.process_index, self.process_count = process_index, process_count
    self.domain_names = tuple(source.domain_names)
    self._domain_ids = {name: i for i, name in enumerate(self.domain_names)}
    self._permutations: dict[int, IndexPermutation] = {}
    rows = batch_size // process_count
    self.slots = range(process_index * rows, (process_index + 1) * rows)
    self._packers = [self._new_packer(slot, 0) for slot in self.slots]
    self.batches = 0  # produced since the start of the stream (restored with the state)

  def document_index(self, stream_index: int) -> int:
    """The source index of stream position `stream_index` (see the module docstring)."""
    count = self.source.num_documents
    if count is None:
      return stream_index
    epoch, index = divmod(stream_index, count)
    if not self.shuffle:
      return index
    if epoch not in self._permutations:
      if len(self._permutations) > 8:  # slots span at most a few epochs at a time
        self._permutations.clear()
      self._permutations[epoch] = IndexPermutation(count, (self.seed, epoch))
    return self._permutations[epoch](index)

  def _new_packer(self, index: int, offset: int):
    if getattr(self.source, "yields_examples", False):  # input/target examples: glam/data/examples.py
      return ExamplePacker(index, offset, self.batch_size, functools.partial(fetch_example, self),
                           prefix_lm=getattr(self.source, "prefix_lm", False))
    return SlotPacker(index, offset, self.batch_size, self._fetch)

  def _fetch(self, stream_index: int) -> tuple[np.ndarray, int]:
    index = self.document_index(stream_index)
    document = self.source.document(index)
    domain_id = self._domain_ids.get(document.domain)
    if domain_id is None:
      raise ValueError(f"{self.source!r}: document {index} has domain {document.domain!r}, "
                       f"not one of the source's domain_names {self.domain_names}")
    tokens = np.asarray(self.vocab.encode(document.text) + [self.vocab.eos_id], np.int32)
    return tokens, domain_id

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = empty_batch(len(self._packers), self.seq_len)
    for row, packer in enumerate(self._packers):
      packer.fill_row(batch, row)
    self.batches += 1
    return batch

  def _config(self) -> dict:
    return {"batch_size": self.batch_size, "seq_len": self.seq_len, "seed": self.seed,
            "shuffle": self.shuffle, "process_index": self.process_index,
            "process_count": self.process_count, "num_documents": self.source.num_documents,
            "domain_names": list(self.domain_names), "vocab": self.vocab.fingerprint}

  def state(self) -> dict:
    """The position after the last batch: per owned slot [stream index, tokens of that document
    already used], plus the settings `restore` checks. Small and JSON-serialisable."""
    return {"version": STATE_VERSION, **self._config(), "batches": self.batches,
            "cursors": [[p.index, p.offset] for p in self._packers]}

  def restore(self, state: dict) -> None:
    """Continues exactly where `state()` was taken. A state from a pipeline with other settings
    (batch size, sequence length, seed, process slice, corpus size, domains, vocabulary) is
    refused with the field and both values."""
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
      found = state.get("version") if isinstance(state, dict) else type(state).__name__
      raise ValueError(f"LmPipeline.restore: expected a state of version {STATE_VERSION}, got {found!r}")
    config = self._config()
    for field in CHECKED_FIELDS:
      saved = state.get(field)
      if saved != config[field]:
        raise ValueError(f"LmPipeline.restore: the state has {field}={saved!r} but this pipeline "
                         f"has {field}={config[field]!r}")
    cursors = state.get("cursors")
    if not isinstance(cursors, list) or len(cursors) != len(self._packers):
      raise ValueError(f"LmPipeline.restore: expected {len(self._packers)} cursors, got {cursors!r}")
    for slot, cursor in zip(self.slots, cursors):
      if not (isinstance(cursor, (list, tuple)) and len(cursor) == 2
              and all(isinstance(v, int) and v >= 0 for v in cursor)):
        raise ValueError(f"LmPipeline.restore: cursor {cursor!r} of row slot {slot} is not "
                         "[stream index, offset] (two non-negative integers)")
      if cursor[0] % self.batch_size != slot:
        raise ValueError(f"LmPipeline.restore: cursor {cursor} is not valid for row slot {slot} "
                         f"(its stream index must be {slot} + k * batch_size={self.batch_size})")
    self._packers = [self._new_packer(int(index), int(offset)) for index, offset in cursors]
    self.batches = int(state.get("batches", 0))


@gin.configurable
def eval_batches(source, vocab, batch_size: int, seq_len: int, num_batches: int = 4,
                 seed: int = 1234, shuffle: bool = False, process_index: int = 0,
                 process_count: int = 1) -> list[dict]:
  """A fixed list of `num_batches` batches (default 4) for evaluation: the same every call.

  Documents are read from the start of the source in order (shuffle=False, the default); with
  shuffle=True a finite source is read in the order seeded by `seed` (default 1234). A finite
  source smaller than the batches wraps around. process_index / process_count as in LmPipeline.
  """
  pipeline = LmPipeline(source, vocab, batch_size, seq_len, seed=seed, shuffle=shuffle,
                        process_index=process_index, process_count=process_count)
  return [next(pipeline) for _ in range(num_batches)]

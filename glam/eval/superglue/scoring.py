"""Rank classification's model calls: the log-likelihood of each option given its example's context.

The options of an example share its context, so the context is run once with the KV cache and
each option is then scored as a continuation of that cache (RTE: two 5-token options after a
~360-token context cost ~1.05 contexts instead of 2; ReCoRD's dozen candidates ~2 instead of 12).
`use_cache=False` scores every (context, option) as a whole row instead: the reference the cached
path must match. Token rows follow the training layout (glam/data/packing.py): the first input of
a sequence is 0 ("nothing before me"). Batching: glam/eval/superglue/batching.py.
"""
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from glam.data.packing import SEGMENT_START_INPUT
from glam.eval.superglue.batching import bucket_length, padded_rows, plan_calls
from glam.models.decode import init_cache

# Tokens per model call: what XLA:CPU handles best for ~1M-parameter models (see batching.py);
# raise it on accelerators, where larger calls are cheaper per token.
DEFAULT_MAX_BATCH_TOKENS = 1024
# One example's options, with their context.
Group = tuple[list[int], list[list[int]]]


def fit_options(context: list[int], options: list[list[int]], max_length: int) -> Group:
  """Drops context tokens from the left (the query sits at its end) until the longest option fits
  after it, so every option sees the same context; an option longer than the row keeps its first
  tokens."""
  options = [option[:max_length] for option in options]
  keep = max_length - max(len(option) for option in options)
  return (context[len(context) - keep:] if keep > 0 else []), options


@partial(jax.jit, static_argnames=("graphdef",))
def _shared_context_logprobs(graphdef, state, context, valid, positions, prefix, first_targets,
                             option_inputs, option_targets, option_mask):
  """Runs left-padded contexts once into the KV cache, then each option slot after them.

  context, valid, positions: [batch, context_width] (the start input, then the context tokens).
  first_targets: [batch, options] each option's first token, predicted by the context's last position.
  option_inputs, option_targets, option_mask: [options, batch, option_width], the option's other tokens.
  Returns the summed log-probability of each option [batch, options].
  """
  model = nnx.merge(graphdef, state)
  batch, width = context.shape
  option_width = option_inputs.shape[-1]
  out = model(context, segment_ids=valid, positions=positions, prefix_mask=prefix,
              cache=init_cache(model, batch, width + option_width))
  last = jax.nn.log_softmax(out.logits[:, -1], axis=-1)  # [batch, vocab]
  first = jnp.take_along_axis(last, first_targets, axis=-1)  # [batch, options]
  option_positions = positions[:, -1:] + 1 + jnp.arange(option_width)  # [batch, option_width]

  def one_option(_, option):
    inputs, targets, mask = option  # [batch, option_width] each
    # Every option starts from the same context cache; its own writes are dropped afterwards.
    logits = model(inputs, segment_ids=mask.astype(jnp.int32), positions=option_positions, cache=out.cache).logits
    logprobs = jax.nn.log_softmax(logits, axis=-1)  # [batch, option_width, vocab]
    picked = jnp.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0]  # [batch, option_width]
    return None, jnp.sum(jnp.where(mask, picked, 0.0), axis=-1)  # where: padding logits may be anything

  _, rest = jax.lax.scan(one_option, None, (option_inputs, option_targets, option_mask))  # [options, batch]
  return first + rest.T


@partial(jax.jit, static_argnames=("graphdef",))
def _whole_row_logprobs(graphdef, state, inputs, targets, segment_ids, option_mask, prefix_mask):
  """Sum of log p(target) over the option positions of each right-padded row [batch, width]."""
  model = nnx.merge(graphdef, state)
  logits = model(inputs, segment_ids=segment_ids, prefix_mask=prefix_mask).logits
  logprobs = jax.nn.log_softmax(logits, axis=-1)  # [batch, width, vocab]
  picked = jnp.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0]  # [batch, width]
  return jnp.sum(jnp.where(option_mask, picked, 0.0), axis=-1)


def score_options(model, groups: list[Group], *, batch_size: int, max_length: int, prefix_lm: bool = False,
                  max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS, use_cache: bool = True,
                  progress=None) -> list[np.ndarray]:
  """groups: (context ids, [option ids, ...]) per example. Returns each option's summed token
  log-probability per group (its token count is len(option), after cutting to max_length).
  `batch_size` examples (with all their options) at most per model call, and about
  `max_batch_tokens` tokens; `prefix_lm` reads the context as a bidirectional prefix;
  `progress(n)` after every n examples."""
  if any(len(option) == 0 for _, options in groups for option in options):
    raise ValueError("score_options: an option encodes to no tokens")
  graphdef, state = nnx.split(model)
  fitted = [fit_options(context, options, max_length) if options else (context, []) for context, options in groups]
  scored = [i for i, (_, options) in enumerate(fitted) if options]  # ReCoRD rows may have no candidates
  results = [np.zeros(0, np.float64) for _ in groups]
  score_call = _cached_call if use_cache else _whole_row_call
  costs = [row_cost(*fitted[i], use_cache) for i in scored]
  for call in plan_calls(costs, batch_size=batch_size, max_batch_tokens=max_batch_tokens):
    chosen = [scored[j] for j in call]
    batch = [fitted[i] for i in chosen]
    for i, totals in zip(chosen, score_call(graphdef, state, batch, padded_rows(len(batch), batch_size),
                                            max_length, prefix_lm)):
      results[i] = totals
    if progress is not None:
      progress(len(chosen))
  return results


def row_cost(context: list[int], options: list[list[int]], use_cache: bool) -> int:
  """Tokens a group puts through the model."""
  if use_cache:
    return len(context) + 1 + len(options) * max(len(option) for option in options)
  return len(options) * (len(context) + max(len(option) for option in options))


def _cached_call(graphdef, state, batch: list[Group], rows: int, max_length: int, prefix_lm: bool):
  width = bucket_length(max(len(context) + 1 for context, _ in batch), max_length)
  # At least 2 option slots of 8 tokens, so that most tasks share one compiled shape per context
  # width (their short options cost little next to the context).
  slots = bucket_length(max(len(options) for _, options in batch), minimum=2)
  longest = max(len(option) for _, options in batch for option in options)
  option_width = bucket_length(longest - 1, minimum=8)  # the option's tokens after its first
  context, valid, positions = (np.zeros((rows, width), np.int32) for _ in range(3))
  first_targets = np.zeros((rows, slots), np.int32)
  option_inputs, option_targets = (np.zeros((slots, rows, option_width), np.int32) for _ in range(2))
  option_mask = np.zeros((slots, rows, option_width), bool)
  for row, (tokens, options) in enumerate(batch):
    tokens = [SEGMENT_START_INPUT] + tokens
    context[row, width - len(tokens):] = tokens
    valid[row, width - len(tokens):] = 1
    positions[row, width - len(tokens):] = np.arange(len(tokens))
    for slot, option in enumerate(options):
      first_targets[row, slot] = option[0]
      option_inputs[slot, row, :len(option) - 1] = option[:-1]
      option_targets[slot, row, :len(option) - 1] = option[1:]
      option_mask[slot, row, :len(option) - 1] = True
  totals = np.asarray(_shared_context_logprobs(graphdef, state, context, valid, positions,
                                               valid if prefix_lm else None, first_targets,
                                               option_inputs, option_targets, option_mask), np.float64)
  return [totals[row, :len(options)] for row, (_, options) in enumerate(batch)]


def _whole_row_call(graphdef, state, batch: list[Group], rows: int, max_length: int, prefix_lm: bool):
  flat = [(context, option) for context, options in batch for option in options]
  rows = padded_rows(len(flat), rows * max(len(options) for _, options in batch))
  width = bucket_length(max(len(context) + len(option) for context, option in flat), max_length)
  inputs, targets, segments = (np.zeros((rows, width), np.int32) for _ in range(3))
  option_mask, prefix = np.zeros((rows, width), bool), np.zeros((rows, width), np.int32)
  for row, (context, option) in enumerate(flat):
    tokens = context + option
    targets[row, :len(tokens)] = tokens
    inputs[row, 0] = SEGMENT_START_INPUT
    inputs[row, 1:len(tokens)] = tokens[:-1]
    segments[row, :len(tokens)] = 1
    option_mask[row, len(context):len(tokens)] = True
    prefix[row, :len(context) + 1] = 1  # the inputs that read the context (and the start token)
  totals = np.asarray(_whole_row_logprobs(graphdef, state, inputs, targets, segments, option_mask,
                                          prefix if prefix_lm else None), np.float64)
  out, offset = [], 0
  for _, options in batch:
    out.append(totals[offset:offset + len(options)])
    offset += len(options)
  return out

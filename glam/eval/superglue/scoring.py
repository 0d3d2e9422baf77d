"""Batched model calls for SuperGLUE: log-likelihood of continuations and greedy generation.

Rows are grouped by length into power-of-two buckets and every batch is padded to the same row
count, so a whole evaluation compiles a handful of shapes. Token rows follow the training layout
(glam/data/packing.py): the first input of a sequence is 0 ("nothing before me").
"""
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from glam.data.packing import SEGMENT_START_INPUT
from glam.models.decode import init_cache

MIN_BUCKET = 16


def bucket_length(length: int, max_length: int) -> int:
  """The smallest power of two (at least MIN_BUCKET) holding `length`, capped at max_length."""
  return min(max(MIN_BUCKET, 1 << max(length - 1, 0).bit_length()), max_length)


def fit_row(context: list[int], option: list[int], max_length: int) -> tuple[list[int], list[int]]:
  """Drops context tokens from the left (the query sits at its end) until the row fits; an option
  longer than the row keeps its first tokens."""
  option = option[:max_length]
  keep = max_length - len(option)
  return (context[len(context) - keep:] if keep > 0 else []), option


@partial(jax.jit, static_argnames=("graphdef",))
def _option_logprobs(graphdef, state, inputs, targets, segment_ids, option_mask, prefix_mask):
  """Sum of log p(target) over the option positions of each row, and their count."""
  model = nnx.merge(graphdef, state)
  out = model(inputs, segment_ids=segment_ids, prefix_mask=prefix_mask)
  logprobs = jax.nn.log_softmax(out.logits, axis=-1)  # [batch, length, vocab]
  picked = jnp.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0]  # [batch, length]
  # where, not multiply: logits at padding positions may be anything.
  total = jnp.sum(jnp.where(option_mask, picked, 0.0), axis=-1)
  return total, jnp.sum(option_mask, axis=-1)


def score_continuations(model, rows: list[tuple[list[int], list[int]]], *, batch_size: int,
                        max_length: int, prefix_lm: bool = False, progress=None) -> tuple[np.ndarray, np.ndarray]:
  """rows: (context ids, option ids). Returns (sum of the option's token log-probabilities, number
  of option tokens) per row. With `prefix_lm` the context is a bidirectional prefix."""
  if any(len(option) == 0 for _, option in rows):
    raise ValueError("score_continuations: an option encodes to no tokens")
  graphdef, state = nnx.split(model)
  fitted = [fit_row(c, o, max_length) for c, o in rows]
  order = sorted(range(len(rows)), key=lambda i: len(fitted[i][0]) + len(fitted[i][1]))
  totals, counts = np.zeros(len(rows), np.float64), np.zeros(len(rows), np.int64)
  for start in range(0, len(order), batch_size):
    chosen = order[start:start + batch_size]
    width = bucket_length(max(len(fitted[i][0]) + len(fitted[i][1]) for i in chosen), max_length)
    shape = (batch_size, width)
    inputs, targets, segments = (np.zeros(shape, np.int32) for _ in range(3))
    option_mask, prefix = np.zeros(shape, bool), np.zeros(shape, np.int32)
    for row, i in enumerate(chosen):
      context, option = fitted[i]
      tokens = context + option
      targets[row, :len(tokens)] = tokens
      inputs[row, 0] = SEGMENT_START_INPUT
      inputs[row, 1:len(tokens)] = tokens[:-1]
      segments[row, :len(tokens)] = 1
      option_mask[row, len(context):len(tokens)] = True
      prefix[row, :len(context) + 1] = 1  # the inputs that read the context (and the start token)
    total, count = _option_logprobs(graphdef, state, inputs, targets, segments, option_mask,
                                    prefix if prefix_lm else None)
    totals[chosen] = np.asarray(total)[:len(chosen)]
    counts[chosen] = np.asarray(count)[:len(chosen)]
    if progress is not None:
      progress(len(chosen))
  return totals, counts


@partial(jax.jit, static_argnames=("graphdef", "max_new_tokens"))
def _greedy_cached(graphdef, state, tokens, valid, positions, prefix, *, max_new_tokens):
  """Greedy decoding of left-padded prompts with the KV cache; prompts may be a prefix-LM prefix."""
  model = nnx.merge(graphdef, state)
  batch, prompt_len = tokens.shape
  cache = init_cache(model, batch, prompt_len + max_new_tokens)
  out = model(tokens, segment_ids=valid, positions=positions, prefix_mask=prefix, cache=cache)
  first = jnp.argmax(out.logits[:, -1], axis=-1).astype(jnp.int32)

  def step(carry, _):
    token, position, cache = carry
    out = model(token[:, None], segment_ids=jnp.ones_like(token)[:, None], positions=position[:, None],
                cache=cache)
    return (jnp.argmax(out.logits[:, -1], axis=-1).astype(jnp.int32), position + 1, out.cache), token

  (last, _, _), emitted = jax.lax.scan(step, (first, positions[:, -1] + 1, out.cache), None,
                                       length=max_new_tokens - 1)
  return jnp.concatenate([emitted.T, last[:, None]], axis=1)  # [batch, max_new_tokens]


@partial(jax.jit, static_argnames=("graphdef",))
def _next_tokens_without_cache(graphdef, state, tokens, segments, positions, prefix, last):
  """The greedy next token of every row, recomputing the whole (right-padded) sequence."""
  model = nnx.merge(graphdef, state)
  logits = model(tokens, segment_ids=segments, positions=positions, prefix_mask=prefix).logits
  return jnp.argmax(jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0], axis=-1).astype(jnp.int32)


def left_padded(prompts: list[list[int]], width: int, prefix_lm: bool):
  batch = len(prompts)
  tokens, valid, positions = (np.zeros((batch, width), np.int32) for _ in range(3))
  for row, prompt in enumerate(prompts):
    tokens[row, width - len(prompt):] = prompt
    valid[row, width - len(prompt):] = 1
    positions[row, width - len(prompt):] = np.arange(len(prompt))
  return tokens, valid, positions, (valid if prefix_lm else None)


def greedy_generate(model, prompts: list[list[int]], *, max_new_tokens: int, batch_size: int,
                    max_length: int, eos_id: int, prefix_lm: bool = False, use_cache: bool = True,
                    progress=None) -> list[list[int]]:
  """Greedy continuations of token prompts (each starts with the start input 0), cut after eos.
  Prompts keep their last `max_length - max_new_tokens` tokens. `use_cache=False` recomputes the
  whole sequence for every new token (the reference the cached path must match)."""
  if max_new_tokens <= 0 or max_new_tokens >= max_length:
    raise ValueError(f"max_new_tokens={max_new_tokens}: expected 0 < max_new_tokens < max_length={max_length}")
  graphdef, state = nnx.split(model)
  room = max_length - max_new_tokens
  prompts = [p[len(p) - room:] if len(p) > room else p for p in prompts]
  if any(not p for p in prompts):
    raise ValueError("greedy_generate: a prompt is empty")
  order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
  results: list[list[int]] = [[] for _ in prompts]
  for start in range(0, len(order), batch_size):
    chosen = order[start:start + batch_size]
    batch = [prompts[i] for i in chosen] + [prompts[chosen[-1]]] * (batch_size - len(chosen))
    width = bucket_length(max(len(p) for p in batch), room)
    if use_cache:
      new = np.asarray(_greedy_cached(graphdef, state, *left_padded(batch, width, prefix_lm),
                                      max_new_tokens=max_new_tokens))
    else:
      new = _generate_without_cache(graphdef, state, batch, width + max_new_tokens, max_new_tokens, prefix_lm)
    for row, i in enumerate(chosen):
      ids = new[row].tolist()
      results[i] = ids[:ids.index(eos_id) + 1] if eos_id in ids else ids
    if progress is not None:
      progress(len(chosen))
  return results


def _generate_without_cache(graphdef, state, prompts, width, max_new_tokens, prefix_lm) -> np.ndarray:
  batch = len(prompts)
  tokens, segments, prefix = (np.zeros((batch, width), np.int32) for _ in range(3))
  positions = np.broadcast_to(np.arange(width, dtype=np.int32), (batch, width))
  lengths = np.array([len(p) for p in prompts])
  for row, prompt in enumerate(prompts):
    tokens[row, :len(prompt)] = prompt
    prefix[row, :len(prompt)] = 1
  new = np.zeros((batch, max_new_tokens), np.int32)
  for step in range(max_new_tokens):
    segments[:] = np.arange(width)[None, :] < (lengths + step)[:, None]
    token = np.asarray(_next_tokens_without_cache(graphdef, state, tokens, segments, positions,
                                                  prefix if prefix_lm else None, lengths + step - 1))
    new[:, step] = token
    if step + 1 < max_new_tokens:
      tokens[np.arange(batch), lengths + step] = token
  return new

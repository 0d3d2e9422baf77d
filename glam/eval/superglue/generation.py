"""Generation mode's model calls: greedy decoding of T5 targets with the KV cache, batched.

Prompts are sorted by length and cut into calls as in glam/eval/superglue/batching.py; decoding
stops as soon as every row of a call has produced the end-of-sequence token (T5 targets are a few
tokens, max_new_tokens is sized for the longest). `use_cache=False` recomputes the whole sequence
for every new token: the reference the cached path must match.
"""
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from glam.eval.superglue.batching import bucket_length, padded_rows, plan_calls
from glam.eval.superglue.scoring import DEFAULT_MAX_BATCH_TOKENS
from glam.models.decode import init_cache


@partial(jax.jit, static_argnames=("graphdef", "max_new_tokens"))
def _greedy_cached(graphdef, state, tokens, valid, positions, prefix, eos_id, *, max_new_tokens):
  """Greedy decoding of left-padded prompts [batch, width] (optionally a prefix-LM prefix) until
  every row has emitted eos_id or max_new_tokens tokens. Returns [batch, max_new_tokens]; a row's
  tokens after its eos are unspecified."""
  model = nnx.merge(graphdef, state)
  batch, width = tokens.shape
  out = model(tokens, segment_ids=valid, positions=positions, prefix_mask=prefix,
              cache=init_cache(model, batch, width + max_new_tokens))
  first = jnp.argmax(out.logits[:, -1], axis=-1).astype(jnp.int32)  # [batch]
  emitted = jnp.zeros((batch, max_new_tokens), jnp.int32).at[:, 0].set(first)

  def unfinished(carry):
    step, _, _, _, done = carry
    return (step < max_new_tokens) & ~jnp.all(done)

  def next_token(carry):
    step, emitted, position, cache, done = carry
    previous = jax.lax.dynamic_index_in_dim(emitted, step - 1, axis=1)  # [batch, 1]
    out = model(previous, segment_ids=jnp.ones_like(previous), positions=position[:, None], cache=cache)
    token = jnp.argmax(out.logits[:, -1], axis=-1).astype(jnp.int32)
    emitted = jax.lax.dynamic_update_index_in_dim(emitted, token, step, axis=1)
    return step + 1, emitted, position + 1, out.cache, done | (token == eos_id)

  start = (jnp.ones((), jnp.int32), emitted, positions[:, -1] + 1, out.cache, first == eos_id)
  return jax.lax.while_loop(unfinished, next_token, start)[1]


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
                    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS, progress=None) -> list[list[int]]:
  """Greedy continuations of token prompts (each starts with the start input 0), cut after eos.
  Prompts keep their last `max_length - max_new_tokens` tokens. At most `batch_size` prompts and
  about `max_batch_tokens` tokens (prompt + new) per model call; `progress(n)` after n prompts."""
  if max_new_tokens <= 0 or max_new_tokens >= max_length:
    raise ValueError(f"max_new_tokens={max_new_tokens}: expected 0 < max_new_tokens < max_length={max_length}")
  graphdef, state = nnx.split(model)
  room = max_length - max_new_tokens
  prompts = [p[len(p) - room:] if len(p) > room else p for p in prompts]
  if any(not p for p in prompts):
    raise ValueError("greedy_generate: a prompt is empty")
  results: list[list[int]] = [[] for _ in prompts]
  costs = [len(p) + max_new_tokens for p in prompts]
  for chosen in plan_calls(costs, batch_size=batch_size, max_batch_tokens=max_batch_tokens):
    # Padding rows repeat a real prompt: they finish when it does, so they never delay the stop.
    batch = [prompts[i] for i in chosen]
    batch += [batch[-1]] * (padded_rows(len(chosen), batch_size) - len(chosen))
    width = bucket_length(max(len(p) for p in batch), room)
    if use_cache:
      new = np.asarray(_greedy_cached(graphdef, state, *left_padded(batch, width, prefix_lm),
                                      jnp.int32(eos_id), max_new_tokens=max_new_tokens))
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

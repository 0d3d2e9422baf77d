"""A whole expert FFN over rows sorted by expert, chunk by chunk, with only d_model-wide buffers.

    y[rows of expert e] = act(x W_gate[e]) * (x W_in[e]) W_out[e]     (or act(x W_in[e]) W_out[e])

For the few rows that overflow the padded layout (Dropless and CapacityEinsum on CPU). The grouped
matmul (grouped_matmul.py) runs the three matmuls one after the other, so autodiff keeps [rows,
d_ff] hidden buffers and the activation runs over all of them: with a worst-case-sized overflow
buffer that mostly holds no rows, that elementwise work and those buffers cost more than the
rows themselves. Here each chunk of `chunk` rows goes through the whole FFN at once inside a
loop whose trip count is the number of chunks that hold rows, and the backward recomputes the
chunk's hidden activations (cheap: few rows) instead of storing them. So the cost follows the
rows that are there, plus the [experts, ...] weight-gradient accumulators.

Rows after sum(group_sizes) belong to no expert: their output and gradient are zero.
"""
import functools

import jax
import jax.numpy as jnp

from glam.kernels.matmul import gemm, resolve_backend


def chunked_ffn(x: jax.Array, w_in: jax.Array, w_gate: jax.Array | None, w_out: jax.Array,
                group_sizes: jax.Array, activation, *, chunk: int = 32) -> jax.Array:
  """x [N, d_model] sorted by expert, w_in / w_gate [E, d_model, d_ff], w_out [E, d_ff, d_model],
  group_sizes [E] int (sum <= N), activation(hidden, gate) -> [N, d_model].

  `activation` is applied elementwise as activation(x W_in, x W_gate) (gate None when w_gate is).
  """
  if x.ndim != 2 or w_in.ndim != 3 or x.shape[1] != w_in.shape[1]:
    raise ValueError(f"chunked_ffn: expected x [N, d_model] and w_in [E, d_model, d_ff], got {x.shape}, {w_in.shape}")
  if chunk < 1:
    raise ValueError(f"chunked_ffn: chunk={chunk}: must be >= 1")
  if x.shape[0] == 0:
    return jnp.zeros((0, w_out.shape[2]), x.dtype)
  gated = w_gate is not None
  weights = (w_in, w_gate if gated else jnp.zeros((w_in.shape[0], 0, 0), w_in.dtype), w_out)
  return _chunked(x, weights, group_sizes.astype(jnp.int32), activation, gated, min(chunk, x.shape[0]))


def _chunk_ffn(x_c, w_in, w_gate, w_out, activation, gated):
  """[chunk, d_model] -> [chunk, d_model] through one expert."""
  hidden = x_c @ w_in  # [chunk, d_ff]
  gate = x_c @ w_gate if gated else None  # [chunk, d_ff]
  return activation(hidden, gate) @ w_out  # [chunk, d_model]


def _loop_chunks(group_sizes, num_rows: int, chunk: int, carry, begin, body, end=lambda e, local, carry: carry):
  """For every expert with rows: local = begin(e); then for each chunk of its rows
  (carry, local) = body(start, valid [chunk], carry, local); then carry = end(e, local, carry).

  Only experts with rows are visited (their weights are copied out of the stack once each).
  A chunk that would run past the last row is shifted back; `valid` marks the rows of the chunk
  that belong to the expert and to no earlier chunk.
  """
  ends = jnp.cumsum(group_sizes)
  starts = ends - group_sizes
  with_rows = jnp.argsort(group_sizes == 0, stable=True).astype(jnp.int32)  # experts with rows first

  def expert(i, carry):
    e = with_rows[i]
    first, end_row = starts[e], ends[e]

    def one(j, state):
      wanted = first + j * chunk
      start = jnp.minimum(wanted, num_rows - chunk)
      rows = start + jnp.arange(chunk)
      return body(start, (rows >= wanted) & (rows < end_row), *state)

    carry, local = jax.lax.fori_loop(0, (group_sizes[e] + chunk - 1) // chunk, one, (carry, begin(e, carry)))
    return end(e, local, carry)

  return jax.lax.fori_loop(0, jnp.sum(group_sizes > 0), expert, carry)


def _forward(x, weights, group_sizes, activation, gated, chunk):
  w_in, w_gate, w_out = weights
  dtype = jnp.result_type(x.dtype, w_in.dtype)

  def body(start, valid, y, w_e):
    x_c = jax.lax.dynamic_slice_in_dim(x, start, chunk)  # [chunk, d_model]
    y_c = _chunk_ffn(x_c, *w_e, activation, gated).astype(dtype)
    old = jax.lax.dynamic_slice_in_dim(y, start, chunk)
    return jax.lax.dynamic_update_slice_in_dim(y, jnp.where(valid[:, None], y_c, old), start, 0), w_e

  return _loop_chunks(group_sizes, x.shape[0], chunk, jnp.zeros((x.shape[0], w_out.shape[2]), dtype),
                      lambda e, _: _expert_weights(weights, e), body)


def _expert_weights(weights, e):
  return tuple(jax.lax.dynamic_index_in_dim(w, e, keepdims=False) for w in weights)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _chunked(x, weights, group_sizes, activation, gated, chunk):
  return _forward(x, weights, group_sizes, activation, gated, chunk)


def _chunked_fwd(x, weights, group_sizes, activation, gated, chunk):
  return _forward(x, weights, group_sizes, activation, gated, chunk), (x, weights, group_sizes)


def _chunked_bwd(activation, gated, chunk, residuals, dy):
  x, weights, group_sizes = residuals
  acc = jnp.promote_types(jnp.result_type(x.dtype, weights[0].dtype), jnp.float32)  # weight gradients in >= f32
  zeros = tuple(jnp.zeros(w.shape, acc) for w in weights)
  dx, *dweights = _overflow_backward(x, weights, group_sizes, dy, (jnp.zeros_like(x),) + zeros,
                                     activation, gated, chunk)
  return dx, tuple(dw.astype(w.dtype) for dw, w in zip(dweights, weights)), None


def _overflow_backward(x, weights, group_sizes, dy, carry, activation, gated, chunk):
  """Adds each chunk's gradients into carry = (dx, dw_in, dw_gate, dw_out), in place."""

  def begin(e, carry):  # the expert's weights and its weight-gradient accumulators
    return _expert_weights(weights, e), _expert_weights(carry[1:], e)

  def body(start, valid, carry, local):
    dx, dws = carry[0], carry[1:]
    w_e, dw_e = local
    x_c = jnp.where(valid[:, None], jax.lax.dynamic_slice_in_dim(x, start, chunk), 0)  # [chunk, d_model]
    dy_c = jnp.where(valid[:, None], jax.lax.dynamic_slice_in_dim(dy, start, chunk), 0)  # [chunk, d_model]
    # the chunk's gradients wrt its input and its expert's weights, recomputing its hidden layer
    _, vjp = jax.vjp(lambda x_c, wi, wg, wo: _chunk_ffn(x_c, wi, wg, wo, activation, gated), x_c, *w_e)
    dx_c, *dw_c = vjp(dy_c.astype(x_c.dtype))
    old = jax.lax.dynamic_slice_in_dim(dx, start, chunk)
    dx = jax.lax.dynamic_update_slice_in_dim(dx, jnp.where(valid[:, None], dx_c.astype(dx.dtype), old), start, 0)
    return (dx,) + dws, (w_e, tuple(a + d.astype(a.dtype) for a, d in zip(dw_e, dw_c)))

  def end(e, local, carry):  # write the expert's accumulated weight gradients back, in place
    return (carry[0],) + tuple(jax.lax.dynamic_update_index_in_dim(dw, d, e, 0) for dw, d in zip(carry[1:], local[1]))

  return _loop_chunks(group_sizes, x.shape[0], chunk, carry, begin, body, end)


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


def padded_ffn(x_main: jax.Array, x_overflow: jax.Array, w_in: jax.Array, w_gate: jax.Array | None,
               w_out: jax.Array, overflow_sizes: jax.Array, activation, *, chunk: int = 32):
  """The padded dropless layout's experts in one custom VJP: x_main [E, C, d_model] (C slots per
  expert) as batched einsums, x_overflow [N, d_model] (sorted by expert, overflow_sizes [E]) chunk by
  chunk. Returns ([E, C, d_model], [N, d_model]).

  One VJP for both parts so that the overflow chunks add their weight gradients in place into the
  einsums' (no second set of [E, d_model, d_ff] accumulators to zero and add).
  """
  gated = w_gate is not None
  weights = (w_in, w_gate if gated else jnp.zeros((w_in.shape[0], 0, 0), w_in.dtype), w_out)
  return _padded(x_main, x_overflow, weights, overflow_sizes.astype(jnp.int32), activation, gated,
                 max(1, min(chunk, x_overflow.shape[0])))


def _main_forward(x_main, weights, activation, gated):
  w_in, w_gate, w_out = weights
  mm = functools.partial(gemm, backend=resolve_backend(jnp.result_type(x_main.dtype, w_in.dtype)))
  hidden = mm(x_main, w_in)  # [experts, capacity, d_ff]
  gate = mm(x_main, w_gate) if gated else None  # [experts, capacity, d_ff]
  act = activation(hidden, gate)
  return mm(act, w_out), (hidden, gate, act)  # [experts, capacity, d_model]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _padded(x_main, x_overflow, weights, overflow_sizes, activation, gated, chunk):
  y_main, _ = _main_forward(x_main, weights, activation, gated)
  if x_overflow.shape[0] == 0:
    return y_main, jnp.zeros_like(x_overflow)
  return y_main, _forward(x_overflow, weights, overflow_sizes, activation, gated, chunk)


def _padded_fwd(x_main, x_overflow, weights, overflow_sizes, activation, gated, chunk):
  y_main, (hidden, gate, act) = _main_forward(x_main, weights, activation, gated)
  y_overflow = (jnp.zeros_like(x_overflow) if x_overflow.shape[0] == 0 else
                _forward(x_overflow, weights, overflow_sizes, activation, gated, chunk))
  return (y_main, y_overflow), (x_main, x_overflow, weights, overflow_sizes, hidden, gate, act)


def _padded_bwd(activation, gated, chunk, residuals, cotangents):
  x_main, x_overflow, weights, overflow_sizes, hidden, gate, act = residuals
  dy_main, dy_overflow = cotangents
  w_in, w_gate, w_out = weights
  acc = jnp.promote_types(jnp.result_type(x_main.dtype, w_in.dtype), jnp.float32)
  dy_main = dy_main.astype(act.dtype)
  mm = functools.partial(gemm, backend=resolve_backend(jnp.result_type(x_main.dtype, w_in.dtype)))
  dw_out = mm(act, dy_main, transpose_a=True, preferred_element_type=acc)  # [experts, d_ff, d_model]
  d_act = mm(dy_main, w_out, transpose_b=True)  # [experts, capacity, d_ff]
  if gated:
    _, act_vjp = jax.vjp(lambda h, g: activation(h, g), hidden, gate)
    d_hidden, d_gate = act_vjp(d_act)
  else:
    _, act_vjp = jax.vjp(lambda h: activation(h, None), hidden)
    (d_hidden,), d_gate = act_vjp(d_act), None
  dx_main = mm(d_hidden, w_in, transpose_b=True)  # [experts, capacity, d_model]
  dw_in = mm(x_main, d_hidden, transpose_a=True, preferred_element_type=acc)  # [experts, d_model, d_ff]
  if gated:
    dx_main = dx_main + mm(d_gate, w_gate, transpose_b=True)  # [experts, capacity, d_model]
    dw_gate = mm(x_main, d_gate, transpose_a=True, preferred_element_type=acc)  # [experts, d_model, d_ff]
  else:
    dw_gate = jnp.zeros(w_gate.shape, acc)
  dx_overflow = jnp.zeros_like(x_overflow)
  if x_overflow.shape[0]:
    dx_overflow, dw_in, dw_gate, dw_out = _overflow_backward(
        x_overflow, weights, overflow_sizes, dy_overflow, (dx_overflow, dw_in, dw_gate, dw_out),
        activation, gated, chunk)
  dweights = (dw_in.astype(w_in.dtype), dw_gate.astype(w_gate.dtype), dw_out.astype(w_out.dtype))
  return dx_main.astype(x_main.dtype), dx_overflow, dweights, None


_padded.defvjp(_padded_fwd, _padded_bwd)

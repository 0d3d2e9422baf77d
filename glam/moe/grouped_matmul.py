"""Grouped matmul: rows sorted by group, each group multiplied by its own weight matrix.

    y[rows of group e] = x[rows of group e] @ w[e]

"ragged_dot" is `jax.lax.ragged_dot`, native on GPU and TPU. XLA:CPU has no kernel for it: JAX
lowers it by masking the whole input once per group, E times the work.

"cblas" is the CPU default where the CBLAS kernel runs (one device, glam.kernels.matmul's rule):
a custom call doing one sgemm per group over exactly its rows (glam/kernels/grouped.py); operands
it does not take (other dtypes, empty, past CBLAS's 32-bit sizes) go to "blocked".

"blocked" is the portable path (the CPU fallback): a fori_loop over groups (the program does not
grow with the number of groups); inside each, a loop with a dynamic trip count over full chunks of
`block_size` rows, then one tail chunk whose size is the remainder rounded up to a multiple of
block_size/8, picked at run time by `lax.switch` and masked to the group's rows. So each group
costs one matmul per full block plus one, wastes fewer than block_size/8 rows, slices its weight
once, and writes its outputs in place (no scatter). The backward is a custom VJP over the same
chunks: dx = dy @ w[e]^T, dw[e] = sum of x_chunk^T dy_chunk (accumulated in float32). Autodiff
keeps the activations around the matmuls, so nothing is recomputed.

(Why not one loop per tail size with a 0/1 trip count? XLA turns a loop it can prove runs at most
once into straight-line code, so every tail size would run. Why not switch on the whole output?
A conditional copies a carried buffer; here each branch returns a block-sized window instead.)

Where the time goes on XLA:CPU (2048 tokens, d_model 512, 8 experts, top-2, SwiGLU; see
scripts/bench_moe_layer.py): the matmuls themselves take about as long as the dense FFN's; the
rest (about 0.4x of the dense FFN) is memory traffic a batched einsum does not have, because an
XLA:CPU dot cannot read or write at a dynamic offset: each chunk's input is sliced out, its output
written back, each group's weight copied out of the stack, each dw chunk added to an accumulator.

Because of that traffic, Dropless on CPU without the CBLAS kernel (several devices, other dtypes)
uses a padded layout instead (a batched einsum over [experts, capacity] slots plus a chunked pass
over the overflow: dispatch.py, chunked_ffn.py); this blocked path stays for
Dropless(implementation="blocked") and expert-parallel dispatch on several devices. The "cblas"
custom call has none of that traffic: the library's sgemm reads and writes each group's rows in place.

Rows after sum(group_sizes) belong to no group: their output and their gradient are zero (as
with ragged_dot).
"""
import functools

import jax
import jax.numpy as jnp

from glam.kernels import grouped
from glam.kernels.matmul import resolve_backend

IMPLEMENTATIONS = ("auto", "blocked", "ragged_dot", "cblas")
TAIL_SIZES = 8  # the tail chunk is rounded up to a multiple of block_size / 8 rows


def resolve_implementation(implementation: str, binding: str = "grouped_matmul.implementation",
                           dtype=jnp.float32) -> str:
  """"auto" -> "ragged_dot" where it is native (GPU, TPU), "cblas" where float32 matmuls run on
  the CBLAS kernel (glam.kernels.matmul: one CPU device), "blocked" elsewhere."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"{binding}={implementation!r}: expected one of {list(IMPLEMENTATIONS)}")
  if implementation == "auto":
    if jax.default_backend() in ("gpu", "tpu"):
      return "ragged_dot"
    return "cblas" if resolve_backend(dtype) == "cblas" else "blocked"
  return implementation


def grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array, *, implementation: str = "auto",
                   block_size: int = 256) -> jax.Array:
  """x [N, K] (rows sorted by group), w [E, K, F], group_sizes [E] int (sum <= N) -> [N, F]."""
  if x.ndim != 2 or w.ndim != 3 or x.shape[1] != w.shape[1]:
    raise ValueError(f"grouped_matmul: expected x [N, K] and w [E, K, F], got {x.shape} and {w.shape}")
  if group_sizes.shape != (w.shape[0],):
    raise ValueError(f"grouped_matmul: group_sizes has shape {group_sizes.shape}, expected ({w.shape[0]},)")
  if block_size < 1:
    raise ValueError(f"grouped_matmul.block_size={block_size}: must be >= 1")
  group_sizes = group_sizes.astype(jnp.int32)
  implementation = resolve_implementation(implementation, dtype=jnp.result_type(x.dtype, w.dtype))
  if implementation == "ragged_dot":
    return jax.lax.ragged_dot(x, w, group_sizes)  # [N, F]
  if implementation == "cblas" and grouped.supported(x, w):
    return grouped.grouped_matmul(x, w, group_sizes)  # [N, F]
  if x.shape[0] == 0:
    return jnp.zeros((0, w.shape[2]), jnp.result_type(x.dtype, w.dtype))
  return _blocked(x, w, group_sizes, block_size)


def chunk_sizes(num_rows: int, block_size: int) -> tuple[int, ...]:
  """Static chunk sizes: the full block, then the tail sizes, multiples of block / TAIL_SIZES."""
  block = max(1, min(block_size, num_rows))
  step = max(1, block // TAIL_SIZES)
  return (block,) + tuple(sorted({min(block, step * i) for i in range(1, -(-block // step) + 1)}))


class _Chunks:
  """One group's chunks: `full` blocks from group_start, then a tail of `remaining` rows.

  The tail is one chunk whose size is the smallest tail size >= remaining, chosen at run time by
  `lax.switch` (branch 0: no tail). Its rows start at `tail_start`, shifted back when they would
  run past the array's end; only rows in [tail_start, group_end) belong to the group.
  """

  def __init__(self, num_rows: int, block_size: int, group_start, group_end):
    self.num_rows = num_rows
    self.block, *self.tails = chunk_sizes(num_rows, block_size)
    self.group_end = group_end
    self.full = (group_end - group_start) // self.block
    self.group_start = group_start
    self.tail_start = group_start + self.full * self.block
    remaining = group_end - self.tail_start
    step = self.tails[0]
    self.branch = jnp.minimum((remaining + step - 1) // step, len(self.tails))  # 0 = no tail

  def full_start(self, i):
    return self.group_start + i * self.block

  def tail(self, chunk_fn, empty):
    """switch over tail sizes: chunk_fn(start, size, valid) for the chosen size, `empty()` for none."""
    def branch(size):
      def run():
        start = jnp.minimum(self.tail_start, self.num_rows - size)
        rows = start + jnp.arange(size)
        return chunk_fn(start, size, (rows >= self.tail_start) & (rows < self.group_end))
      return run
    return jax.lax.switch(self.branch, [empty] + [branch(size) for size in self.tails])


def _bounds(group_sizes: jax.Array):
  ends = jnp.cumsum(group_sizes)
  return ends - group_sizes, ends


def _grouped_forward(x: jax.Array, w: jax.Array, group_sizes: jax.Array, block_size: int,
                     transpose_w: bool) -> jax.Array:
  """[N, K] x [E, K, F] -> [N, F] (or x [N, F] with w^T -> [N, K]), chunk by chunk, in place.

  The loop over groups is a fori_loop (not unrolled), so the program, and its compile time, does
  not grow with the number of groups.
  """
  num_rows = x.shape[0]
  out_dim = w.shape[1] if transpose_w else w.shape[2]
  dtype = jnp.result_type(x.dtype, w.dtype)
  dims = (((1,), (1,)) if transpose_w else ((1,), (0,)), ((), ()))
  starts, ends = _bounds(group_sizes)

  def group(e, y):
    w_e = jax.lax.dynamic_index_in_dim(w, e, keepdims=False)  # [K, F], once per group
    chunks = _Chunks(num_rows, block_size, starts[e], ends[e])

    def matmul(start, size):
      return jax.lax.dot_general(jax.lax.dynamic_slice_in_dim(x, start, size), w_e, dims).astype(dtype)

    def full(i, y):
      start = chunks.full_start(i)
      return jax.lax.dynamic_update_slice_in_dim(y, matmul(start, chunks.block), start, 0)  # [block, out]

    y = jax.lax.fori_loop(0, chunks.full, full, y)
    # The tail comes back inside a block-sized window (a fixed shape for every branch), which is
    # merged into y where its rows belong to the group.
    window_start = jnp.minimum(chunks.tail_start, num_rows - chunks.block)
    empty = jnp.zeros((chunks.block, out_dim), dtype)
    window = chunks.tail(lambda start, size, valid: jax.lax.dynamic_update_slice_in_dim(
        empty, matmul(start, size), start - window_start, 0), lambda: empty)  # [block, out]
    rows = window_start + jnp.arange(chunks.block)
    valid = (rows >= chunks.tail_start) & (rows < chunks.group_end)
    merged = jnp.where(valid[:, None], window, jax.lax.dynamic_slice_in_dim(y, window_start, chunks.block))
    return jax.lax.dynamic_update_slice_in_dim(y, merged, window_start, 0)

  y = jnp.zeros((num_rows, out_dim), dtype)
  return jax.lax.fori_loop(0, w.shape[0], group, y)


def _grouped_weight_grad(x: jax.Array, dy: jax.Array, group_sizes: jax.Array, block_size: int) -> jax.Array:
  """dw[e] = x[rows of e]^T dy[rows of e]: [N, K], [N, F] -> [E, K, F], accumulated in >= float32."""
  num_rows = x.shape[0]
  starts, ends = _bounds(group_sizes)
  dtype = jnp.promote_types(jnp.result_type(x.dtype, dy.dtype), jnp.float32)
  shape = (x.shape[1], dy.shape[1])

  def group(e, dw):
    chunks = _Chunks(num_rows, block_size, starts[e], ends[e])

    def outer(start, size, valid=None):  # x_chunk^T dy_chunk [K, F]
      xs = jax.lax.dynamic_slice_in_dim(x, start, size)  # [chunk, K]
      if valid is not None:
        xs = jnp.where(valid[:, None], xs, 0)
      dys = jax.lax.dynamic_slice_in_dim(dy, start, size)  # [chunk, F]
      return jax.lax.dot_general(xs, dys, (((0,), (0,)), ((), ())), preferred_element_type=dtype)

    acc = chunks.tail(outer, lambda: jnp.zeros(shape, dtype))
    acc = jax.lax.fori_loop(0, chunks.full, lambda i, acc: acc + outer(chunks.full_start(i), chunks.block), acc)
    return jax.lax.dynamic_update_index_in_dim(dw, acc, e, 0)

  dw = jnp.zeros((group_sizes.shape[0],) + shape, dtype)
  return jax.lax.fori_loop(0, group_sizes.shape[0], group, dw)  # [E, K, F]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _blocked(x, w, group_sizes, block_size):
  return _grouped_forward(x, w, group_sizes, block_size, transpose_w=False)


def _blocked_fwd(x, w, group_sizes, block_size):
  return _blocked(x, w, group_sizes, block_size), (x, w, group_sizes)


def _blocked_bwd(block_size, residuals, dy):
  x, w, group_sizes = residuals
  dx = _grouped_forward(dy, w, group_sizes, block_size, transpose_w=True).astype(x.dtype)  # [N, K]
  dw = _grouped_weight_grad(x, dy, group_sizes, block_size).astype(w.dtype)  # [E, K, F]
  return dx, dw, None


_blocked.defvjp(_blocked_fwd, _blocked_bwd)

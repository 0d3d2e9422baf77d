"""The experts' whole FFN on the CBLAS kernel (oneMKL or OpenBLAS) in one custom call each way (expert_ffn.cc).

    rows = x[row_token]                                       (gathered in the kernel)
    y[rows of e] = act(rows_e wi[e]) wo[e]                         plain (gelu, relu, silu)
    y[rows of e] = (act(rows_e wi_gate[e]) * rows_e wi[e]) wo[e]    gated (geglu, swiglu, reglu: wi_gate given)

x [T, d_model] (tokens), row_token [N] int32 (each row's token, rows sorted by expert; out of range:
a zero row), group_sizes [E] (sum <= N; rows after it give zeros). The same values as a gather and
three grouped matmuls (glam/kernels/grouped.py) with the activation between them in XLA, but each
direction is one call: the rows are gathered (and, backward, their gradients summed per token) in
C++, the input projections of every expert go to the library in one batched sgemm call, the
activation and its gradient run in C++ between the calls, and the temporaries live in buffers the
kernel keeps from step to step instead of memory XLA allocates afresh (see expert_ffn.cc for why
that matters). The forward keeps rows wi and rows wi_gate [N, d_ff] for the backward, as autodiff of
the unfused path does.

Only where the grouped matmul runs on the kernel (glam/moe/grouped_matmul.py: one CPU device,
float32, the kernel loaded) and without expert dropout in training: Experts.grouped picks it.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from glam.kernels import cblas
from glam.kernels.matmul import fits_int32

ACTIVATION_CODES = {"gelu": 0, "relu": 1, "silu": 2}  # expert_ffn.cc's Activation (jax.nn's gelu: tanh approximation)


def supported(activation: str, x: jax.Array, *weights, rows: int | None = None) -> bool:
  """Whether the kernel takes this FFN: a known activation, float32, non-empty, within int32 sizes
  (rows: how many rows it gathers from x, default x's)."""
  if activation not in ACTIVATION_CODES:
    return False
  rows = x.shape[0] if rows is None else rows
  d_model, d_ff = x.shape[1], weights[0].shape[2]
  arrays = (x,) + tuple(w for w in weights if w is not None)
  return (rows > 0 and all(a.dtype == jnp.float32 and 0 not in a.shape for a in arrays)
          and fits_int32(x.shape, (rows, d_model), (rows, d_ff), (d_model, d_ff)))


def _call(name: str, results, *operands, activation: str):
  reason = cblas.load()
  if reason is not None:
    raise ValueError(f"expert_ffn: the kernel cannot be loaded: {reason}")
  call = jax.ffi.ffi_call(name, results, vmap_method="sequential")
  return call(*operands, activation=np.int32(ACTIVATION_CODES[activation]))


def _forward(x, row_token, wi, wi_gate, wo, group_sizes, activation):
  rows, d_ff = row_token.shape[0], wi.shape[2]
  gated = wi_gate is not None
  hidden = jax.ShapeDtypeStruct((rows, d_ff), jnp.float32)
  results = [jax.ShapeDtypeStruct((rows, x.shape[1]), jnp.float32), hidden] + ([hidden] if gated else [])
  weights = (wi, wi_gate, wo) if gated else (wi, wo)
  out = _call(cblas.EXPERT_FFN_TARGETS[gated, False], results, x, row_token, *weights, group_sizes,
              activation=activation)
  return out[0], out[1], (out[2] if gated else None)  # y [N, d_model], x wi, x wi_gate [N, d_ff]


def expert_ffn(x: jax.Array, row_token: jax.Array, wi: jax.Array, wi_gate: jax.Array | None, wo: jax.Array,
               group_sizes: jax.Array, activation: str) -> jax.Array:
  """x [T, d_model], row_token [N] (rows sorted by expert), wi (and wi_gate) [E, d_model, d_ff], wo
  [E, d_ff, d_model], group_sizes [E] -> [N, d_model]. activation: "gelu", "relu" or "silu",
  applied to rows wi_gate when given (then multiplied by rows wi), else to rows wi."""
  if activation not in ACTIVATION_CODES:
    raise ValueError(f"expert_ffn: activation {activation!r}: expected one of {list(ACTIVATION_CODES)}")
  experts, d_model, d_ff = wi.shape
  shapes_ok = (x.ndim == 2 and x.shape[1] == d_model and row_token.ndim == 1
               and wo.shape == (experts, d_ff, d_model) and (wi_gate is None or wi_gate.shape == wi.shape)
               and group_sizes.shape == (experts,))
  if not shapes_ok:
    raise ValueError(f"expert_ffn: expected x [T, D], row_token [N], wi (and wi_gate) [E, D, F], wo [E, F, D] and "
                     f"group_sizes [E], got x {x.shape}, row_token {row_token.shape}, wi {wi.shape}, wi_gate "
                     f"{None if wi_gate is None else wi_gate.shape}, wo {wo.shape}, group_sizes {group_sizes.shape}")
  return _expert_ffn(x, row_token.astype(jnp.int32), wi, wi_gate, wo, group_sizes.astype(jnp.int32), activation)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _expert_ffn(x, row_token, wi, wi_gate, wo, group_sizes, activation):
  return _forward(x, row_token, wi, wi_gate, wo, group_sizes, activation)[0]


def _expert_ffn_fwd(x, row_token, wi, wi_gate, wo, group_sizes, activation):
  y, hidden, gate = _forward(x, row_token, wi, wi_gate, wo, group_sizes, activation)
  return y, (x, row_token, wi, wi_gate, wo, group_sizes, hidden, gate)


def _expert_ffn_bwd(activation, residuals, dy):
  x, row_token, wi, wi_gate, wo, group_sizes, hidden, gate = residuals
  gated = wi_gate is not None
  results = [jax.ShapeDtypeStruct(x.shape, jnp.float32), jax.ShapeDtypeStruct(wi.shape, jnp.float32)]
  results += [jax.ShapeDtypeStruct(wi.shape, jnp.float32)] if gated else []
  results += [jax.ShapeDtypeStruct(wo.shape, jnp.float32)]
  operands = ((x, row_token, wi, wi_gate, wo, group_sizes, hidden, gate, dy) if gated
              else (x, row_token, wi, wo, group_sizes, hidden, dy))
  grads = _call(cblas.EXPERT_FFN_TARGETS[gated, True], results, *operands, activation=activation)
  dx, dwi = grads[0], grads[1]
  dwi_gate, dwo = (grads[2], grads[3]) if gated else (None, grads[2])
  no_gradient = np.zeros(group_sizes.shape, jax.dtypes.float0)  # for the integer inputs
  return dx, np.zeros(row_token.shape, jax.dtypes.float0), dwi, dwi_gate, dwo, no_gradient


_expert_ffn.defvjp(_expert_ffn_fwd, _expert_ffn_bwd)

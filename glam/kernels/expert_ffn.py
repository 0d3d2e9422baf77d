"""The experts' whole FFN on oneMKL / OpenBLAS in one custom call each way (expert_ffn.cc).

    y[rows of e] = act(x_e wi[e]) wo[e]                      plain (gelu, relu, silu)
    y[rows of e] = (act(x_e wi_gate[e]) * x_e wi[e]) wo[e]    gated (geglu, swiglu, reglu: wi_gate given)

x [N, d_model] sorted by expert, group_sizes [E] (sum <= N; rows after it give zeros). The same
values as three grouped matmuls (glam/kernels/grouped.py) with the activation between them in XLA,
but each direction is one call: the input projections of every expert go to the library in one
batched sgemm call, the activation and its gradient run in C++ between the calls, and the hidden-sized
temporaries live in buffers the kernel keeps from step to step instead of memory XLA allocates
afresh (see expert_ffn.cc for why that matters). The forward keeps x wi and x wi_gate [N, d_ff]
for the backward, as autodiff of the unfused path does.

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


def supported(activation: str, x: jax.Array, *weights) -> bool:
  """Whether the kernel takes this FFN: a known activation, float32, non-empty, within int32 sizes."""
  if activation not in ACTIVATION_CODES:
    return False
  rows, d_model = x.shape
  d_ff = weights[0].shape[2]
  arrays = (x,) + tuple(w for w in weights if w is not None)
  return (all(a.dtype == jnp.float32 and 0 not in a.shape for a in arrays)
          and fits_int32((rows, d_model), (rows, d_ff), (d_model, d_ff)))


def _call(name: str, results, *operands, activation: str):
  reason = cblas.load()
  if reason is not None:
    raise ValueError(f"expert_ffn: the kernel cannot be loaded: {reason}")
  call = jax.ffi.ffi_call(name, results, vmap_method="sequential")
  return call(*operands, activation=np.int32(ACTIVATION_CODES[activation]))


def _forward(x, wi, wi_gate, wo, group_sizes, activation):
  rows, d_ff = x.shape[0], wi.shape[2]
  gated = wi_gate is not None
  hidden = jax.ShapeDtypeStruct((rows, d_ff), jnp.float32)
  results = [jax.ShapeDtypeStruct(x.shape, jnp.float32), hidden] + ([hidden] if gated else [])
  weights = (wi, wi_gate, wo) if gated else (wi, wo)
  out = _call(cblas.EXPERT_FFN_TARGETS[gated, False], results, x, *weights, group_sizes.astype(jnp.int32),
              activation=activation)
  return out[0], out[1], (out[2] if gated else None)  # y [N, d_model], x wi, x wi_gate [N, d_ff]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def expert_ffn(x: jax.Array, wi: jax.Array, wi_gate: jax.Array | None, wo: jax.Array, group_sizes: jax.Array,
               activation: str) -> jax.Array:
  """x [N, d_model] sorted by expert, wi (and wi_gate) [E, d_model, d_ff], wo [E, d_ff, d_model],
  group_sizes [E] -> [N, d_model]. activation: "gelu", "relu" or "silu", applied to x wi_gate when
  given (then multiplied by x wi), else to x wi."""
  if activation not in ACTIVATION_CODES:
    raise ValueError(f"expert_ffn: activation {activation!r}: expected one of {list(ACTIVATION_CODES)}")
  experts, d_model, d_ff = wi.shape
  shapes_ok = (x.ndim == 2 and x.shape[1] == d_model and wo.shape == (experts, d_ff, d_model)
               and (wi_gate is None or wi_gate.shape == wi.shape) and group_sizes.shape == (experts,))
  if not shapes_ok:
    raise ValueError(f"expert_ffn: expected x [N, D], wi (and wi_gate) [E, D, F], wo [E, F, D] and group_sizes "
                     f"[E], got x {x.shape}, wi {wi.shape}, wi_gate {None if wi_gate is None else wi_gate.shape}, "
                     f"wo {wo.shape}, group_sizes {group_sizes.shape}")
  return _forward(x, wi, wi_gate, wo, group_sizes, activation)[0]


def _expert_ffn_fwd(x, wi, wi_gate, wo, group_sizes, activation):
  y, hidden, gate = _forward(x, wi, wi_gate, wo, group_sizes, activation)
  return y, (x, wi, wi_gate, wo, group_sizes, hidden, gate)


def _expert_ffn_bwd(activation, residuals, dy):
  x, wi, wi_gate, wo, group_sizes, hidden, gate = residuals
  gated = wi_gate is not None
  results = [jax.ShapeDtypeStruct(x.shape, jnp.float32), jax.ShapeDtypeStruct(wi.shape, jnp.float32)]
  results += [jax.ShapeDtypeStruct(wi.shape, jnp.float32)] if gated else []
  results += [jax.ShapeDtypeStruct(wo.shape, jnp.float32)]
  operands = ((x, wi, wi_gate, wo, group_sizes.astype(jnp.int32), hidden, gate, dy) if gated
              else (x, wi, wo, group_sizes.astype(jnp.int32), hidden, dy))
  grads = _call(cblas.EXPERT_FFN_TARGETS[gated, True], results, *operands, activation=activation)
  dx, dwi = grads[0], grads[1]
  dwi_gate, dwo = (grads[2], grads[3]) if gated else (None, grads[2])
  return dx, dwi, dwi_gate, dwo, np.zeros(group_sizes.shape, jax.dtypes.float0)


expert_ffn.defvjp(_expert_ffn_fwd, _expert_ffn_bwd)

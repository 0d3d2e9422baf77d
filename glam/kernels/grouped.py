"""A grouped (ragged) float32 matmul on a CBLAS sgemm (glam/kernels/cblas.py: oneMKL or OpenBLAS): one
sgemm per group over exactly its rows, all groups in one batched library call.

    y[rows of group e] = x[rows of group e] @ w[e]      x [N, K] sorted by group, w [E, K, F]

What `jax.lax.ragged_dot` is on GPU/TPU, for XLA:CPU, which has no kernel for it (its fallback
masks the input once per group: E times the work). The group sizes are read at run time by the
custom call (cblas_gemm.cc), so no row is padded and none is dropped. Rows after sum(group_sizes)
give zeros, as do the weight gradients of groups without rows. Differentiable: dx = dy w[e]^T is
the same call with w transposed, dw[e] = x_e^T dy_e one sgemm per group.

Only where `glam.kernels.matmul.resolve_backend` says "cblas" (one CPU device, float32, the kernel
loaded); glam/moe/grouped_matmul.py picks it.
"""
import jax
import jax.numpy as jnp
import numpy as np

from glam.kernels import cblas
from glam.kernels.matmul import fits_int32


def _require_kernel(*operands):
  if any(a.dtype != jnp.float32 for a in operands):
    raise ValueError(f"grouped_gemm: float32 only, got {[str(a.dtype) for a in operands]}")
  reason = cblas.load()
  if reason is not None:
    raise ValueError(f"grouped_gemm: the kernel cannot be loaded: {reason}")


def supported(x: jax.Array, w: jax.Array) -> bool:
  """Whether the kernel takes these operands: float32, non-empty, every matrix within CBLAS's int32."""
  rows, k = x.shape
  f = w.shape[2]
  return (x.dtype == jnp.float32 and w.dtype == jnp.float32 and 0 not in x.shape and 0 not in w.shape
          and fits_int32((rows, k), w.shape, (rows, f)))


def grouped_gemm(x: jax.Array, w: jax.Array, group_sizes: jax.Array, *, transpose_w: bool = False) -> jax.Array:
  """x [N, K] @ w[e] ([E, K, F], or w[e]^T for [E, F, K] when transpose_w) per group -> [N, F]."""
  k_axis, f_axis = (2, 1) if transpose_w else (1, 2)
  if x.ndim != 2 or w.ndim != 3 or group_sizes.shape != (w.shape[0],) or x.shape[1] != w.shape[k_axis]:
    raise ValueError(f"grouped_gemm: expected x [N, K], w [E, K, F] (or [E, F, K] when transpose_w) and "
                     f"group_sizes [E], got {x.shape}, {w.shape} and {group_sizes.shape} (transpose_w={transpose_w})")
  _require_kernel(x, w)
  call = jax.ffi.ffi_call(cblas.GROUPED_TARGET, jax.ShapeDtypeStruct((x.shape[0], w.shape[f_axis]), jnp.float32),
                          vmap_method="sequential")
  return call(x, w, group_sizes.astype(jnp.int32), transpose_w=np.bool_(transpose_w))  # [N, F]


def grouped_outer(x: jax.Array, dy: jax.Array, group_sizes: jax.Array) -> jax.Array:
  """dw[e] = x[rows of e]^T dy[rows of e]: x [N, K], dy [N, F] -> [E, K, F]."""
  if x.ndim != 2 or dy.ndim != 2 or dy.shape[0] != x.shape[0] or group_sizes.ndim != 1:
    raise ValueError(f"grouped_outer: expected x [N, K], dy [N, F] and group_sizes [E], got {x.shape}, "
                     f"{dy.shape} and {group_sizes.shape}")
  _require_kernel(x, dy)
  shape = (group_sizes.shape[0], x.shape[1], dy.shape[1])
  call = jax.ffi.ffi_call(cblas.OUTER_TARGET, jax.ShapeDtypeStruct(shape, jnp.float32), vmap_method="sequential")
  return call(x, dy, group_sizes.astype(jnp.int32))  # [E, K, F]


@jax.custom_vjp
def grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
  """Differentiable in x and w: x [N, K] sorted by group, w [E, K, F], group_sizes [E] -> [N, F]."""
  return grouped_gemm(x, w, group_sizes)


def _grouped_matmul_fwd(x, w, group_sizes):
  return grouped_gemm(x, w, group_sizes), (x, w, group_sizes)


def _grouped_matmul_bwd(residuals, dy):
  x, w, group_sizes = residuals
  dx = grouped_gemm(dy, w, group_sizes, transpose_w=True)  # [N, K]
  dw = grouped_outer(x, dy, group_sizes)  # [E, K, F]
  return dx, dw, np.zeros(group_sizes.shape, jax.dtypes.float0)


grouped_matmul.defvjp(_grouped_matmul_fwd, _grouped_matmul_bwd)

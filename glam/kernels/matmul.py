"""Matmuls that run on a CBLAS library's sgemm (oneMKL on Intel CPUs, OpenBLAS on others) on a single
CPU device, and as XLA dots everywhere else.

    matmul(a, b)                    a [M, K] @ b [K, N]  or batched  a [B, M, K] @ b [B, K, N]
    matmul(a, b, transpose_b=True)  a [M, K] @ b[N, K]^T (the logits against an embedding table)

`matmul.backend` (gin) picks how:
- "xla": jnp.matmul, XLA's own dot;
- "cblas": the custom call of cblas_gemm.cc, forward and backward (da = g b^T, db = a^T g, each
  one sgemm), on the library glam/kernels/cblas.py finds; float32 only, other dtypes stay on XLA;
  an error if the kernel cannot be loaded;
- "auto" (default): "cblas" when JAX's default backend is the CPU, there is one device and the
  kernel loads, except on oneMKL on a CPU that is not Intel's (where oneMKL takes its generic code
  path; glam/kernels/cblas.py picks OpenBLAS there when it is installed, as it is with glam);
  "xla" otherwise. One device, because the custom call has no sharding rule for GSPMD to partition
  it by; forcing "cblas" on a mesh of several devices is untested.
The experts' grouped matmul and fused FFN (glam/kernels/grouped.py, expert_ffn.py) follow the same
rule (glam/moe/grouped_matmul.py).

Why: on an Intel CPU at the race's shapes oneMKL's sgemm took 12-17% less time than XLA:CPU's dots
for the logits' gradients and the experts' batched matmuls (scratch, 2026-11-25 13:45 UTC), and
matmuls are about 70% of a train step. On an AMD EPYC with AVX-512 (2026-12-07, scratch) a 2048^3
float32 matmul ran at 0.35-0.36 TFLOP/s on XLA, 0.17-0.18 on oneMKL and 0.41-0.42 on OpenBLAS,
whose forward+backward through the kernel took 0-17% less time than XLA's at the model's shapes.
"""
import functools

import gin
import jax
import jax.numpy as jnp
import numpy as np

from glam.kernels import cblas

BACKENDS = ("auto", "xla", "cblas")


@gin.configurable("matmul")
def resolve_backend(dtype=jnp.float32, backend: str = "auto") -> str:
  """"xla" or "cblas" for a matmul of `dtype`, by the rules in the module docstring."""
  if backend not in BACKENDS:
    raise ValueError(f"matmul.backend={backend!r}: expected one of {list(BACKENDS)}")
  if backend == "xla" or jnp.dtype(dtype) != jnp.float32:
    return "xla"
  if backend == "auto":
    return "cblas" if auto_picks_cblas() else "xla"
  reason = cblas.load()
  if reason is not None:
    raise ValueError(f"matmul.backend='cblas': the kernel cannot be loaded: {reason}")
  return "cblas"


def auto_picks_cblas() -> bool:
  """One CPU device and the kernel loaded, on a library that is fast on this CPU: not oneMKL on a
  CPU that is not Intel's, where it takes its generic code path (module docstring)."""
  if jax.default_backend() != "cpu" or jax.device_count() != 1:
    return False
  library = cblas.loaded_library()
  if isinstance(library, str):
    return False
  return library.name != "oneMKL" or cblas.cpu_info()[0] == "GenuineIntel"


def describe_backend(dtype=jnp.float32) -> str:
  """What `glam train` prints: where matmuls of `dtype` run."""
  if resolve_backend(dtype) == "xla":
    return "XLA's own dots (matmul.backend)"
  return (f"{cblas.loaded_library().describe()} through glam's sgemm custom calls, the experts' whole FFN "
          "included (matmul.backend)")


# The kernel passes sizes, leading dimensions and strides as CBLAS's 32-bit ints (the LP64
# interfaces of oneMKL and scipy-openblas32): larger operands go to XLA rather than overflow.
INT32_MAX = 2 ** 31 - 1


def fits_int32(*shapes) -> bool:
  """Whether every matrix of these [..., rows, cols] shapes has at most INT32_MAX elements."""
  return all(shape[-1] * shape[-2] <= INT32_MAX for shape in shapes)


def gemm(a: jax.Array, b: jax.Array, *, transpose_a: bool = False, transpose_b: bool = False,
         backend: str = "xla", preferred_element_type=None) -> jax.Array:
  """op(a) @ op(b) for 2-D or batched 3-D operands, not differentiable through "cblas": for
  hand-written backward passes. `backend` is a resolved one ("xla" or "cblas");
  preferred_element_type is XLA's accumulation type (the kernel's float32 already is one)."""
  if a.ndim != b.ndim or a.ndim not in (2, 3):
    raise ValueError(f"gemm: expected two 2-D or two 3-D operands, got {a.shape} and {b.shape}")
  out_shape = (a.shape[-1] if transpose_a else a.shape[-2], b.shape[-2] if transpose_b else b.shape[-1])
  if (backend == "xla" or 0 in a.shape or 0 in b.shape or a.dtype != jnp.float32 or b.dtype != jnp.float32
      or not fits_int32(a.shape, b.shape, out_shape)):
    op_a = jnp.swapaxes(a, -1, -2) if transpose_a else a
    op_b = jnp.swapaxes(b, -1, -2) if transpose_b else b
    return jnp.matmul(op_a, op_b, preferred_element_type=preferred_element_type)  # [..., M, N]
  reason = cblas.load()  # registers the custom call in this process (cached)
  if reason is not None:
    raise ValueError(f"gemm(backend='cblas'): the kernel cannot be loaded: {reason}")
  batched = a.ndim == 3
  a3, b3 = (a, b) if batched else (a[None], b[None])
  m = a3.shape[2] if transpose_a else a3.shape[1]
  k = a3.shape[1] if transpose_a else a3.shape[2]
  n = b3.shape[1] if transpose_b else b3.shape[2]
  if (b3.shape[2] if transpose_b else b3.shape[1]) != k or a3.shape[0] != b3.shape[0]:
    raise ValueError(f"gemm: shapes {a.shape} and {b.shape} do not multiply "
                     f"(transpose_a={transpose_a}, transpose_b={transpose_b})")
  call = jax.ffi.ffi_call(cblas.TARGET, jax.ShapeDtypeStruct((a3.shape[0], m, n), jnp.float32),
                          vmap_method="sequential")
  out = call(a3, b3, transpose_a=np.bool_(transpose_a), transpose_b=np.bool_(transpose_b))  # [B, M, N]
  return out if batched else out[0]


def matmul(a: jax.Array, b: jax.Array, *, transpose_b: bool = False) -> jax.Array:
  """a @ b (or a @ b^T), differentiable, on the backend `matmul.backend` resolves to."""
  backend = resolve_backend(jnp.result_type(a.dtype, b.dtype))
  if backend == "xla":
    return gemm(a, b, transpose_b=transpose_b)
  return _cblas_matmul(a, b, transpose_b)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _cblas_matmul(a, b, transpose_b):
  return gemm(a, b, transpose_b=transpose_b, backend="cblas")


def _cblas_matmul_fwd(a, b, transpose_b):
  return gemm(a, b, transpose_b=transpose_b, backend="cblas"), (a, b)


def _cblas_matmul_bwd(transpose_b, residuals, g):
  a, b = residuals
  if transpose_b:  # c = a b^T: da = g b, db = g^T a
    return (gemm(g, b, backend="cblas"), gemm(g, a, transpose_a=True, backend="cblas"))
  return (gemm(g, b, transpose_b=True, backend="cblas"),  # da = g b^T
          gemm(a, g, transpose_a=True, backend="cblas"))  # db = a^T g


_cblas_matmul.defvjp(_cblas_matmul_fwd, _cblas_matmul_bwd)

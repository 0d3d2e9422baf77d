"""Builds and registers cblas_gemm.cc: XLA:CPU float32 matmuls run by a CBLAS library's sgemm.

The library is oneMKL from the `mkl` wheel (`pip install 'glam[mkl]'`, which `make install` does),
or any shared library exporting `cblas_sgemm` named by GLAM_CBLAS_LIBRARY. The custom call is
compiled on first use with the C++ compiler (CXX, else c++) against the FFI headers that ship with
jaxlib, into GLAM_KERNEL_CACHE (default ~/.cache/glam/kernels), keyed by the source, jaxlib's
version and the compiler, and written atomically: a second process finds it built.

`load()` never raises: it returns None when the kernel is ready, else why it is not, so that
callers can fall back to XLA's own dots.
"""
import ctypes
import functools
import hashlib
import importlib.metadata
import os
import pathlib
import shutil
import subprocess
import tempfile

import jax
import jaxlib

TARGET = "glam_cblas_gemm"
GROUPED_TARGET = "glam_cblas_grouped_gemm"  # y[rows of e] = x[rows of e] @ op(w[e])
OUTER_TARGET = "glam_cblas_grouped_outer"  # dw[e] = x[rows of e]^T dy[rows of e]
SOURCE = pathlib.Path(__file__).with_name("cblas_gemm.cc")


def cache_dir() -> pathlib.Path:
  if os.environ.get("GLAM_KERNEL_CACHE"):
    return pathlib.Path(os.environ["GLAM_KERNEL_CACHE"])
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return pathlib.Path(base) / "glam" / "kernels"


def find_cblas_library() -> str:
  """GLAM_CBLAS_LIBRARY, else libmkl_rt from the installed `mkl` distribution."""
  if os.environ.get("GLAM_CBLAS_LIBRARY"):
    return os.environ["GLAM_CBLAS_LIBRARY"]
  try:
    files = importlib.metadata.distribution("mkl").files or []
  except importlib.metadata.PackageNotFoundError:
    raise FileNotFoundError("the `mkl` package is not installed (pip install 'glam[mkl]') and "
                            "GLAM_CBLAS_LIBRARY is not set") from None
  for file in files:
    if file.name.startswith("libmkl_rt.so"):
      return str(file.locate())
  raise FileNotFoundError("the `mkl` package has no libmkl_rt.so")


def build() -> pathlib.Path:
  """The compiled custom call, built once per source / jaxlib / compiler."""
  compiler = os.environ.get("CXX", "c++")
  if shutil.which(compiler) is None:
    raise FileNotFoundError(f"no C++ compiler {compiler!r} on PATH (set CXX)")
  source = SOURCE.read_bytes()
  key = hashlib.sha256(source + jaxlib.__version__.encode() + compiler.encode()).hexdigest()[:16]
  target = cache_dir() / f"cblas_gemm-{key}.so"
  if target.exists():
    return target
  target.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
    built = pathlib.Path(tmp) / target.name
    command = [compiler, "-O2", "-shared", "-fPIC", "-std=c++17", "-w", f"-I{jax.ffi.include_dir()}",
               str(SOURCE), "-o", str(built)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
      raise RuntimeError(f"compiling {SOURCE} failed ({' '.join(command)}):\n{done.stderr[-2000:]}")
    os.replace(built, target)  # atomic: a reader sees no file or the whole file
  return target


@functools.cache
def load() -> str | None:
  """Registers the custom call once per process. None when ready, else the reason it is not."""
  # oneMKL's OpenMP threads spin for 200 ms after each sgemm by default (KMP_BLOCKTIME), taking
  # the cores from the XLA ops between matmuls: the race's step took 1.64 s with the spinning,
  # 1.35 s without, 1.53 s on XLA's dots (scratch A/B, 2026-11-25 13:52 UTC). Read at OpenMP's start.
  os.environ.setdefault("KMP_BLOCKTIME", "0")
  try:
    cblas = ctypes.CDLL(find_cblas_library(), mode=ctypes.RTLD_GLOBAL)
    sgemm = ctypes.cast(cblas.cblas_sgemm, ctypes.c_void_p)
    # oneMKL's batched sgemm, when the library has one (not in the CBLAS standard)
    batched, grouped = ((ctypes.cast(getattr(cblas, name), ctypes.c_void_p) if hasattr(cblas, name) else None)
                        for name in ("cblas_sgemm_batch_strided", "cblas_sgemm_batch"))
    kernel = ctypes.CDLL(str(build()))
  except (OSError, RuntimeError, AttributeError) as error:  # FileNotFoundError is an OSError
    return str(error)
  kernel.glam_set_sgemm.argtypes = [ctypes.c_void_p] * 3
  kernel.glam_set_sgemm(sgemm, batched, grouped)
  for target, handler in ((TARGET, kernel.GlamCblasGemm), (GROUPED_TARGET, kernel.GlamCblasGroupedGemm),
                          (OUTER_TARGET, kernel.GlamCblasGroupedOuter)):
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(handler), platform="cpu")
  return None

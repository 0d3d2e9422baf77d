"""Builds and registers cblas_gemm.cc: XLA:CPU float32 matmuls run by a CBLAS library's sgemm.

Which library: GLAM_CBLAS_LIBRARY (any shared library exporting `cblas_sgemm`, or OpenBLAS's
`scipy_cblas_sgemm`), else the first installed of
- oneMKL (the `mkl` wheel: `pip install 'glam[mkl]'`, which `make install` does), first on Intel CPUs;
- OpenBLAS (the `scipy-openblas32` wheel, a dependency of glam), first on every other CPU.
DECISION: by CPU vendor, because oneMKL takes its generic code path on CPUs it does not take for
Intel's: on an AMD EPYC with AVX-512 (family 26, 2026-12-07) oneMKL's sgemm ran 2048^3 at 0.17-0.18
TFLOP/s against 0.35-0.36 for XLA's own dot, and its batched sgemm of 32 experts' 256^3 matmuls
at 0.17 against 0.36 for OpenBLAS's (scratch timings, /tmp/s18). On the Intel machine of the earlier
measurements oneMKL was 12-17% faster than XLA's dots (glam/kernels/matmul.py).

OpenBLAS picks its kernels for the CPU it finds, unless OPENBLAS_CORETYPE names them. Some machine
images set that variable system-wide (OPENBLAS_CORETYPE=Haswell on the AMD machine above, where
OpenBLAS's own choice, SkylakeX, ran 2048^3 at 0.42 TFLOP/s on two cores against about 0.21 for
Haswell's kernels), so glam's copy of OpenBLAS, which no other code in the process uses, chooses
its own kernels: GLAM_OPENBLAS_CORETYPE names them (an OpenBLAS core name), else OpenBLAS detects
the CPU, whatever OPENBLAS_CORETYPE says.

The custom call is compiled on first use with the C++ compiler (CXX, else c++) against the FFI
headers that ship with jaxlib, into GLAM_KERNEL_CACHE (default ~/.cache/glam/kernels), keyed by the
source, jaxlib's version and the compiler, and written atomically: a second process finds it built.

`load()` never raises: it returns None when the kernel is ready, else why it is not, so that
callers can fall back to XLA's own dots.
"""
import contextlib
import ctypes
import dataclasses
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
# expert_ffn: the experts' whole FFN, forward and backward, on rows sorted by expert (gated or not)
EXPERT_FFN_TARGETS = {(gated, backward): f"glam_expert_ffn{'_gated' if gated else ''}{'_bwd' if backward else ''}"
                      for gated in (False, True) for backward in (False, True)}
SOURCES = [pathlib.Path(__file__).with_name(name) for name in ("cblas_gemm.cc", "expert_ffn.cc", "cblas_common.h")]
SYMBOL_PREFIXES = ("", "scipy_")  # OpenBLAS as scipy-openblas32 ships it prefixes every symbol


@dataclasses.dataclass(frozen=True)
class Library:
  name: str  # "oneMKL", "OpenBLAS" or "GLAM_CBLAS_LIBRARY"
  path: str
  kernels: str = ""  # OpenBLAS's core name once loaded ("SkylakeX", "Haswell", ...)

  def describe(self) -> str:
    return f"{self.name}{f' ({self.kernels} kernels)' if self.kernels else ''}, {self.path}"


@functools.cache
def cpu_info(path: str = "/proc/cpuinfo") -> tuple[str, frozenset]:
  """(vendor id, instruction-set flags) of the first CPU; ("", {}) where there is no /proc/cpuinfo."""
  vendor, flags = "", frozenset()
  try:
    with open(path) as f:
      for line in f:
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "vendor_id" and not vendor:
          vendor = value.strip()
        elif key == "flags" and not flags:
          flags = frozenset(value.split())
        if vendor and flags:
          break
  except OSError:
    pass
  return vendor, flags


def cache_dir() -> pathlib.Path:
  if os.environ.get("GLAM_KERNEL_CACHE"):
    return pathlib.Path(os.environ["GLAM_KERNEL_CACHE"])
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return pathlib.Path(base) / "glam" / "kernels"


def _installed(distribution: str, file_prefix: str) -> str | None:
  """The path of the distribution's first file named file_prefix*, None if not installed."""
  try:
    files = importlib.metadata.distribution(distribution).files or []
  except importlib.metadata.PackageNotFoundError:
    return None
  for file in files:
    if file.name.startswith(file_prefix):
      return str(file.locate())
  return None


def find_cblas_library(vendor: str | None = None) -> Library:
  """GLAM_CBLAS_LIBRARY, else oneMKL or OpenBLAS, whichever is installed, in the vendor's order."""
  if os.environ.get("GLAM_CBLAS_LIBRARY"):
    return Library("GLAM_CBLAS_LIBRARY", os.environ["GLAM_CBLAS_LIBRARY"])
  candidates = [("oneMKL", "mkl", "libmkl_rt.so"), ("OpenBLAS", "scipy-openblas32", "libscipy_openblas")]
  if (cpu_info()[0] if vendor is None else vendor) != "GenuineIntel":
    candidates.reverse()
  for name, distribution, file_prefix in candidates:
    path = _installed(distribution, file_prefix)
    if path is not None:
      return Library(name, path)
  raise FileNotFoundError("neither oneMKL (pip install 'glam[mkl]') nor OpenBLAS (pip install scipy-openblas32) is "
                          "installed, and GLAM_CBLAS_LIBRARY is not set")


def build() -> pathlib.Path:
  """The compiled custom call, built once per source / jaxlib / compiler."""
  compiler = os.environ.get("CXX", "c++")
  if shutil.which(compiler) is None:
    raise FileNotFoundError(f"no C++ compiler {compiler!r} on PATH (set CXX)")
  source = b"".join(path.read_bytes() for path in SOURCES)
  key = hashlib.sha256(source + jaxlib.__version__.encode() + compiler.encode()).hexdigest()[:16]
  target = cache_dir() / f"cblas_gemm-{key}.so"
  if target.exists():
    return target
  target.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
    built = pathlib.Path(tmp) / target.name
    # -fno-trapping-math lets the compiler vectorize expert_ffn.cc's activations, whose clamps are
    # float comparisons (nothing here reads floating-point exception flags or errno)
    command = [compiler, "-O3", "-fno-trapping-math", "-fno-math-errno", "-shared", "-fPIC", "-std=c++17", "-pthread",
               "-w", f"-I{jax.ffi.include_dir()}",
               *[str(path) for path in SOURCES if path.suffix == ".cc"], "-o", str(built)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
      raise RuntimeError(f"compiling {' '.join(p.name for p in SOURCES)} failed ({' '.join(command)}):\n"
                         f"{done.stderr[-2000:]}")
    os.replace(built, target)  # atomic: a reader sees no file or the whole file
  return target


def _symbol(library: ctypes.CDLL, name: str, required: bool = True):
  for prefix in SYMBOL_PREFIXES:
    if hasattr(library, prefix + name):
      return ctypes.cast(getattr(library, prefix + name), ctypes.c_void_p)
  if required:
    raise AttributeError(f"{library._name} exports no {name} (nor {', '.join(p + name for p in SYMBOL_PREFIXES[1:])})")
  return None


def _prepare_environment():
  """Library settings read when the library starts, so set before it loads (never overriding the user's)."""
  # oneMKL's OpenMP threads spin for 200 ms after each sgemm by default (KMP_BLOCKTIME), taking
  # the cores from the XLA ops between matmuls: the race's step took 1.64 s with the spinning,
  # 1.35 s without, 1.53 s on XLA's dots (scratch A/B, 2026-11-25 13:52 UTC). Read at OpenMP's start.
  os.environ.setdefault("KMP_BLOCKTIME", "0")


@contextlib.contextmanager
def _openblas_coretype():
  """OPENBLAS_CORETYPE as GLAM_OPENBLAS_CORETYPE says (unset: OpenBLAS detects the CPU) while the
  library loads, the caller's value afterwards: OpenBLAS reads it once, when it starts."""
  saved = os.environ.pop("OPENBLAS_CORETYPE", None)
  if os.environ.get("GLAM_OPENBLAS_CORETYPE"):
    os.environ["OPENBLAS_CORETYPE"] = os.environ["GLAM_OPENBLAS_CORETYPE"]
  try:
    yield
  finally:
    os.environ.pop("OPENBLAS_CORETYPE", None)
    if saved is not None:
      os.environ["OPENBLAS_CORETYPE"] = saved


@functools.cache
def loaded_library() -> Library | str:
  """Registers the custom call once per process: the Library it runs on, else why it cannot load."""
  _prepare_environment()
  try:
    library = find_cblas_library()
    with _openblas_coretype():
      cblas = ctypes.CDLL(library.path, mode=ctypes.RTLD_GLOBAL)
    sgemm = _symbol(cblas, "cblas_sgemm")
    # the batched sgemms of oneMKL and OpenBLAS >= 0.3.29 (not in the CBLAS standard)
    batched, grouped = (_symbol(cblas, name, required=False) for name in ("cblas_sgemm_batch_strided", "cblas_sgemm_batch"))
    kernel = ctypes.CDLL(str(build()))
  except (OSError, RuntimeError, AttributeError) as error:  # FileNotFoundError is an OSError
    return str(error)
  kernel.glam_set_sgemm.argtypes = [ctypes.c_void_p] * 3
  kernel.glam_set_sgemm(sgemm, batched, grouped)
  handlers = {TARGET: kernel.GlamCblasGemm, GROUPED_TARGET: kernel.GlamCblasGroupedGemm,
              OUTER_TARGET: kernel.GlamCblasGroupedOuter,
              EXPERT_FFN_TARGETS[False, False]: kernel.GlamExpertFfn, EXPERT_FFN_TARGETS[True, False]: kernel.GlamExpertFfnGated,
              EXPERT_FFN_TARGETS[False, True]: kernel.GlamExpertFfnBwd,
              EXPERT_FFN_TARGETS[True, True]: kernel.GlamExpertFfnGatedBwd}
  for target, handler in handlers.items():
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(handler), platform="cpu")
  core_name = _symbol(cblas, "openblas_get_corename", required=False)
  if core_name is not None:
    library = dataclasses.replace(library, kernels=ctypes.CFUNCTYPE(ctypes.c_char_p)(core_name.value)().decode())
  return library


def load() -> str | None:
  """None when the kernel is ready, else the reason it is not."""
  library = loaded_library()
  return library if isinstance(library, str) else None

"""Which CBLAS library the kernels run on (glam/kernels/cblas.py), and when "auto" uses them."""
import json
import os
import platform
import shutil
import subprocess
import sys
import textwrap

import jax
import pytest

from glam.kernels import cblas, matmul

INTEL = "vendor_id\t: GenuineIntel\nflags\t\t: fpu avx2 avx512f\n"
AMD = "vendor_id\t: AuthenticAMD\nflags\t\t: fpu avx2\n"
x86_linux = pytest.mark.skipif(platform.machine() != "x86_64" or sys.platform != "linux",
                               reason="the mkl and scipy-openblas32 wheels glam installs are x86-64 Linux ones here")
compiler = pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler to build the kernel")


def test_cpu_info_reads_the_first_cpus_vendor_and_flags(tmp_path):
  path = tmp_path / "cpuinfo"
  path.write_text("processor\t: 0\n" + INTEL + "\nprocessor\t: 1\n" + AMD)
  assert cblas.cpu_info.__wrapped__(str(path)) == ("GenuineIntel", frozenset({"fpu", "avx2", "avx512f"}))
  assert cblas.cpu_info.__wrapped__(str(tmp_path / "missing")) == ("", frozenset())


@pytest.fixture
def installed(monkeypatch):
  """Pretend these distributions are installed (name -> library path), and no GLAM_CBLAS_LIBRARY."""
  monkeypatch.delenv("GLAM_CBLAS_LIBRARY", raising=False)

  def pretend(**paths):
    monkeypatch.setattr(cblas, "_installed", lambda distribution, prefix: paths.get(distribution))
  return pretend


def test_onemkl_first_on_intel_openblas_first_elsewhere(installed):
  installed(**{"mkl": "/m/libmkl_rt.so.3", "scipy-openblas32": "/o/libscipy_openblas.so"})
  assert cblas.find_cblas_library("GenuineIntel") == cblas.Library("oneMKL", "/m/libmkl_rt.so.3")
  assert cblas.find_cblas_library("AuthenticAMD") == cblas.Library("OpenBLAS", "/o/libscipy_openblas.so")
  assert cblas.find_cblas_library("") == cblas.Library("OpenBLAS", "/o/libscipy_openblas.so")
  installed(**{"mkl": "/m/libmkl_rt.so.3"})  # only one installed: that one, whatever the CPU
  assert cblas.find_cblas_library("AuthenticAMD").name == "oneMKL"


def test_glam_cblas_library_wins_and_a_missing_library_is_named(installed, monkeypatch):
  installed(**{"mkl": "/m/libmkl_rt.so.3"})
  monkeypatch.setenv("GLAM_CBLAS_LIBRARY", "/nonexistent/libcblas.so")
  assert cblas.find_cblas_library("GenuineIntel") == cblas.Library("GLAM_CBLAS_LIBRARY", "/nonexistent/libcblas.so")
  monkeypatch.delenv("GLAM_CBLAS_LIBRARY")
  installed()
  with pytest.raises(FileNotFoundError, match=r"pip install 'glam\[mkl\]'.*pip install scipy-openblas32"):
    cblas.find_cblas_library("GenuineIntel")


@pytest.mark.parametrize("vendor,library,picks", [
    ("GenuineIntel", "oneMKL", True), ("AuthenticAMD", "oneMKL", False),  # oneMKL's generic path off Intel
    ("AuthenticAMD", "OpenBLAS", True), ("GenuineIntel", "OpenBLAS", True),
    ("AuthenticAMD", "GLAM_CBLAS_LIBRARY", True)])
def test_auto_uses_the_kernel_unless_it_is_onemkl_off_intel(monkeypatch, vendor, library, picks):
  monkeypatch.setattr(cblas, "cpu_info", lambda: (vendor, frozenset()))
  monkeypatch.setattr(cblas, "loaded_library", lambda: cblas.Library(library, "/lib.so"))
  monkeypatch.setattr(cblas, "load", lambda: None)
  monkeypatch.setattr(jax, "device_count", lambda: 1)  # the tests see 8 devices, where "auto" never picks it
  assert matmul.resolve_backend(backend="auto") == ("cblas" if picks else "xla")
  monkeypatch.setattr(jax, "device_count", lambda: 8)
  assert matmul.resolve_backend(backend="auto") == "xla"
  monkeypatch.setattr(cblas, "loaded_library", lambda: "no library")
  monkeypatch.setattr(jax, "device_count", lambda: 1)
  assert matmul.resolve_backend(backend="auto") == "xla"


def test_openblas_coretype_is_glams_while_loading_and_the_callers_after(monkeypatch):
  monkeypatch.setenv("OPENBLAS_CORETYPE", "Haswell")
  monkeypatch.delenv("GLAM_OPENBLAS_CORETYPE", raising=False)
  with cblas._openblas_coretype():
    assert "OPENBLAS_CORETYPE" not in os.environ  # OpenBLAS detects the CPU
  assert os.environ["OPENBLAS_CORETYPE"] == "Haswell"
  monkeypatch.setenv("GLAM_OPENBLAS_CORETYPE", "Zen")
  with cblas._openblas_coretype():
    assert os.environ["OPENBLAS_CORETYPE"] == "Zen"
  assert os.environ["OPENBLAS_CORETYPE"] == "Haswell"
  monkeypatch.delenv("OPENBLAS_CORETYPE")
  with pytest.raises(RuntimeError):
    with cblas._openblas_coretype():
      raise RuntimeError("a failed load")
  assert "OPENBLAS_CORETYPE" not in os.environ


# Run in a process of its own per library: a process loads one library, once.
PRODUCTS = textwrap.dedent("""
    import ctypes, json, sys
    import jax, jax.numpy as jnp, numpy as np
    from glam.kernels import cblas
    from glam.kernels.grouped import grouped_gemm, grouped_outer
    from glam.kernels.matmul import gemm
    library = cblas.loaded_library()
    assert not isinstance(library, str), library
    x, w = jax.random.normal(jax.random.key(0), (40, 6)), jax.random.normal(jax.random.key(1), (3, 6, 5))
    sizes = jnp.array([9, 0, 26], jnp.int32)  # an empty group and 5 rows after the last
    y, dw = np.asarray(grouped_gemm(x, w, sizes)), np.asarray(grouped_outer(x, x[:, :5], sizes))
    xn, wn = np.asarray(x), np.asarray(w)
    for e, (start, end) in enumerate([(0, 9), (9, 9), (9, 35)]):
      np.testing.assert_allclose(y[start:end], xn[start:end] @ wn[e], rtol=1e-5, atol=1e-5)
      np.testing.assert_allclose(dw[e], xn[start:end].T @ xn[start:end, :5], rtol=1e-5, atol=1e-5)
    assert np.all(y[35:] == 0)
    a, b = jax.random.normal(jax.random.key(2), (3, 7, 4)), jax.random.normal(jax.random.key(3), (3, 5, 7))
    np.testing.assert_allclose(gemm(a, b, transpose_a=True, transpose_b=True, backend="cblas"),
                               np.swapaxes(np.asarray(a), 1, 2) @ np.swapaxes(np.asarray(b), 1, 2), rtol=1e-5, atol=1e-5)
    # the fused expert FFN, forward and backward (its input gradient accumulates with beta = 1)
    from glam.kernels.expert_ffn import expert_ffn
    from glam.moe.grouped_matmul import grouped_matmul
    wg, wo = jax.random.normal(jax.random.key(4), (3, 6, 5)), jax.random.normal(jax.random.key(5), (3, 5, 6))
    rows = jnp.arange(40, dtype=jnp.int32)
    def fused(x, w, wg, wo):
      return jnp.sum(jnp.sin(expert_ffn(x, rows, w, wg, wo, sizes, "silu")))
    def unfused(x, w, wg, wo):
      mm = lambda a, b: grouped_matmul(a, b, sizes, implementation="blocked")
      return jnp.sum(jnp.sin(mm(jax.nn.silu(mm(x, wg)) * mm(x, w), wo)))
    got, want = (jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3)))(x, w, wg, wo) for f in (fused, unfused))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    core = None
    if hasattr(ctypes.CDLL(library.path), "scipy_openblas_get_corename"):
      name = ctypes.CDLL(library.path).scipy_openblas_get_corename
      name.restype = ctypes.c_char_p
      core = name().decode()
    print(json.dumps({"library": library.name, "core": core}))
""")


def run_products(**env):
  done = subprocess.run([sys.executable, "-c", PRODUCTS], env={**os.environ, "JAX_PLATFORMS": "cpu", **env},
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  return json.loads(done.stdout.strip().splitlines()[-1])


@x86_linux
@compiler
@pytest.mark.parametrize("distribution,prefix", [("mkl", "libmkl_rt.so"), ("scipy-openblas32", "libscipy_openblas")])
def test_both_libraries_compute_the_kernels_products(distribution, prefix):
  """Each library the kernels may run on (named by GLAM_CBLAS_LIBRARY, as a user would) gives the
  products of numpy: the plain, batched, grouped and outer sgemm calls, empty groups included, and
  the fused expert FFN's values and gradients those of the portable grouped matmuls."""
  path = cblas._installed(distribution, prefix)
  assert path is not None, f"{distribution} is installed by `make install`"
  assert run_products(GLAM_CBLAS_LIBRARY=path)["library"] == "GLAM_CBLAS_LIBRARY"


@x86_linux
@compiler
def test_glams_openblas_ignores_a_system_wide_coretype():
  """This workplace's machines set OPENBLAS_CORETYPE=Haswell for everyone; glam's OpenBLAS detects
  the CPU instead (GLAM_OPENBLAS_CORETYPE overrides), and the caller's variable is left as it was."""
  env = dict(GLAM_OPENBLAS_CORETYPE="", OPENBLAS_CORETYPE="Prescott",  # Prescott: a pre-AVX core
             GLAM_CBLAS_LIBRARY=cblas._installed("scipy-openblas32", "libscipy_openblas"))
  detected = run_products(**env)["core"]
  assert detected != "Prescott"
  assert run_products(**dict(env, GLAM_OPENBLAS_CORETYPE="Haswell"))["core"] == "Haswell"

"""Test set-up: 8 simulated CPU devices, set before JAX is imported anywhere."""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# Many tests compile the same tiny programs (the same model's train step in several runs, the CLI in
# subprocesses), and on 2 cores compiling is most of the suite's time. JAX's persistent compilation
# cache lets each compile once per suite run: a fresh directory per run (nothing carries over from
# an earlier checkout), inherited by the subprocesses the tests start. No size limit: with one, JAX
# scans the whole directory on every write and the suite got 35% slower. (Without a limit nothing
# locks the entries; an entry read while another process writes it fails to decompress, and JAX
# then warns and compiles.) GLAM_TEST_JAX_CACHE=0 turns the cache off.
if os.environ.get("GLAM_TEST_JAX_CACHE", "1") != "0" and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import atexit
  import shutil
  import tempfile

  _cache_dir = tempfile.mkdtemp(prefix="glam-tests-jax-cache-")
  atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import pytest  # noqa: E402  (after the environment is set)


@pytest.fixture(autouse=True)
def clean_gin_config():
  """Gin is global state: no test sees another test's bindings."""
  import gin
  gin.clear_config()
  yield
  gin.clear_config()


@pytest.fixture
def matmul_backend():
  """bind(backend) sets matmul.backend ("auto", "xla" or "cblas": which matmuls and grouped matmuls
  run on glam's CBLAS kernels) on a fresh gin config."""
  import gin

  def bind(backend):
    gin.clear_config()
    gin.bind_parameter("matmul.backend", backend)
  yield bind
  gin.clear_config()

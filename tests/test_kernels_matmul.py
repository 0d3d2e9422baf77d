"""The sgemm custom call: products, gradients, a whole model's, and the backend rules (which library: test_kernels_library.py)."""
import json
import platform
import shutil
import sys

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from glam import config
from glam.kernels import cblas
from glam.kernels.matmul import gemm, matmul, resolve_backend

# The kernel is built with the system's C++ compiler (not a pip package). OpenBLAS (a dependency) and
# the `mkl` wheel come with `make install` on x86-64 Linux, so there a missing library fails here
# rather than skipping.
pytestmark = [
    pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler to build the kernel"),
    pytest.mark.skipif(platform.machine() != "x86_64" or sys.platform != "linux", reason="no mkl wheel here"),
]


def random(shape, seed):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def test_the_kernel_loads():
  assert cblas.load() is None


@pytest.mark.parametrize("transpose_a", [False, True])
@pytest.mark.parametrize("transpose_b", [False, True])
@pytest.mark.parametrize("batch", [None, 3])
def test_every_transposition_matches_numpy(transpose_a, transpose_b, batch):
  m, k, n = 5, 7, 4
  lead = () if batch is None else (batch,)
  a = random(lead + ((k, m) if transpose_a else (m, k)), 0)
  b = random(lead + ((n, k) if transpose_b else (k, n)), 1)
  got = jax.jit(lambda a, b: gemm(a, b, transpose_a=transpose_a, transpose_b=transpose_b, backend="cblas"))(a, b)
  op_a = np.swapaxes(np.asarray(a), -1, -2) if transpose_a else np.asarray(a)
  op_b = np.swapaxes(np.asarray(b), -1, -2) if transpose_b else np.asarray(b)
  assert got.shape == lead + (m, n)
  np.testing.assert_allclose(got, op_a @ op_b, rtol=1e-5, atol=1e-5)


def test_matrices_past_cblas_int32_sizes_stay_on_xla():
  """The kernel passes sizes and strides as 32-bit ints: a [70000, 40000] product (2.8e9 elements)
  must become XLA's dot, not a custom call whose strides overflow. Traced only, never allocated."""
  def primitives(a_shape, b_shape):
    spec = lambda shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    jaxpr = jax.make_jaxpr(lambda a, b: gemm(a, b, backend="cblas"))(spec(a_shape), spec(b_shape))
    return {str(eqn.primitive) for eqn in jaxpr.eqns}
  assert "ffi_call" in primitives((700, 40), (40, 400))
  huge = primitives((70000, 40), (40, 40000))
  assert "ffi_call" not in huge and "dot_general" in huge


def test_mismatched_shapes_are_refused_with_both_shapes():
  with pytest.raises(ValueError, match=r"\(5, 7\) and \(6, 4\)"):
    gemm(random((5, 7), 0), random((6, 4), 1), backend="cblas")


@pytest.mark.parametrize("transpose_b", [False, True])
@pytest.mark.parametrize("shapes", [((6, 5), (5, 3)), ((2, 6, 5), (2, 5, 3))])
def test_gradients_match_xla(transpose_b, shapes):
  a, b = random(shapes[0], 2), random(shapes[1], 3)
  if transpose_b:
    b = jnp.swapaxes(b, -1, -2)

  def loss(a, b):
    return jnp.sum(jnp.sin(matmul(a, b, transpose_b=transpose_b)))

  results = {}
  for backend in ("xla", "cblas"):
    gin.clear_config()
    gin.bind_parameter("matmul.backend", backend)
    results[backend] = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(a, b)
  (v_xla, g_xla), (v_cblas, g_cblas) = results["xla"], results["cblas"]
  np.testing.assert_allclose(v_cblas, v_xla, rtol=1e-5)
  for got, want in zip(g_cblas, g_xla):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_backend_rules():
  # The tests run on 8 simulated devices: "auto" keeps XLA's dots, which GSPMD can partition.
  assert jax.device_count() == 8 and resolve_backend(jnp.float32) == "xla"
  assert resolve_backend(jnp.float32, backend="cblas") == "cblas"
  assert resolve_backend(jnp.bfloat16, backend="cblas") == "xla"  # the kernel is float32 only
  with pytest.raises(ValueError, match=r"matmul.backend='mkl': expected one of \['auto', 'xla', 'cblas'\]"):
    resolve_backend(jnp.float32, backend="mkl")


def test_the_build_is_cached_and_a_failed_compile_says_why(tmp_path, monkeypatch):
  """The caching and the error of cblas.build(), on a one-line source (the kernel itself is built by
  every other test here, into the default cache)."""
  cache = tmp_path / "cache"
  monkeypatch.setenv("GLAM_KERNEL_CACHE", str(cache))
  tiny = tmp_path / "tiny.cc"
  tiny.write_text('extern "C" int glam_tiny() { return 1; }\n')
  monkeypatch.setattr(cblas, "SOURCES", [tiny])
  built = cblas.build()
  assert built.parent == cache and built.exists()
  stamp = built.stat().st_mtime_ns
  assert cblas.build() == built and built.stat().st_mtime_ns == stamp  # not rebuilt
  broken = tmp_path / "broken.cc"
  broken.write_text("this is not C++\n")
  monkeypatch.setattr(cblas, "SOURCES", [tiny, broken])
  with pytest.raises(RuntimeError, match=r"compiling tiny.cc broken.cc failed"):
    cblas.build()
  assert list(cache.iterdir()) == [built]  # nothing half-written left behind


MOE_LM = ["DecoderLM.vocab_size = 64", "DecoderLM.d_model = 16", "DecoderLM.num_blocks = 2",
          "DecoderLM.block = ('attn', 'moe')", "DecoderLM.tie_embeddings = False",
          "Attention.num_heads = 2", "Attention.head_dim = 8",
          "MoeLayer.num_experts = 4", "MoeLayer.d_ff = 32", "MoeLayer.activation = 'swiglu'",
          "MoeLayer.router = @TokenChoiceRouter", "TokenChoiceRouter.k = 2"]


@pytest.mark.parametrize("dispatcher", [["MoeLayer.dispatcher = @Dropless()"],
                                        ["MoeLayer.dispatcher = @Dropless()", "Dropless.implementation = 'padded'"],
                                        ["MoeLayer.dispatcher = @CapacityEinsum()"],
                                        ["MoeLayer.dispatcher = @CapacityEinsum()", "MoeLayer.router = @ExpertChoiceRouter",
                                         "ExpertChoiceRouter.capacity_factor = 2.0"]],
                         ids=["sorted", "padded", "capacity", "expert_choice"])
def test_a_moe_model_trains_the_same_on_either_backend(dispatcher):
  """Logits (untied), attention projections, the grouped experts (Dropless, CapacityEinsum and
  expert choice on the fused kernel) and the padded experts' hand-written backward all run on the kernel: the loss and
  every parameter's gradient match XLA's dots."""
  from glam.models.lm import DecoderLM
  ids = jax.random.randint(jax.random.key(0), (2, 16), 0, 64)
  results = {}
  for backend in ("xla", "cblas"):
    config.parse([], MOE_LM + dispatcher + [f"matmul.backend = '{backend}'"])
    model = DecoderLM(rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(params):
      out = nnx.merge(graphdef, params)(ids)
      return jnp.mean(jax.nn.logsumexp(out.logits, -1)) + out.aux_loss

    results[backend] = jax.jit(jax.value_and_grad(loss))(params)
  (v_xla, g_xla), (v_cblas, g_cblas) = results["xla"], results["cblas"]
  np.testing.assert_allclose(v_cblas, v_xla, rtol=1e-5)
  flat_xla, flat_cblas = jax.tree.leaves(g_xla), jax.tree.leaves(g_cblas)
  assert len(flat_xla) == len(flat_cblas) > 10
  for got, want in zip(flat_cblas, flat_xla):
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)


def test_glam_train_on_one_cpu_device_multiplies_on_the_kernel_and_learns_the_same(tmp_path):
  """`glam train` on one CPU device (as users run it; cli_helpers clears the 8-device flag) picks
  the kernel by default, says so, and follows the run on XLA's dots step for step."""
  from cli_helpers import TINY_RUN, glam
  losses, notes = {}, {}
  for name, extra in (("auto", []), ("xla", ["--gin.matmul.backend='xla'"])):
    run = glam("train", *TINY_RUN, "--gin.train.num_steps=6", "--gin.train.log_every=2",
               "--gin.DecoderLM.tie_embeddings=False", *extra, f"--model_dir={tmp_path / name}")
    notes[name] = [line for line in run.stderr.splitlines() if "float32 matmuls on" in line]
    with open(tmp_path / name / "metrics.jsonl") as f:
      losses[name] = [row["loss"] for row in map(json.loads, f) if "loss" in row and "eval" not in json.dumps(row)]
  assert len(notes["auto"]) == 1 and "sgemm custom call" in notes["auto"][0]
  assert len(notes["xla"]) == 1 and "XLA's own dots" in notes["xla"][0]
  assert len(losses["auto"]) == len(losses["xla"]) >= 3
  np.testing.assert_allclose(losses["auto"], losses["xla"], rtol=1e-4)


def test_a_second_run_takes_its_programs_from_the_compilation_cache(tmp_path, monkeypatch):
  """JAX's persistent compilation cache (README, "Compilation cache") with the kernel's custom
  calls in the programs: a second identical `glam train` of a dropless MoE model compiles nothing
  new (every program's cache key is stable), runs the cached executables (whose custom-call
  targets the second process registers while tracing), and follows the first run's losses."""
  from cli_helpers import TINY_RUN, glam
  cache = tmp_path / "jax-cache"
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(cache))
  monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
  moe = ["--gin_file=configs/models/glam_tiny.gin", "--gin.MoeLayer.dispatcher=@Dropless()",
         "--gin.MoeLayer.d_ff=64", "--gin.MoeLayer.num_experts=4"]
  losses, entries = [], []
  for run in ("first", "second"):
    glam("train", *TINY_RUN, *moe, "--gin.train.num_steps=4", f"--model_dir={tmp_path / run}")
    entries.append(sorted((path.name, path.stat().st_mtime_ns) for path in cache.iterdir()))
    with open(tmp_path / run / "metrics.jsonl") as f:
      losses.append([row["loss"] for row in map(json.loads, f) if "loss" in row and "eval" not in json.dumps(row)])
  assert len(entries[0]) >= 2  # the train step and more were cached by the first run
  assert entries[1] == entries[0]  # ... and the second found them all: no new key, nothing rewritten
  assert len(losses[0]) >= 3
  np.testing.assert_allclose(losses[1], losses[0], rtol=1e-6)

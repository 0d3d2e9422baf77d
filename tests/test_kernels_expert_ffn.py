"""The experts' fused FFN kernel (glam/kernels/expert_ffn.py): values and gradients against the
grouped matmuls with XLA's activations between them, and who runs on it."""
import platform
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from glam.kernels.expert_ffn import expert_ffn, supported
from glam.layers.context import LayerContext
from glam.layers.feedforward import GATED, apply_activation
from glam.moe.experts import Experts
from glam.moe.grouped_matmul import grouped_matmul

pytestmark = [
    pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler to build the kernel"),
    pytest.mark.skipif(platform.machine() != "x86_64" or sys.platform != "linux", reason="no BLAS wheel here"),
]

T, N, D, F, E = 40, 70, 8, 12, 4
SIZES = jnp.array([20, 0, 31, 9], jnp.int32)  # an empty expert, and 10 rows after the last one
# Each row's token: most tokens feed two rows (top-2), some none; -1 and T are out of range (zero rows).
ROW_TOKEN = jnp.asarray(np.random.default_rng(0).integers(0, T, N).astype(np.int32)).at[3].set(-1).at[40].set(T)


def random(shape, seed, scale=1.0):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32) * scale


def reference(activation, x, wi, wi_gate, wo, sizes, row_token=None):
  """The unfused path: a gather, three grouped matmuls (the portable blocked ones), jax.nn's activation."""
  if row_token is not None:  # jnp.take counts negative indices from the end: the kernel gives zeros
    x = jnp.take(x, jnp.where(row_token < 0, x.shape[0], row_token), axis=0, mode="fill", fill_value=0)
  hidden = grouped_matmul(x, wi, sizes, implementation="blocked")
  gate = grouped_matmul(x, wi_gate, sizes, implementation="blocked") if wi_gate is not None else None
  return grouped_matmul(apply_activation(activation, hidden, gate), wo, sizes, implementation="blocked")


def value_and_grads(fn, x, wi, wi_gate, wo):
  def loss(x, wi, wi_gate, wo):
    return jnp.sum(jnp.sin(fn(x, wi, wi_gate, wo)))  # sin: every output element gets its own gradient
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))(x, wi, wi_gate, wo)


@pytest.mark.parametrize("activation", ["swiglu", "geglu", "reglu", "gelu", "relu", "silu"])
def test_values_and_gradients_match_the_unfused_experts(activation):
  """Rows gathered from tokens (a token feeding several rows, out-of-range tokens giving zero rows):
  the values, and the gradients of tokens (summed over their rows) and weights."""
  x, wo = random((T, D), 0), random((E, F, D), 3, 0.5)
  wi = random((E, D, F), 1, 0.5)
  wi_gate = random((E, D, F), 2, 0.5) if activation in GATED else None
  base = GATED.get(activation, activation)
  fused = lambda x, wi, wi_gate, wo: expert_ffn(x, ROW_TOKEN, wi, wi_gate, wo, SIZES, base)
  value, grads = value_and_grads(fused, x, wi, wi_gate, wo)
  want_value, want_grads = value_and_grads(lambda *w: reference(activation, *w, SIZES, ROW_TOKEN), x, wi, wi_gate, wo)
  np.testing.assert_allclose(value, want_value, rtol=1e-5)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):  # sums of up to 31 rows of ~10
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  y = np.asarray(jax.jit(fused)(x, wi, wi_gate, wo))
  assert np.all(y[60:] == 0)  # rows after the last expert
  assert np.all(np.asarray(grads[1])[1] == 0) and np.all(np.asarray(grads[3])[1] == 0)  # the empty expert
  unused = np.setdiff1d(np.arange(T), np.asarray(ROW_TOKEN)[:60])
  assert len(unused) and np.all(np.asarray(grads[0])[unused] == 0)  # tokens no counted row reads


def test_activations_far_from_zero_saturate_as_jax_does():
  """The kernel's own exp: large, tiny and negative pre-activations give jax.nn's values (no
  overflow to inf or NaN where the sigmoid saturates)."""
  x = jnp.array([[1.0], [-1.0], [0.0], [1e-3]], jnp.float32)
  wi = jnp.array([[[120.0, 40.0, 3.0, -0.5, 1e-4, -60.0, -95.0, 88.0]]], jnp.float32)  # [1, 1, 8]
  wo = jnp.ones((1, 8, 1), jnp.float32)  # y sums the 8 hidden units
  sizes, row_token = jnp.array([4], jnp.int32), jnp.arange(4, dtype=jnp.int32)
  for activation in ("gelu", "silu"):
    got = jax.jit(lambda x: expert_ffn(x, row_token, wi, None, wo, sizes, activation))(x)
    want = reference(activation, x, wi, None, wo, sizes)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_repeated_calls_of_other_shapes_reuse_the_scratch_buffers_correctly():
  """The kernel keeps its temporaries between calls: a large call, a small one, and the large one
  again must each give their own values and input gradients (numpy's for the small one)."""
  results = []
  for rows, d_ff in ((200, 64), (9, 4), (200, 64)):
    x, wi, wo = random((rows, D), rows), random((2, D, d_ff), rows + 1, 0.3), random((2, d_ff, D), rows + 2, 0.3)
    sizes, row_token = jnp.array([rows // 2, rows - rows // 2], jnp.int32), jnp.arange(rows, dtype=jnp.int32)
    results.append(jax.jit(jax.value_and_grad(
        lambda x: jnp.sum(expert_ffn(x, row_token, wi, None, wo, sizes, "relu") ** 2)))(x))
  (big, d_big), (small, d_small), (again, d_again) = results
  assert big == again and np.array_equal(d_big, d_again)
  x, wi, wo = (np.asarray(a) for a in (random((9, D), 9), random((2, D, 4), 10, 0.3), random((2, 4, D), 11, 0.3)))
  y = np.concatenate([np.maximum(x[:4] @ wi[0], 0) @ wo[0], np.maximum(x[4:] @ wi[1], 0) @ wo[1]])
  np.testing.assert_allclose(small, np.sum(y ** 2), rtol=1e-5)
  assert np.any(np.asarray(d_small) != 0)


def test_what_the_kernel_refuses():
  x, wi, wo = random((T, D), 0), random((E, D, F), 1), random((E, F, D), 3)
  assert supported("gelu", x, wi, None, wo, rows=N)
  assert not supported("geglu", x, wi, None, wo)  # the kernel takes the base activation and a gate
  assert not supported("gelu", x.astype(jnp.bfloat16), wi, None, wo)
  assert not supported("gelu", x, wi, None, wo, rows=0)
  assert not supported("gelu", x, wi, None, wo, rows=2 ** 31 // F + 1)  # [rows, d_ff] past int32
  with pytest.raises(ValueError, match=r"wo \(4, 8, 12\)"):
    expert_ffn(x, ROW_TOKEN, wi, None, jnp.swapaxes(wo, 1, 2), SIZES, "gelu")
  with pytest.raises(ValueError, match="expected one of"):
    expert_ffn(x, ROW_TOKEN, wi, None, wo, SIZES, "swiglu")


def custom_call_targets(fn, *args) -> set:
  text = jax.jit(fn).lower(*args).as_text()
  return {t for t in ("glam_expert_ffn", "glam_cblas_grouped_gemm") if f'"{t}' in text or f"@{t}" in text}


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_experts_run_the_fused_kernel_unless_dropout_needs_the_hidden_units(matmul_backend, dropout):
  matmul_backend("cblas")  # what "auto" picks on one CPU device
  experts = Experts(D, E, d_ff=F, activation="swiglu", dropout_rate=dropout, rngs=nnx.Rngs(0))
  train = LayerContext(mask=None, query_positions=None, key_positions=None, deterministic=False,
                       rng=jax.random.key(0))
  rows = random((N, D), 0)
  targets = custom_call_targets(lambda rows: experts.grouped(rows, SIZES, train), rows)
  assert targets == ({"glam_cblas_grouped_gemm"} if dropout else {"glam_expert_ffn"})
  evaluation = LayerContext(mask=None, query_positions=None, key_positions=None, deterministic=True)
  assert custom_call_targets(lambda rows: experts.grouped(rows, SIZES, evaluation), rows) == {"glam_expert_ffn"}
  matmul_backend("xla")
  assert custom_call_targets(lambda rows: experts.grouped(rows, SIZES, train), rows) == set()

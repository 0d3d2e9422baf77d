"""Grouped matmul (blocked, ragged_dot) and the stacked expert FFNs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from glam.kernels import cblas
from glam.layers.context import LayerContext
from glam.moe.experts import Experts
from glam.moe.grouped_matmul import chunk_sizes, grouped_matmul

CTX = LayerContext(mask=None, query_positions=None, key_positions=None)


def reference_grouped_matmul(x, w, group_sizes):
  """Row by row: row i of group e is x[i] @ w[e]; rows after sum(group_sizes) are 0."""
  group_of_row = np.repeat(np.arange(len(group_sizes)), group_sizes)
  rows = []
  for i in range(x.shape[0]):
    rows.append(x[i] @ w[group_of_row[i]] if i < len(group_of_row) else jnp.zeros(w.shape[2], x.dtype))
  return jnp.stack(rows)


GROUPS = [  # (group sizes, block size, rows)
    ([0, 5, 0, 17, 3], 4, 25),     # empty groups, groups not a multiple of the block
    ([0, 0, 25, 0, 0], 8, 25),     # one group holds everything
    ([7, 9, 0, 0, 9], 256, 25),    # block larger than all rows
    ([3, 5, 0, 1, 2], 8, 25),      # rows past sum(group_sizes) belong to no group
    ([40, 33, 0, 1, 9], 32, 83),   # full blocks, tails of several sizes, the last one shifted back
    ([16, 0, 8, 1, 0], 8, 25),     # groups of whole blocks (no tail)
    ([0, 0, 0, 0, 0], 8, 6),       # nothing at all
]


@pytest.mark.parametrize("sizes,block,rows", GROUPS)
def test_grouped_matmul_matches_per_row_reference(sizes, block, rows):
  rng = np.random.default_rng(len(sizes) + block + rows)
  x = jnp.asarray(rng.normal(size=(rows, 6)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(5, 6, 7)), jnp.float32)
  cotangent = jnp.asarray(rng.normal(size=(rows, 7)), jnp.float32)
  group_sizes = jnp.asarray(sizes, jnp.int32)

  def loss(fn):
    return lambda x, w: jnp.sum(fn(x, w) * cotangent)

  want = reference_grouped_matmul(x, w, np.asarray(sizes))
  want_dx, want_dw = jax.grad(loss(lambda x, w: reference_grouped_matmul(x, w, np.asarray(sizes))), (0, 1))(x, w)
  # "cblas" (the oneMKL custom call) where the kernel builds and loads: tests/test_kernels_grouped.py
  for implementation in ("blocked", "ragged_dot") + (("cblas",) if cblas.load() is None else ()):
    fn = lambda x, w: grouped_matmul(x, w, group_sizes, implementation=implementation, block_size=block)
    np.testing.assert_allclose(jax.jit(fn)(x, w), want, atol=1e-5, err_msg=implementation)
    dx, dw = jax.jit(jax.grad(loss(fn), (0, 1)))(x, w)
    np.testing.assert_allclose(dx, want_dx, atol=1e-5, err_msg=implementation)
    np.testing.assert_allclose(dw, want_dw, atol=1e-5, err_msg=implementation)


def test_chunk_sizes_are_a_block_then_tail_sizes():
  assert chunk_sizes(4096, 256) == (256, 32, 64, 96, 128, 160, 192, 224, 256)
  assert chunk_sizes(20, 256) == (20, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20)  # the tail covers any remainder
  assert chunk_sizes(5, 256) == (5, 1, 2, 3, 4, 5)


def test_grouped_matmul_rejects_bad_arguments():
  x, w = jnp.zeros((4, 3)), jnp.zeros((2, 3, 5))
  with pytest.raises(ValueError, match="implementation='fast'"):
    grouped_matmul(x, w, jnp.array([2, 2]), implementation="fast")
  with pytest.raises(ValueError, match="group_sizes"):
    grouped_matmul(x, w, jnp.array([4]))


def expert_loop(experts: Experts, x):
  """Each expert's FFN written out on its own rows."""
  outs = []
  for e in range(experts.num_experts):
    hidden = x[e] @ experts.wi[...][e]
    if experts.activation == "swiglu":
      hidden = jax.nn.silu(x[e] @ experts.wi_gate[...][e]) * hidden
    else:
      hidden = jax.nn.gelu(hidden)
    outs.append(hidden @ experts.wo[...][e])
  return jnp.stack(outs)


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_experts_equal_a_loop_over_experts(activation):
  experts = Experts(8, 3, d_ff=16, activation=activation, rngs=nnx.Rngs(0))
  assert (experts.wi_gate is not None) == (activation == "swiglu")
  assert experts.wi.logical_axes == ("expert", "embed", "mlp")
  assert experts.wo.logical_axes == ("expert", "mlp", "embed")
  x = jax.random.normal(jax.random.key(1), (3, 5, 8))
  np.testing.assert_allclose(experts(x, CTX), expert_loop(experts, x), atol=1e-5)


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_grouped_experts_equal_the_batched_ones(activation):
  experts = Experts(8, 3, d_ff=16, activation=activation, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (3, 5, 8))
  want = experts(x, CTX).reshape(15, 8)
  got = experts.grouped(x.reshape(15, 8), jnp.array([5, 5, 5]), CTX, implementation="blocked", block_size=4)
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_expert_dropout_only_in_training():
  experts = Experts(8, 2, d_ff=16, dropout_rate=0.4, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 4, 8))
  train = LayerContext(mask=None, query_positions=None, key_positions=None, deterministic=False,
                       rng=jax.random.key(2))
  np.testing.assert_allclose(experts(x, CTX), expert_loop(experts, x), atol=1e-5)
  assert not np.allclose(experts(x, train), experts(x, CTX))


def test_active_parameter_count():
  experts = Experts(8, 4, d_ff=16, activation="swiglu", rngs=nnx.Rngs(0))
  total = 4 * 3 * 8 * 16
  assert experts.parameter_count() == total
  assert experts.active_parameter_count(2) == total // 2
  assert experts.active_parameter_count(1.0) == total // 4


def test_experts_name_the_binding_in_errors():
  with pytest.raises(ValueError, match="MoeLayer.activation='tanh'"):
    Experts(8, 2, activation="tanh", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="MoeLayer.d_ff=0"):
    Experts(8, 2, d_ff=0, rngs=nnx.Rngs(0))

"""ExpertParallel (shard_map + all-to-all) equals CapacityEinsum on every mesh, forward and
gradients, drops included (and Dropless with dropless=True, up to the worst-case routing); its
compiled HLO moves tokens with all-to-all; bad meshes are refused.

Tolerance: 1e-5 absolute plus 1e-5 relative on float32 (the psum over "tensor" and the per-device
sums change the summation order, nothing else; some gradients are of order 30).
"""
import functools

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from glam.config import ConfigError
from glam.layers.context import LayerContext
from glam.moe.dispatch import CapacityEinsum, Dropless
from glam.moe.expert_parallel import ExpertParallel
from glam.moe.layer import MoeLayer
from glam.moe.routers import ExpertChoiceRouter, TokenChoiceRouter

AXES = ("data", "fsdp", "expert", "tensor")
BATCH, LENGTH, D_MODEL, EXPERTS, D_FF, GROUP = 8, 16, 16, 8, 32, 16  # 8 groups: one per batch shard
ATOL, RTOL = 1e-5, 1e-5
MESHES = {"expert 8": (1, 1, 8, 1), "data 2 x expert 4": (2, 1, 4, 1), "fsdp 2 x expert 2 x tensor 2": (1, 2, 2, 2)}


def make_mesh(shape):
  return jax.make_mesh(shape, AXES, axis_types=(jax.sharding.AxisType.Auto,) * 4)


def context(batch, length, mask=None):
  positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
  return LayerContext(mask=None, query_positions=positions, key_positions=positions, deterministic=True,
                      token_mask=mask)


def build(dispatcher, router=TokenChoiceRouter, num_experts=EXPERTS):
  return MoeLayer(D_MODEL, num_experts=num_experts, d_ff=D_FF, group_size=GROUP, router=router,
                  dispatcher=dispatcher, rngs=nnx.Rngs(0))


def loss(model, x, mask):
  y, _, aux = model(x, context(*x.shape[:2], mask))
  total = jnp.sum(jnp.sin(y)) + sum(v for name, v in aux.items() if name.startswith("loss_"))
  return total, (y, aux)


@nnx.jit
def loss_and_grads(model, x, mask):
  (value, (y, aux)), (d_model, d_x) = nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(model, x, mask)
  return value, y, aux, nnx.state(d_model, nnx.Param), d_x


def run(dispatcher, shape=None, router=TokenChoiceRouter, x=None, mask=None):
  x = jax.random.normal(jax.random.key(1), (BATCH, LENGTH, D_MODEL)) * 2 if x is None else x
  model = build(dispatcher, router)
  if shape is None:
    return loss_and_grads(model, x, mask)
  with jax.set_mesh(make_mesh(shape)):
    return loss_and_grads(model, x, mask)


def assert_same(result, expected):
  value, y, aux, d_params, d_x = result
  np.testing.assert_allclose(value, expected[0], atol=ATOL * 10, rtol=1e-6)
  np.testing.assert_allclose(y, expected[1], atol=ATOL, rtol=RTOL)
  assert set(aux) == set(expected[2])
  for name in aux:
    np.testing.assert_allclose(aux[name], expected[2][name], atol=ATOL, rtol=RTOL, err_msg=name)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=ATOL, rtol=RTOL), d_params, expected[3])
  np.testing.assert_allclose(d_x, expected[4], atol=ATOL, rtol=RTOL)


# capacity_factor 1.0 with 16 tokens per group: capacity 4 per expert and group, so a few
# assignments drop; both dispatchers must drop the same ones.
@pytest.fixture(scope="module")
def reference():
  result = run(CapacityEinsum(capacity_factor=1.0, eval_capacity_factor=1.0, implementation="gather"))
  assert 0.0 < float(result[2]["dropped_fraction"]) < 0.5  # the test exercises drops
  return result


@pytest.mark.parametrize("mesh", list(MESHES))
def test_equals_capacity_einsum_on_mesh(reference, mesh):
  assert_same(run(ExpertParallel(capacity_factor=1.0, eval_capacity_factor=1.0), MESHES[mesh]), reference)


def test_equals_capacity_einsum_without_a_mesh(reference):
  assert_same(run(ExpertParallel(capacity_factor=1.0, eval_capacity_factor=1.0, implementation="gather")),
              reference)


@pytest.fixture(scope="module")
def dropless_reference():
  return run(Dropless(implementation="blocked"))


@pytest.mark.parametrize("mesh", ["data 2 x expert 4", "fsdp 2 x expert 2 x tensor 2"])
def test_dropless_equals_dropless_on_mesh(dropless_reference, mesh):
  result = run(ExpertParallel(dropless=True, grouped_implementation="blocked"), MESHES[mesh])
  assert_same(result, dropless_reference)
  assert float(result[2]["dropped_fraction"]) == 0.0


def test_dropless_worst_case_every_token_on_one_device():
  """A zero router kernel: uniform probabilities, top-2 = experts 0 and 1 for every token, so the
  devices holding them receive every assignment of every device: the buffers' upper bound."""
  def zero_router(*args, **kwargs):
    router = TokenChoiceRouter(*args, **kwargs)
    router.kernel[...] = jnp.zeros_like(router.kernel[...])
    return router

  expected = run(Dropless(implementation="blocked"), router=zero_router)
  np.testing.assert_allclose(expected[2]["expert_load"][:2], [0.5, 0.5])
  for mesh in ("expert 8", "data 2 x expert 4"):  # experts 0 and 1 on two devices, then on one
    assert_same(run(ExpertParallel(dropless=True, grouped_implementation="blocked"), MESHES[mesh],
                    router=zero_router), expected)


def test_groups_that_do_not_divide_the_shards_and_padding_tokens():
  """2 groups over 8 batch shards (empty groups are appended), with masked tokens."""
  x = jax.random.normal(jax.random.key(2), (2, 16, D_MODEL))
  mask = jnp.arange(16)[None, :] < jnp.array([[16], [11]])
  expected = run(CapacityEinsum(implementation="gather"), x=x, mask=mask)
  assert_same(run(ExpertParallel(), MESHES["expert 8"], x=x, mask=mask), expected)


def test_expert_choice_routing():
  router = functools.partial(ExpertChoiceRouter, capacity_factor=1.0)
  expected = run(CapacityEinsum(implementation="gather"), router=router)
  assert_same(run(ExpertParallel(), MESHES["data 2 x expert 4"], router=router), expected)


def test_compiled_forward_moves_tokens_with_all_to_all():
  model = build(ExpertParallel())
  x = jnp.ones((BATCH, LENGTH, D_MODEL))
  forward = nnx.jit(lambda m, x: m(x, context(BATCH, LENGTH))[0])
  with jax.set_mesh(make_mesh(MESHES["data 2 x expert 4"])):
    hlo = forward.lower(model, x).compile().as_text()
  assert hlo.count("all-to-all(") >= 2  # there and back


def test_experts_not_divisible_by_the_expert_axis():
  model = build(ExpertParallel(), num_experts=6)
  with jax.set_mesh(make_mesh((2, 1, 4, 1))), pytest.raises(ConfigError, match=r"num_experts=6.*expert axis of size 4"):
    jax.eval_shape(lambda x: model(x, context(BATCH, LENGTH))[0], jnp.ones((BATCH, LENGTH, D_MODEL)))


def test_gin_selects_the_dispatcher_and_checks_its_bindings():
  import glam.moe.expert_parallel  # noqa: F401  (registers the configurable)
  gin.parse_config(["MoeLayer.dispatcher = @ExpertParallel()", "ExpertParallel.capacity_factor = 2.0"])
  layer = MoeLayer(D_MODEL, num_experts=EXPERTS, d_ff=D_FF, rngs=nnx.Rngs(0))
  assert isinstance(layer.dispatcher, ExpertParallel) and layer.dispatcher.capacity_factor == 2.0
  with pytest.raises(ValueError, match="ExpertParallel.implementation='fast'"):
    ExpertParallel(implementation="fast")


def test_benchmark_counts_collectives_and_their_bytes():
  import importlib.util
  import pathlib
  path = pathlib.Path(__file__).resolve().parent.parent / "scripts" / "bench_expert_parallel_hlo.py"
  spec = importlib.util.spec_from_file_location("bench_expert_parallel_hlo", path)
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  hlo = "\n".join([
      "  %all-to-all = (f32[2,40,64]{2,1,0}, f32[2,40,64]{2,1,0}) all-to-all(%a, %b), channel_id=1",
      "  %all-gather = f32[64,16]{0,1} all-gather(%c), channel_id=2, replica_groups=[1,8]<=[8]",
      "  %all-reduce.6 = f32[2,64]{1,0} all-reduce(%d), channel_id=3, replica_groups={{0},{1},{2},{3}}",
      "  %ars = (bf16[8]{0}, bf16[8]{0}) all-reduce-start(%e), channel_id=4",
      "  %ard = bf16[8]{0} all-reduce-done(%ars)",
      "  %add = f32[2,64]{1,0} add(%x, %y)",
  ])
  found = bench.collectives(hlo)
  assert found["all-to-all"] == {"count": 1, "bytes": 2 * 2 * 40 * 64 * 4}
  assert found["all-gather"] == {"count": 1, "bytes": 64 * 16 * 4}
  assert found["all-reduce"] == {"count": 1, "bytes": 8 * 2}  # the one-device groups move nothing; -done is not counted

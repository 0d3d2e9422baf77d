"""The same model, batch and seed give the same loss and gradients on every mesh and dispatcher.

Meshes (8 simulated CPU devices): 1x1x1x1, data 8, expert 8, data 2 x expert 4, fsdp 2 x expert 2
x tensor 2. Dispatchers: CapacityEinsum (GSPMD expert parallelism through sharding constraints),
Dropless, and ExpertParallel (explicit all-to-all) when present. Tolerance: float32 reductions
split across devices change the summation order only, so losses agree to 1e-5 relative and
gradients to 1e-5 absolute (they are O(1e-2..1)).
"""
import importlib.util

import gin
import jax
import numpy as np
import pytest

from glam import config
from glam.models.lm import DecoderLM
from glam.models.summary import abstract_model
from glam.parallel.mesh import make_mesh
from glam.parallel.sharding import named, param_logical_axes, param_specs
from glam.parallel.axis_rules import axis_rules
from glam.parallel.train_state import global_batch, on_mesh, place_state
from glam.train.step import forward, token_losses
from glam.train.trainer import build_model

MESHES = ("single", "dp8", "ep8", "dp2_ep4", "fsdp2_ep2_tp2")
# The capacity path's CPU default (gather placement) and its one-hot einsum placement (the GPU/TPU
# default; with 4 groups on data 2 x expert 4 it needs glam/moe/layer.py's guard against an XLA bug).
EINSUM_PLACEMENT = "@CapacityEinsum()\nCapacityEinsum.implementation = 'einsum'"
DISPATCHERS = ["@CapacityEinsum()", EINSUM_PLACEMENT, "@Dropless()"]
if importlib.util.find_spec("glam.moe.expert_parallel") is not None:
  DISPATCHERS.append("@ExpertParallel()")

# A tiny GLaM: one block of (attention, MoE), 8 experts, groups of 16 tokens (4 groups per batch).
TINY_MOE = [
    "DecoderLM.d_model = 16", "DecoderLM.num_blocks = 1", "DecoderLM.vocab_size = 64",
    "DecoderLM.block = ('attn', 'moe')", "Attention.num_heads = 2", "Attention.head_dim = 8",
    "MoeLayer.num_experts = 8", "MoeLayer.d_ff = 32", "MoeLayer.group_size = 16",
    "TokenChoiceRouter.k = 2", "CapacityEinsum.capacity_factor = 4.0",  # capacity = group: no drops
]
BATCH, LENGTH = 8, 8


def tiny_batch(seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  inputs = rng.integers(1, 64, (BATCH, LENGTH)).astype(np.int32)
  return {"inputs": inputs, "targets": np.roll(inputs, -1, axis=1),
          "segment_ids": np.ones((BATCH, LENGTH), np.int32),
          "positions": np.broadcast_to(np.arange(LENGTH, dtype=np.int32), (BATCH, LENGTH)).copy(),
          "loss_weights": np.ones((BATCH, LENGTH), np.float32)}


def parse(mesh: str, dispatcher: str = "@CapacityEinsum()", extra=()) -> None:
  config.parse(["configs/models/dense_tiny.gin", f"configs/mesh/{mesh}.gin"],
               TINY_MOE + [f"MoeLayer.dispatcher = {dispatcher}", *extra])


def loss_and_grads(mesh_name: str):
  """{dispatcher: (loss, grads as host numpy)} and the placed params of the tiny model on one mesh.

  One jit computes every dispatcher's loss and gradients (one compile per mesh, not per pair).
  """
  graphdefs = {}
  for dispatcher in DISPATCHERS:
    parse(mesh_name, dispatcher)
    graphdefs[dispatcher], params = build_model(DecoderLM, seed=0)  # same seed: same params
  mesh = make_mesh()
  specs = param_specs(params, param_logical_axes(abstract_model(DecoderLM)), mesh, axis_rules())
  params = place_state(params, named(specs, mesh))
  batch = global_batch(tiny_batch(), mesh)

  def loss_fn(p, b, graphdef):
    out = forward(graphdef, p, b, deterministic=False, rng=jax.random.key(1))
    nll, _, _ = token_losses(out.logits, b["targets"])
    return jax.numpy.mean(nll) + out.aux_loss

  def all_dispatchers(p, b):
    return {d: jax.value_and_grad(loss_fn)(p, b, g) for d, g in graphdefs.items()}

  out = jax.device_get(on_mesh(mesh, jax.jit(all_dispatchers))(params, batch))
  return {d: (float(loss), grads) for d, (loss, grads) in out.items()}, params


@pytest.fixture(scope="module")
def results():
  out = {}
  for mesh in MESHES:
    per_dispatcher, params = loss_and_grads(mesh)
    for dispatcher, (loss, grads) in per_dispatcher.items():
      out[mesh, dispatcher] = (loss, grads, params)
    gin.clear_config()
  return out


@pytest.mark.parametrize("dispatcher", DISPATCHERS)
@pytest.mark.parametrize("mesh", MESHES[1:])
def test_same_loss_and_gradients_on_every_mesh(results, mesh, dispatcher):
  ref_loss, ref_grads, _ = results["single", dispatcher]
  loss, grads, _ = results[mesh, dispatcher]
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  flat_ref = jax.tree_util.tree_flatten_with_path(ref_grads)[0]
  for (path, ref), got in zip(flat_ref, jax.tree.leaves(grads)):
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-4, err_msg=jax.tree_util.keystr(path))


def test_dispatchers_agree_when_nothing_drops(results):
  # capacity factor 4.0 with top-2 over 8 experts gives every expert a whole group: nothing drops, so
  # capacity and dropless dispatch compute the same function (a check the mesh tests rely on:
  # they compare like with like, not a degenerate model).
  losses = {d: results["single", d][0] for d in DISPATCHERS}
  assert np.isfinite(list(losses.values())).all()
  np.testing.assert_allclose(losses["@Dropless()"], losses["@CapacityEinsum()"], rtol=1e-5)
  np.testing.assert_allclose(losses[EINSUM_PLACEMENT], losses["@CapacityEinsum()"], rtol=1e-5)


def test_expert_weights_are_really_sharded(results):
  # Expert parallel over 8 devices: each device holds 1/8 of every expert weight.
  _, _, params = results["ep8", "@CapacityEinsum()"]
  experts = params["blocks"]["moe_1"]["experts"]
  total = sum(w.nbytes for w in experts.values())
  per_device = sum(w.addressable_shards[0].data.nbytes for w in experts.values())
  assert per_device * 8 == total, (per_device, total)
  for w in experts.values():
    assert {s.data.shape[1] for s in w.addressable_shards} == {1}  # [layers, 1 expert, d, f] each
  # the dense attention weights are replicated on this mesh
  query = params["blocks"]["attn_0"]["query"]
  assert query.addressable_shards[0].data.nbytes == query.nbytes

"""Unrolled blocks train with one array per layer; checkpoints and results stay those of the stacked layout."""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from glam import config as glam_config
from glam.models import lm
from glam.models.lm import DecoderLM
from glam.models.per_layer import is_per_layer
from glam.models.summary import abstract_model
from glam.parallel.mesh import make_mesh
from glam.parallel.train_state import on_mesh, place_state, train_state_shardings
from glam.train.freezing import FreezeSpec, freeze_updates
from glam.train.layer_layout import per_layer_layout
from glam.train.optimizers import adafactor, adamw, make_optimizer
from glam.train.step import make_train_step

MODEL = ["configs/models/glam_tiny.gin"]
TINY = ["DecoderLM.d_model = 16", "DecoderLM.vocab_size = 64", "Attention.num_heads = 2", "Attention.head_dim = 8",
        "FeedForward.d_ff = 32", "MoeLayer.num_experts = 4", "MoeLayer.d_ff = 32", "DecoderLM.num_blocks = 3",
        "DecoderLM.block = ('attn', 'moe')"]
OPTIMIZERS = {
    # factored second moments (and their shared placeholders), update clipping, parameter scale
    "adafactor": functools.partial(adafactor, learning_rate=1e-2, min_dim_size_to_factor=8,
                                   multiply_by_parameter_scale=True),
    "adamw": functools.partial(adamw, learning_rate=1e-2),
}


def build(scan_layers: bool):
  glam_config.parse(MODEL, TINY + [f"DecoderLM.scan_layers = {scan_layers}"])
  return build_parsed()


def build_parsed():
  model = DecoderLM(rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  return graphdef, nnx.to_pure_dict(state), abstract_model(DecoderLM)


def batch(seed: int) -> dict:
  tokens = np.random.default_rng(seed).integers(1, 64, (2, 16)).astype(np.int32)
  ones = np.ones_like(tokens)
  return {"inputs": tokens, "targets": np.roll(tokens, -1, 1), "loss_weights": ones.astype(np.float32),
          "segment_ids": ones, "positions": np.broadcast_to(np.arange(16, dtype=np.int32), tokens.shape)}


def copy(tree):
  return jax.tree.map(jnp.array, tree)


@pytest.fixture(scope="module")
def unrolled():
  return build(scan_layers=False)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_state_splits_by_layer_and_stacks_back_exactly(unrolled, name):
  _, params, model = unrolled
  optimizer = make_optimizer(OPTIMIZERS[name])
  state = {"step": jnp.int32(0), "params": params, "opt_state": optimizer.init(params)}
  state = jax.tree.map(lambda x: x + 0.5 if jnp.issubdtype(x.dtype, jnp.floating) else x, state)  # not all zeros
  layout = per_layer_layout(model, optimizer, state)
  split = layout.to_per_layer(copy(state))
  wi = split["params"]["blocks"]["moe_1"]["experts"]["wi"]
  assert is_per_layer(wi) and len(wi.slices) == 3 and wi.slices[0].shape == (4, 16, 32)
  np.testing.assert_array_equal(wi.slices[2], state["params"]["blocks"]["moe_1"]["experts"]["wi"][2])
  per_layer_leaves = [x for x in jax.tree.leaves(split["opt_state"], is_leaf=is_per_layer) if is_per_layer(x)]
  assert per_layer_leaves, "the optimizer state that mirrors the blocks is per layer too"
  back = layout.to_stacked(split)
  assert jax.tree.structure(back) == jax.tree.structure(state)
  jax.tree.map(np.testing.assert_array_equal, back, state)


def test_scanned_blocks_keep_the_stacked_layout():
  _, params, model = build(scan_layers=True)
  optimizer = make_optimizer(OPTIMIZERS["adamw"])
  assert per_layer_layout(model, optimizer, {"step": 0, "params": params, "opt_state": optimizer.init(params)}) is None


def test_training_per_layer_equals_training_stacked(unrolled):
  """Adafactor (glam's default) sees each layer's arrays as one block, as the stacked array is;
  gradient accumulation and freezing work on per-layer arrays too."""
  graphdef, params, model = unrolled
  optimizer = freeze_updates(make_optimizer(OPTIMIZERS["adafactor"]), model, FreezeSpec((), first_experts=1))
  state = {"step": jnp.int32(0), "params": params, "opt_state": optimizer.init(params)}
  layout = per_layer_layout(model, optimizer, state)
  step = jax.jit(make_train_step(graphdef, optimizer, grad_accum_steps=2))  # accumulation carries PerLayer nodes
  stacked, split = copy(state), layout.to_per_layer(copy(state))
  for seed in range(2):
    stacked, stacked_metrics = step(stacked, batch(seed))
    split, split_metrics = step(split, batch(seed))
    np.testing.assert_allclose(split_metrics["loss"], stacked_metrics["loss"], rtol=1e-5)
  split = layout.to_stacked(split)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=2e-5, atol=1e-6), split, stacked)
  wi = split["params"]["blocks"]["moe_1"]["experts"]["wi"]
  np.testing.assert_array_equal(wi[:, 0], params["blocks"]["moe_1"]["experts"]["wi"][:, 0])  # expert 0 frozen
  assert not np.array_equal(wi[:, 1], params["blocks"]["moe_1"]["experts"]["wi"][:, 1])


def copied_block_parameters(graphdef, optimizer, state) -> list[str]:
  step = jax.jit(make_train_step(graphdef, optimizer), donate_argnums=0)
  entry = step.lower(state, batch(0)).compile().as_text().split("\nENTRY")[1]
  return re.findall(r"copy\(%state__params____blocks____(\w+)", entry)


def test_donated_per_layer_weights_are_updated_in_place(unrolled, monkeypatch):
  """Each weight's update waits for the backward's last read of it (after_input_gradient), so XLA
  need not copy the donated weights on entry; without that it copies them."""
  graphdef, params, model = unrolled
  # Without skipping: skip_nonfinite_updates makes every update wait for every gradient anyway.
  optimizer = make_optimizer(OPTIMIZERS["adamw"], skip_nonfinite=False)
  state = {"step": jnp.int32(0), "params": params, "opt_state": optimizer.init(params)}
  split = per_layer_layout(model, optimizer, state).to_per_layer(copy(state))
  weights = lambda names: [n for n in names if re.search(r"experts____w|attn_0____(query|key|value|out)", n)]
  assert weights(copied_block_parameters(graphdef, optimizer, split)) == []
  monkeypatch.setattr(lm, "after_input_gradient", lambda x, layer_params: (x, layer_params))
  assert weights(copied_block_parameters(graphdef, optimizer, split))  # the check sees copies


def test_per_layer_arrays_keep_their_stacked_sharding_on_a_mesh():
  glam_config.parse(MODEL + ["configs/mesh/dp2_ep4.gin"], TINY + ["DecoderLM.scan_layers = False"])
  _, params, model = build_parsed()
  optimizer = make_optimizer(OPTIMIZERS["adamw"])
  state = {"step": jnp.int32(0), "params": params, "opt_state": optimizer.init(params)}
  mesh = make_mesh()
  shardings = train_state_shardings(state, model, mesh)
  layout = per_layer_layout(model, optimizer, place_state(state, shardings), shardings)
  split = on_mesh(mesh, layout.to_per_layer)(place_state(state, shardings))
  stacked_wi = shardings["params"]["blocks"]["moe_1"]["experts"]["wi"]
  assert stacked_wi.spec[1] == "expert"  # experts over the expert axis, stacked behind the layers
  for part in split["params"]["blocks"]["moe_1"]["experts"]["wi"].slices:
    assert part.sharding.is_equivalent_to(NamedSharding(mesh, PartitionSpec(*stacked_wi.spec[1:])), part.ndim)
  back = on_mesh(mesh, layout.to_stacked)(split)
  assert back["params"]["blocks"]["moe_1"]["experts"]["wi"].sharding.is_equivalent_to(stacked_wi, 4)
  jax.tree.map(np.testing.assert_array_equal, back, state)

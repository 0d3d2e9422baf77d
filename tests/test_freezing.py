"""freeze.patterns / freeze.first_experts: frozen parameters (and expert slices) stay bit-identical
under the optimizer; everything else moves; bad patterns fail naming the binding."""
import gin
import jax
import numpy as np
import optax
import pytest

from glam import config
from glam.config import ConfigError
from glam.models.lm import DecoderLM
from glam.models.summary import abstract_model
from glam.train.freezing import freeze, freeze_updates
from glam.train.optimizers import adamw, make_optimizer
from glam.train.trainer import build_model

TINY_MOE = ["DecoderLM.d_model=16", "DecoderLM.num_blocks=1", "DecoderLM.vocab_size=64", "Attention.num_heads=2",
            "Attention.head_dim=8", "FeedForward.d_ff=16", "MoeLayer.d_ff=16", "MoeLayer.num_experts=4",
            "make_optimizer.optimizer=@adamw", "adamw.learning_rate=0.1", "adamw.weight_decay=0.1"]


def train_steps(bindings, steps=2):
  config.parse(["configs/models/glam_tiny.gin"], TINY_MOE + bindings)
  with gin.unlock_config():
    _, params = build_model(DecoderLM, 0)
    model = abstract_model(DecoderLM)
    optimizer = freeze_updates(make_optimizer(), model)

  state = optimizer.init(params)
  new = params
  for step in range(steps):
    keys = iter(jax.random.split(jax.random.key(step), 100))
    grads = jax.tree.map(lambda p: jax.random.normal(next(keys), p.shape, p.dtype), new)
    updates, state = optimizer.update(grads, state, new)
    new = optax.apply_updates(new, updates)
  return params, new


def test_patterns_freeze_whole_parameters_bit_identically():
  before, after = train_steps(["freeze.patterns=['blocks/moe_1/router/.*', 'embed/.*']"])
  np.testing.assert_array_equal(after["blocks"]["moe_1"]["router"]["kernel"], before["blocks"]["moe_1"]["router"]["kernel"])
  np.testing.assert_array_equal(after["embed"]["embedding"], before["embed"]["embedding"])
  assert not np.array_equal(after["blocks"]["moe_1"]["experts"]["wi"], before["blocks"]["moe_1"]["experts"]["wi"])
  assert not np.array_equal(after["logits_kernel"], before["logits_kernel"])


def test_first_experts_freezes_old_experts_and_router_columns_only():
  before, after = train_steps(["freeze.first_experts=3"])
  moe_b, moe_a = before["blocks"]["moe_1"], after["blocks"]["moe_1"]
  for name in ("wi", "wo"):
    np.testing.assert_array_equal(moe_a["experts"][name][:, :3], moe_b["experts"][name][:, :3])
    assert not np.any(moe_a["experts"][name][:, 3] == moe_b["experts"][name][:, 3])
  np.testing.assert_array_equal(moe_a["router"]["kernel"][..., :3], moe_b["router"]["kernel"][..., :3])
  assert not np.any(moe_a["router"]["kernel"][..., 3] == moe_b["router"]["kernel"][..., 3])
  assert not np.array_equal(after["blocks"]["attn_0"]["query"], before["blocks"]["attn_0"]["query"])


def test_bad_freeze_settings_name_the_binding():
  with pytest.raises(ConfigError, match=r"freeze.patterns: 'blocks/nothing' matches no parameter"):
    train_steps(["freeze.patterns=['blocks/nothing']"])
  with pytest.raises(ConfigError, match=r"freeze.first_experts=5: blocks/moe_1/.* has only 4 experts"):
    train_steps(["freeze.first_experts=5"])
  with pytest.raises(ConfigError, match="not a valid regex"):
    freeze(patterns=["blocks/(("])

"""configs/runs/flan_moe_options.gin: each FLAN-MoE option is one gin line, and the lines do what
they say (aux losses kept or dropped, expert dropout, router / expert freezing patterns)."""
import os
import re

import jax
import numpy as np
from flax import nnx

from glam import config as glam_config
from glam.layers.context import LayerContext
from glam.models.lm import DecoderLM
from glam.models.summary import abstract_model
from glam.moe.layer import MoeLayer
from glam.train.freezing import freeze, frozen_masks

OPTIONS = os.path.join(glam_config.REPO_CONFIGS, "runs", "flan_moe_options.gin")


def commented_lines(prefix: str) -> list[str]:
  """The optional lines the file shows as comments ("#   NAME = VALUE"), starting with `prefix`."""
  with open(OPTIONS) as f:
    return [m.group(1) for m in re.finditer(r"^#\s+(" + re.escape(prefix) + r".*=.*?)\s*$", f.read(), re.M)]


def layer_outputs(extra_lines=()):
  glam_config.parse([OPTIONS], list(extra_lines))
  layer = MoeLayer(16, num_experts=4, d_ff=32, rngs=nnx.Rngs(0))  # the other arguments from gin
  x = jax.random.normal(jax.random.key(1), (2, 8, 16))
  positions = np.broadcast_to(np.arange(8), (2, 8))
  run = lambda deterministic: layer(x, LayerContext(None, positions, positions, None, deterministic,
                                                    None if deterministic else jax.random.key(2)))
  return layer, run(True), run(False)


def test_recipe_keeps_aux_losses_and_turns_expert_dropout_on():
  layer, (y_eval, _, aux), (y_train, _, _) = layer_outputs()
  assert (layer.load_balance_weight, layer.z_loss_weight, layer.experts.dropout_rate) == (0.01, 0.001, 0.2)
  assert float(aux["loss_load_balance"]) > 0 and float(aux["loss_router_z"]) > 0
  assert not np.allclose(y_eval, y_train)  # expert dropout acts in training ...
  _, (y_eval_0, _, _), (y_train_0, _, _) = layer_outputs(["MoeLayer.expert_dropout = 0.0"])
  np.testing.assert_allclose(y_eval_0, y_train_0, atol=1e-6)  # ... and is the only noise here


def test_drop_aux_losses_lines():
  lines = commented_lines("MoeLayer.")
  assert lines == ["MoeLayer.load_balance_weight = 0.0", "MoeLayer.z_loss_weight = 0.0"]
  _, (_, _, aux), _ = layer_outputs(lines)
  assert float(aux["loss_load_balance"]) == 0.0 and float(aux["loss_router_z"]) == 0.0


def test_freeze_router_and_freeze_experts_lines_select_those_parameters():
  router_line, experts_line, both_line = commented_lines("freeze.patterns")
  selected = {}
  for name, line in (("router", router_line), ("experts", experts_line), ("both", both_line)):
    glam_config.parse(["configs/models/glam_tiny.gin", OPTIONS], [line])
    model = abstract_model(DecoderLM)
    selected[name] = set(frozen_masks(freeze(), model))
  assert selected["router"] == {"blocks/moe_1/router/kernel"}
  assert selected["experts"] == {"blocks/moe_1/experts/wi", "blocks/moe_1/experts/wo"}
  assert selected["both"] == selected["router"] | selected["experts"]

"""Brainformer presets: the block as reconstructed, per-sub-layer settings through gin, and the
parameter / FLOP counts `glam model summary` reports for them (computed here by hand)."""
import json

import gin
import pytest

from glam import cli, config
from glam.models.lm import DecoderLM
from glam.models.summary import abstract_model
from glam.moe.routers import ExpertChoiceRouter, TokenChoiceRouter

BRAINFORMER_ORDER = ["attn", "moe", "ffn", "attn", "moe", "ffn", "moe", "ffn"]


def build(*files, bindings=()):
  config.parse(list(files), list(bindings))
  with gin.unlock_config():
    return abstract_model(DecoderLM)


@pytest.mark.parametrize("name,d_model,experts", [("brainformer_tiny", 128, 8), ("brainformer_100m_32e", 1024, 32)])
def test_presets_build_the_reconstructed_block(name, d_model, experts):
  model = build(f"configs/models/{name}.gin")
  assert [kind for kind, _ in model.block_spec] == BRAINFORMER_ORDER
  assert model.d_model == d_model
  for index in (1, 4, 6):
    moe = getattr(model.blocks, f"moe_{index}")
    assert isinstance(moe.router, ExpertChoiceRouter)
    assert moe.router.capacity_factor == 1.0  # Brainformer-1: expert choice, capacity factor 1
    assert moe.num_experts == experts


def test_per_sublayer_router_capacity_and_experts_through_gin_scopes(tmp_path):
  spec = tmp_path / "mixed.gin"
  spec.write_text(
      "include 'configs/models/brainformer_tiny.gin'\n"
      "DecoderLM.block = [('attn', {}), ('moe', {'router': @ec3/ExpertChoiceRouter, 'num_experts': 4,\n"
      "    'dispatcher': @cap/CapacityEinsum()}), ('moe', {'router': @TokenChoiceRouter, 'd_ff': 64})]\n"
      "ec3/ExpertChoiceRouter.capacity_factor = 3.0\n"
      "cap/CapacityEinsum.capacity_factor = 7.0\n")
  model = build(str(spec))
  first, second = model.blocks.moe_1, model.blocks.moe_2
  assert isinstance(first.router, ExpertChoiceRouter) and first.router.capacity_factor == 3.0
  assert first.num_experts == 4 and first.dispatcher.capacity_factor == 7.0
  assert isinstance(second.router, TokenChoiceRouter) and second.num_experts == 8
  assert second.dispatcher.capacity_factor == 1.25  # the unscoped default
  assert second.experts.d_ff == 64


def expected_tiny_counts(seq_len):
  """brainformer_tiny by hand: d 128, vocab 384, one block, 4 heads x 32, widths 544, 8 experts, c=1."""
  d, vocab, heads, head_dim, width, experts = 128, 384, 4, 32, 544, 8
  attention = 4 * d * heads * head_dim
  router = d * experts
  expert = 2 * d * width  # plain GELU: wi, wo
  ffn = 3 * d * width     # GeGLU: wi, wi_gate, wo
  norms = 8 * d + d
  embedding, logits = vocab * d, d * vocab
  shared = embedding + logits + norms + 2 * attention + 3 * router + 3 * ffn
  total = shared + 3 * experts * expert
  activated = shared + 3 * expert  # capacity factor 1: one expert per token on average
  matmul = activated - embedding - norms
  flops = 6 * matmul + 2 * 12 * heads * head_dim * seq_len
  return total, activated, flops


def test_model_summary_reports_total_activated_and_flops(capsys):
  assert cli.main(["model", "summary", "--gin_file=configs/models/brainformer_tiny.gin", "--seq_len=64"]) == 0
  reported = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  total, activated, flops = expected_tiny_counts(64)
  assert (reported["total"], reported["activated"], reported["train_flops_per_token"]) == (total, activated, flops)


def test_tiny_preset_matches_glam_tiny_activated_parameters(capsys):
  counts = {}
  for name in ("brainformer_tiny", "glam_tiny"):
    assert cli.main(["model", "summary", f"--gin_file=configs/models/{name}.gin"]) == 0
    counts[name] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert counts["brainformer_tiny"]["activated"] == pytest.approx(counts["glam_tiny"]["activated"], rel=0.01)
  assert counts["brainformer_tiny"]["total"] > counts["glam_tiny"]["total"]  # 3 MoE layers of 8 experts vs 2

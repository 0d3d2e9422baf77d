"""MoDELM: backbone paths, the zero-initialised gate, expert wiring, KV-cache decoding, sharding."""
import functools

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from glam import config as glam_config
from glam.models.decode import init_cache
from glam.models.lm import DecoderLM
from glam.models.mode import MoDELM, mode_axis_rules

TINY = """
DecoderLM.d_model = 32
DecoderLM.num_blocks = 3
DecoderLM.vocab_size = 64
Attention.num_heads = 2
Attention.head_dim = 16
FeedForward.d_ff = 64
"""
TOKENS = (jnp.arange(24).reshape(2, 12) * 7) % 64
MODE = dict(num_domains=2, boundaries=(1, 3), expert_depth=2)  # one site over blocks [1, 3)


def build(cls, seed=0, **kwargs):
  """(graphdef, params) with the parameters initialised under jit (eager NNX init is slow)."""
  gin.clear_config()
  glam_config.register_configurables()
  gin.parse_config(TINY)
  make = lambda: cls(rngs=nnx.Rngs(seed), **kwargs)
  graphdef, _ = nnx.split(nnx.eval_shape(make))
  params = jax.jit(lambda: nnx.to_pure_dict(nnx.state(make())))()
  gin.clear_config()
  return graphdef, params


@functools.partial(jax.jit, static_argnums=0)
def run(graphdef, params, tokens, positions=None, cache=None):
  model = nnx.merge(graphdef, nnx.State(params))
  out = model(tokens, positions=positions, cache=cache)
  return out.logits, out.cache


@pytest.fixture(scope="module")
def models():
  """(backbone graphdef and params, MoDE graphdef, MoDE params with the backbone's weights, fresh MoDE params)."""
  backbone_def, backbone = build(DecoderLM, seed=1)
  mode_def, mode = build(MoDELM, seed=0, **MODE)
  return backbone_def, backbone, mode_def, dict(mode, **backbone), mode


def with_gate(params, scale, bias):
  gate = dict(params["domain_experts"]["gate"], scale=jnp.full_like(params["domain_experts"]["gate"]["scale"], scale),
              bias=jnp.full_like(params["domain_experts"]["gate"]["bias"], bias))
  return dict(params, domain_experts=dict(params["domain_experts"], gate=gate))


def test_backbone_paths_equal_decoder_lm_and_fresh_gate_gives_backbone_logits(models):
  backbone_def, backbone, mode_def, mode, fresh = models
  assert set(fresh) - set(backbone) == {"domain_experts"}
  assert jax.tree.structure(backbone) == jax.tree.structure({k: v for k, v in fresh.items() if k != "domain_experts"})
  # Every expert array is stacked over K = 2 (compose concatenates along axis 0).
  assert {leaf.shape[0] for leaf in jax.tree.leaves(fresh["domain_experts"])} == {2}
  np.testing.assert_array_equal(run(mode_def, mode, TOKENS)[0], run(backbone_def, backbone, TOKENS)[0])


def test_open_gate_changes_logits_and_expert_equal_to_span_gives_backbone(models):
  # Copying the span's backbone blocks [1, 3) into both experts makes e == h whatever the gate,
  # so the logits stay the backbone's; the random experts change them.
  backbone_def, backbone, mode_def, mode, _ = models
  reference = run(backbone_def, backbone, TOKENS)[0]
  opened = with_gate(mode, 1.0, 3.0)
  assert float(jnp.max(jnp.abs(run(mode_def, opened, TOKENS)[0] - reference))) > 1e-3
  copied = jax.tree.map(lambda a: jnp.stack([a[1:3]] * 2), backbone["blocks"])
  opened["domain_experts"] = dict(opened["domain_experts"], blocks=copied)
  np.testing.assert_allclose(run(mode_def, opened, TOKENS)[0], reference, atol=1e-4, rtol=1e-4)


def test_zero_gate_scale_still_gets_a_gradient(models):
  _, _, mode_def, mode, _ = models

  def loss(params):
    logits = run.__wrapped__(mode_def, params, TOKENS)[0]
    return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0])

  grads = jax.jit(jax.grad(loss))(mode)["domain_experts"]
  assert float(jnp.min(jnp.abs(grads["gate"]["scale"]))) > 0  # the gate opens from step 1
  assert all(float(jnp.max(jnp.abs(g))) == 0 for g in jax.tree.leaves(grads["blocks"]))  # experts wait


def test_kv_cache_decoding_matches_full_forward(models):
  _, _, mode_def, mode, _ = models
  opened = with_gate(mode, 0.7, 0.0)
  full, _ = run(mode_def, opened, TOKENS)
  positions = jnp.broadcast_to(jnp.arange(8, dtype=jnp.int32), (2, 8))
  logits, cache = run(mode_def, opened, TOKENS[:, :8], positions,
                      init_cache(nnx.merge(mode_def, opened), 2, TOKENS.shape[1]))
  assert "domain_experts" in cache["layers"]  # the experts' own KV cache, added on the first call
  np.testing.assert_allclose(logits, full[:, :8], atol=1e-4, rtol=1e-4)
  for t in range(8, TOKENS.shape[1]):
    logits, cache = run(mode_def, opened, TOKENS[:, t:t + 1], jnp.full((2, 1), t, jnp.int32), cache)
    np.testing.assert_allclose(logits[:, 0], full[:, t], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("boundaries", [(2, 1), (0,), (0, 4), (-1, 2)])
def test_bad_boundaries_name_the_binding(boundaries):
  with pytest.raises(glam_config.ConfigError, match=r"MoDELM.boundaries=.*strictly increasing.*num_blocks=3"):
    gin.parse_config(TINY)
    nnx.eval_shape(lambda: MoDELM(rngs=nnx.Rngs(0), boundaries=boundaries))


def test_domain_expert_axis_shards_experts_over_the_expert_mesh_axis():
  from glam.models.summary import abstract_model
  from glam.parallel.axis_rules import axis_rules
  from glam.parallel.sharding import named, param_logical_axes, param_specs, per_device_bytes
  glam_config.register_configurables()
  gin.parse_config(TINY + "MoDELM.num_domains = 4\nMoDELM.boundaries = (1, 3)\n")
  model = abstract_model(MoDELM)
  params = nnx.to_pure_dict(nnx.state(model))
  mesh = jax.make_mesh((2, 4), ("data", "expert"))
  logical = param_logical_axes(model)
  assert logical["domain_experts/blocks/ffn_1/wi"] == ("domain_expert", "layers", "embed", "mlp")
  nbytes = lambda tree: sum(4 * int(np.prod(a.shape)) for a in jax.tree.leaves(tree))
  expert_bytes = nbytes(params["domain_experts"])
  backbone_bytes = nbytes({k: v for k, v in params.items() if k != "domain_experts"})
  measured = {}
  for target in (None, "expert"):
    rules = axis_rules(mode_axis_rules(domain_expert=target))
    specs = param_specs(params, logical, mesh, rules)
    assert specs["domain_experts"]["gate"]["kernel"][0] == target
    measured[target] = per_device_bytes(params, named(specs, mesh))
  assert measured[None] == expert_bytes + backbone_bytes  # everything replicated
  assert measured["expert"] == expert_bytes // 4 + backbone_bytes  # each device holds one expert
  # The optimizer state follows: Adafactor's moments of an expert's [K, layers, d, f] weight (whole
  # at these sizes, factored [K, layers, d] / [K, layers, f] at d >= 128) are split over K too,
  # although the backbone's "blocks/ffn_1/wi" is also a suffix of their paths.
  from jax.sharding import PartitionSpec
  from glam.parallel.sharding import opt_state_specs
  from glam.train.checkpoint import path_str
  from glam.train.optimizers import adafactor
  opt_state = jax.eval_shape(adafactor(learning_rate=0.1).init, params)
  rules = axis_rules(mode_axis_rules(domain_expert="expert"))
  opt_specs = opt_state_specs(opt_state, params, param_specs(params, logical, mesh, rules))
  spec_leaves = jax.tree.leaves(opt_specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
  moments = {path_str(path): spec for (path, leaf), spec in zip(jax.tree_util.tree_flatten_with_path(opt_state)[0],
                                                               spec_leaves)
             if "domain_experts/blocks/ffn_1/wi" in path_str(path) and len(leaf.shape) >= 3}
  assert moments and all(spec[0] == "expert" for spec in moments.values()), moments


@pytest.mark.parametrize("domain_expert", ["default", None, "expert"])
def test_mode_model_places_and_runs_on_a_mesh(models, domain_expert):
  """The default rules know the domain_expert axis (kept whole); mode_axis_rules can split it."""
  from jax.sharding import AxisType
  from glam.parallel.axis_rules import axis_rules
  from glam.parallel.sharding import named, param_logical_axes, param_specs
  _, _, mode_def, params, _ = models
  expected = run(mode_def, params, TOKENS)[0]
  glam_config.register_configurables()
  if domain_expert != "default":
    gin.parse_config(f"axis_rules.rules = @mode_axis_rules()\nmode_axis_rules.domain_expert = {domain_expert!r}\n")
  rules = axis_rules()
  assert rules["domain_expert"] == (() if domain_expert in ("default", None) else ("expert",))
  mesh = jax.make_mesh((4, 2), ("data", "expert"), axis_types=(AxisType.Auto,) * 2)
  logical = param_logical_axes(nnx.merge(mode_def, nnx.State(params)))
  specs = param_specs(params, logical, mesh, rules)
  assert specs["domain_experts"]["gate"]["kernel"][0] == (None if domain_expert in ("default", None) else "expert")
  placed = jax.device_put(params, named(specs, mesh))
  with jax.set_mesh(mesh):  # the activation constraints (EXPERT_OUTPUTS) read the rules too
    logits = run(mode_def, placed, TOKENS)[0]
  np.testing.assert_allclose(logits, expected, atol=1e-5, rtol=1e-5)
  if domain_expert == "expert":  # 2 experts cannot be split over an expert axis of 4: an error, not replication
    with pytest.raises(glam_config.ConfigError, match=r"parameter domain_experts/.*: MoDELM.num_domains=2 is "
                                                      r"not divisible by the mesh's expert axis of size 4"):
      param_specs(params, logical, jax.make_mesh((2, 4), ("data", "expert")), rules)


def test_loading_binding_resolves_configurable_references_and_macros():
  """`train.model = @MoDELM` (every MoDE config) must give the configurable with its bindings, not
  gin's reference object; a `%MACRO` gives its value; unbound names give the default."""
  from glam.models.summary import abstract_model
  from glam.train.loading import binding
  glam_config.register_configurables()
  gin.parse_config(TINY + "SEED = 7\ntrain.model = @MoDELM\ntrain.seed = %SEED\ntrain.batch_size = 4\n"
                   "MoDELM.num_domains = 3\nMoDELM.boundaries = (1, 3)\nscoped/MoDELM.num_domains = 5\n")
  factory = binding("train.model", DecoderLM)
  assert not isinstance(factory, gin.config.ConfigurableReference)
  model = abstract_model(factory)
  assert isinstance(model, MoDELM) and model.num_domains == 3  # MoDELM's own bindings apply
  assert binding("train.seed", 0) == 7 and binding("train.batch_size", 16) == 4
  assert binding("train.vocab_path", "unbound") == "unbound"
  gin.parse_config("train.model = @scoped/MoDELM\n")
  assert abstract_model(binding("train.model", DecoderLM)).num_domains == 5  # the scope is kept

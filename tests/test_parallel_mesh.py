"""Meshes from gin, the logical axis rules, optimizer-state shardings derived from the parameters',
bad mesh input, and the dry-run memory plan (abstract shapes only)."""
import json

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from glam import config
from glam.cli import main
from glam.config import ConfigError
from glam.models.lm import DecoderLM
from glam.models.summary import abstract_model
from glam.parallel.axis_rules import axis_rules, spec_for
from glam.parallel.mesh import check_batch_divides, make_mesh, mesh_axes
from glam.parallel.plan import memory_plan, plan_mesh
from glam.parallel.sharding import opt_state_specs, param_logical_axes, param_specs
from glam.train.optimizers import adafactor, adamw

TINY = ["configs/models/glam_tiny.gin"]
SMALL = ["DecoderLM.d_model = 128", "MoeLayer.d_ff = 256", "FeedForward.d_ff = 256", "DecoderLM.vocab_size = 256"]


def mesh_from(name: str, *bindings: str):
  config.parse([f"configs/mesh/{name}.gin"], list(bindings))
  return make_mesh()


@pytest.mark.parametrize("name, sizes", [("single", (1, 1, 1, 1)), ("dp8", (8, 1, 1, 1)), ("ep8", (1, 1, 8, 1)),
                                         ("dp2_ep4", (2, 1, 4, 1)), ("fsdp2_ep2_tp2", (1, 2, 2, 2))])
def test_mesh_files_give_their_shapes(name, sizes):
  mesh = mesh_from(name)
  assert mesh.axis_names == mesh_axes() == ("data", "fsdp", "expert", "tensor")
  assert tuple(mesh.axis_sizes) == sizes and mesh.devices.size == int(np.prod(sizes))


def test_default_mesh_is_one_device_like_a_run_without_mesh():
  config.parse([], [])
  mesh = make_mesh()
  assert tuple(mesh.axis_sizes) == (1, 1, 1, 1) and mesh.devices.size == 1


def test_minus_one_takes_the_remaining_devices():
  mesh = mesh_from("dp8", "mesh_shape.data = 2", "mesh_shape.tensor = -1")
  assert tuple(mesh.axis_sizes) == (2, 1, 1, 4)


def test_bad_mesh_sizes_name_the_numbers():
  with pytest.raises(ConfigError, match=r"multiply to 6, but there are 8 devices"):
    mesh_from("dp8", "mesh_shape.data = 3", "mesh_shape.expert = 2")
  with pytest.raises(ConfigError, match=r"multiply to 3, which does not divide the 8 devices"):
    mesh_from("dp8", "mesh_shape.fsdp = 3")
  with pytest.raises(ConfigError, match=r"only one axis may be -1"):
    mesh_from("dp8", "mesh_shape.expert = -1")


def test_experts_not_divisible_by_expert_axis_is_an_error():
  mesh = mesh_from("dp2_ep4")
  config.parse(TINY, SMALL + ["MoeLayer.num_experts = 6"])
  model = abstract_model(DecoderLM)
  params = nnx.to_pure_dict(nnx.split(model)[1])
  with pytest.raises(ConfigError, match=r"num_experts=6 is not divisible by the mesh's expert axis of size 4"):
    param_specs(params, param_logical_axes(model), mesh, axis_rules())


def test_batch_not_divisible_by_batch_axes_is_an_error():
  mesh = mesh_from("dp2_ep4")
  check_batch_divides(16, mesh)
  with pytest.raises(ConfigError, match=r"train.batch_size=12: not divisible by the 8 batch shards .*data 2 x fsdp 1 x expert 4"):
    check_batch_divides(12, mesh)


def test_rules_map_names_and_use_each_mesh_axis_once():
  mesh = mesh_from("fsdp2_ep2_tp2")
  rules = axis_rules()
  assert spec_for(("layers", "expert", "embed", "mlp"), (2, 8, 128, 256), mesh, rules) == P(None, "expert", "fsdp", "tensor")
  assert spec_for(("batch", "length", None), (8, 16, 32), mesh, rules) == P(("fsdp", "expert"), None, None)
  # the batch's expert axis is taken by the experts dimension: rows go over what is left
  assert spec_for(("expert", "batch", None), (8, 8, 4), mesh, rules) == P("expert", "fsdp", None)
  assert spec_for(("vocab", "embed"), (255, 128), mesh, rules) == P(None, "fsdp")  # 255 % 2: whole
  with pytest.raises(ConfigError, match="'nonsense' has no entry in axis_rules.rules"):
    spec_for(("nonsense",), (4,), mesh, rules)


def test_rules_are_overridable_by_gin():
  config.parse(["configs/mesh/fsdp2_ep2_tp2.gin"], ["axis_rules.rules = (('embed', None), ('mlp', ('fsdp', 'tensor')))"])
  mesh = make_mesh()
  assert spec_for(("embed", "mlp"), (128, 256), mesh, axis_rules()) == P(None, ("fsdp", "tensor"))


@pytest.mark.parametrize("optimizer", [adafactor, adamw])
def test_optimizer_state_shardings_follow_the_parameters(optimizer):
  mesh = mesh_from("fsdp2_ep2_tp2")
  config.parse(TINY + ["configs/mesh/fsdp2_ep2_tp2.gin"], SMALL)
  model = abstract_model(DecoderLM)
  params = nnx.to_pure_dict(nnx.split(model)[1])
  specs = param_specs(params, param_logical_axes(model), mesh, axis_rules())
  opt_state = jax.eval_shape(optimizer(learning_rate=0.1).init, params)
  opt_specs = opt_state_specs(opt_state, params, specs)
  wi_spec = specs["blocks"]["moe_1"]["experts"]["wi"]  # [layers 2, experts 8, embed 128, mlp 256]
  assert wi_spec == P(None, "expert", "fsdp", "tensor")
  found = {}
  for (path, leaf), (_, spec) in zip(jax.tree_util.tree_flatten_with_path(opt_state)[0],
                                     jax.tree_util.tree_flatten_with_path(opt_specs, is_leaf=lambda s: isinstance(s, P))[0]):
    key = jax.tree_util.keystr(path)
    if not leaf.shape:
      assert spec == P(), key  # counters and learning rates: replicated
    if "moe_1']['experts']['wi']" in key:
      found[tuple(leaf.shape)] = spec
  if optimizer is adamw:  # mu and nu: the parameter's own spec
    assert found == {(2, 8, 128, 256): wi_spec}
  else:  # factored second moments: the largest dim (mlp 256) or the second largest (embed 128) dropped
    assert found[(2, 8, 128)] == P(None, "expert", "fsdp")
    assert found[(2, 8, 256)] == P(None, "expert", "tensor")
    assert found[(1,)] == P()  # optax's placeholder for the unfactored moment


def test_dry_run_plans_a_big_mesh_without_allocating(capsys):
  # GLaM 0.1B/64E on 64 devices (expert 64) from this 8-device test process: abstract only.
  code = main(["train", "--gin_file=configs/runs/pretrain.gin", "--gin_file=configs/models/glam_0.1b_64e.gin",
               "--gin_file=configs/mesh/ep8.gin", "--gin.plan_devices.num_devices=64",
               "--gin.train.batch_size=128", "--model_dir=/nonexistent/never/created", "--dry_run"])
  assert code == 0
  out = capsys.readouterr().out
  plan = json.loads(out.strip().splitlines()[-1])
  assert plan["mesh"] == "data 1 x fsdp 1 x expert 64 x tensor 1" and plan["devices"] == 64
  row = next(line for line in out.splitlines() if line.startswith("blocks/moe_1/experts/wi"))
  assert "('layers', 'expert', 'embed', 'mlp')" in row and "(None, 'expert', None, None)" in row
  # per device: the dense part whole, the experts 1/64
  config.parse(["configs/models/glam_0.1b_64e.gin", "configs/mesh/ep8.gin"], [])
  from glam.train.optimizers import make_optimizer
  detail = memory_plan(DecoderLM, make_optimizer(), 64)
  experts = [r for r in detail["parameters"] if "/experts/" in r["path"]]
  assert all(r["bytes_per_device"] * 64 == r["bytes"] for r in experts)
  dense = [r for r in detail["parameters"] if "/experts/" not in r["path"] and "router" not in r["path"]]
  assert all(r["bytes_per_device"] == r["bytes"] for r in dense)
  assert plan["param_bytes_per_device"] == sum(r["bytes_per_device"] for r in detail["parameters"])
  assert plan["param_bytes"] > 7 * 2**30 > plan["param_bytes_per_device"]
  assert plan_mesh(64).axis_sizes == (1, 1, 64, 1)


def test_model_summary_mesh_flag_prints_the_plan(capsys):
  code = main(["model", "summary", "--gin_file=configs/models/glam_tiny.gin", "--gin_file=configs/mesh/dp2_ep4.gin",
               "--mesh"])
  assert code == 0
  plan = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert plan["mesh"] == "data 2 x fsdp 1 x expert 4 x tensor 1"
  assert 0 < plan["opt_state_bytes_per_device"] <= plan["opt_state_bytes"]


def test_collective_stats_count_ops_and_result_bytes():
  from glam.parallel.hlo_stats import collective_stats
  hlo = """
  %a2a = f32[8,16,768]{2,1,0} all-to-all(f32[8,16,768]{2,1,0} %x), replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}
  %ag-start = (bf16[4,128]{1,0}, bf16[32,128]{1,0}) all-gather-start(bf16[4,128]{1,0} %y), dimensions={0}
  %ag-done = bf16[32,128]{1,0} all-gather-done((bf16[4,128]{1,0}, bf16[32,128]{1,0}) %ag-start)
  %ar = (f32[10]{0}, s32[]) all-reduce(f32[10]{0} %p, s32[] %q), to_apply=%add
  %add = f32[8,16,768]{2,1,0} add(%a2a, %a2a)
  """
  stats = collective_stats(hlo)
  assert stats["all-to-all"] == {"count": 1, "bytes": 4 * 8 * 16 * 768}
  assert stats["all-gather"] == {"count": 1, "bytes": 2 * (4 * 128 + 32 * 128)}  # the async pair counts once
  assert stats["all-reduce"] == {"count": 1, "bytes": 4 * 10 + 4}
  assert stats["reduce-scatter"]["count"] == stats["collective-permute"]["count"] == 0

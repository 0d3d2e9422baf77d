"""Expert parallelism two ways, read off the compiled HLO: GSPMD vs explicit all-to-all.

  python scripts/bench_expert_parallel_hlo.py [--tokens_per_device 2048] [--mesh 1,1,8,1]

One GLaM-0.1B/64E-shaped MoE layer (d_model 768, 64 experts, expert hidden 3072, top-2, group
1024, capacity factor 1.25) on 8 simulated CPU devices, forward + backward (gradients wrt all
parameters and the input). Nothing is executed or allocated: each variant is lowered from
abstract, sharded inputs and compiled, then we count the collectives in the compiled
(partitioned, per-device) HLO and the bytes of their results, and take the per-device memory from
`compiled.memory_analysis()`. Variants:

  gspmd_einsum:    CapacityEinsum with GShard's one-hot einsums, experts split over "expert" by
                   sharding constraints (MoeLayer's ExpertShardedCall); GSPMD chooses the collectives.
  gspmd_gather:    the same with CapacityEinsum's index-gather placement.
  expert_parallel: ExpertParallel, jax.shard_map + all_to_all there and back (twice more backward).
  expert_parallel_dropless: ExpertParallel(dropless=True): worst-case-sized buffers, no drops.

One JSON line per variant. Bytes are per device and per step (the sum over collective ops of the
size of each op's result); an op inside a loop would count once (there is none here).
"""
import argparse
import json
import math
import os
import re
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402  (after XLA_FLAGS)
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from glam.layers.context import LayerContext  # noqa: E402
from glam.moe.dispatch import CapacityEinsum  # noqa: E402
from glam.moe.expert_parallel import ExpertParallel  # noqa: E402
from glam.moe.layer import MoeLayer  # noqa: E402
from glam.parallel.axis_rules import axis_rules, spec_for  # noqa: E402
from glam.parallel.mesh import BATCH_AXES, MESH_AXES  # noqa: E402

COLLECTIVES = ("all-to-all", "all-gather", "all-reduce", "reduce-scatter", "collective-permute")
DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4,
               "f32": 4, "s64": 8, "u64": 8, "f64": 8}
# `%name = TYPE op(` where TYPE is one array type or a tuple of them; async ops count at -start.
OP = re.compile(r"=\s*(\(.*?\)|\S+)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(")
SINGLETON_GROUPS = re.compile(r"replica_groups=\{\{\d+\}(,\{\d+\})*\}")
ARRAY = re.compile(r"\b(" + "|".join(DTYPE_BYTES) + r")\[([\d,]*)\]")
VARIANTS = {
    "gspmd_einsum": CapacityEinsum(capacity_factor=1.25, implementation="einsum"),
    "gspmd_gather": CapacityEinsum(capacity_factor=1.25, implementation="gather"),
    "expert_parallel": ExpertParallel(capacity_factor=1.25),
    "expert_parallel_dropless": ExpertParallel(dropless=True),
}


def collectives(hlo: str) -> dict:
  """{op: {"count": n, "bytes": sum of result sizes}} over the compiled module's collective ops."""
  found = {op: {"count": 0, "bytes": 0} for op in COLLECTIVES}
  for line in hlo.splitlines():
    match = OP.search(line)
    if not match or SINGLETON_GROUPS.search(line):  # over one device each: moves nothing
      continue
    arrays = [(dtype, dims) for dtype, dims in ARRAY.findall(match.group(1))]
    if match.group(3) and len(arrays) > 1:  # async start: (operands..., results...): take the last
      arrays = arrays[-1:]
    size = sum(DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d) for dtype, dims in arrays)
    found[match.group(2)]["count"] += 1
    found[match.group(2)]["bytes"] += size
  return found


def compile_layer(dispatcher, args, mesh):
  def build():
    return MoeLayer(args.d_model, num_experts=args.experts, d_ff=args.d_ff, group_size=args.group_size,
                    dispatcher=dispatcher, rngs=nnx.Rngs(0))

  abstract = nnx.eval_shape(build)
  graphdef, params = nnx.split(abstract, nnx.Param)
  rules = axis_rules()

  def sharded(variable):
    spec = spec_for(variable.logical_axes, variable.shape, mesh, rules, where="MoeLayer parameter")
    return jax.ShapeDtypeStruct(variable.shape, variable.dtype, sharding=NamedSharding(mesh, spec))

  abstract_params = jax.tree.map(sharded, params, is_leaf=lambda v: isinstance(v, nnx.Variable))
  devices = mesh.devices.size
  batch = devices * args.tokens_per_device // args.seq_len
  x = jax.ShapeDtypeStruct((batch, args.seq_len, args.d_model), jnp.float32,
                           sharding=NamedSharding(mesh, PartitionSpec(BATCH_AXES)))
  positions = jnp.broadcast_to(jnp.arange(args.seq_len), (batch, args.seq_len))

  def loss(params, x):
    layer = nnx.merge(graphdef, params)
    ctx = LayerContext(mask=None, query_positions=positions, key_positions=positions, deterministic=False)
    y, _, aux = layer(x, ctx)
    return jnp.mean(y * y) + sum(v for name, v in aux.items() if name.startswith("loss_"))

  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  with jax.set_mesh(mesh):
    return step.lower(abstract_params, x).compile()


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tokens_per_device", type=int, default=2048)
  parser.add_argument("--seq_len", type=int, default=1024)
  parser.add_argument("--d_model", type=int, default=768)
  parser.add_argument("--experts", type=int, default=64)
  parser.add_argument("--d_ff", type=int, default=3072)
  parser.add_argument("--group_size", type=int, default=1024)
  parser.add_argument("--mesh", default="1,1,8,1", help="data,fsdp,expert,tensor sizes")
  parser.add_argument("--only", default=",".join(VARIANTS), help="comma-separated variants")
  args = parser.parse_args()
  shape = tuple(int(s) for s in args.mesh.split(","))
  mesh = jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))
  for name in args.only.split(","):
    compiled = compile_layer(VARIANTS[name], args, mesh)
    found = collectives(compiled.as_text())
    memory = compiled.memory_analysis()
    record = {"variant": name, "mesh": dict(zip(MESH_AXES, shape)), "tokens_per_device": args.tokens_per_device,
              "d_model": args.d_model, "experts": args.experts, "d_ff": args.d_ff, "group_size": args.group_size,
              "collectives": {op: v for op, v in found.items() if v["count"]},
              "collective_ops": sum(v["count"] for v in found.values()),
              "collective_MiB": round(sum(v["bytes"] for v in found.values()) / 2**20, 2)}
    if memory is not None:
      for field in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes"):
        record[field.replace("_size_in_bytes", "_MiB")] = round(getattr(memory, field) / 2**20, 1)
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
  main()

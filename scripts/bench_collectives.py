"""Per-device memory and collectives per train step, from the compiled HLO of a whole train step.

  python scripts/bench_collectives.py [--dispatcher gspmd|gspmd_einsum|expert_parallel|dropless] [--mesh ep8]
      [--batch_size 16] [--seq_len 512] [--num_blocks 6] [--scan]

A GLaM-0.1B/64E-shaped model (configs/models/glam_0.1b_64e.gin: 12 layers, d_model 768, 64
experts of hidden 3072, MoE every other layer, 32k vocabulary) on 8 simulated CPU devices, with
the trainer's own pieces: state shardings derived from the logical axes, the batch over the batch
axes, the Adafactor train step. Nothing is allocated or run: the step is lowered from abstract,
sharded inputs and compiled; memory comes from `compiled.memory_analysis()` (per device) and the
collectives from the compiled (per-device) HLO text. Layers are unrolled (not scanned) by default
so every layer's collectives are counted; `--scan` counts ops in the scan body once.

Dispatchers: gspmd = CapacityEinsum under the MoE layer's sharding constraints (GSPMD inserts the
collectives), with its default placement (gathers on CPU) or gspmd_einsum (GShard's one-hot
einsums); expert_parallel = the explicit shard_map all-to-all dispatcher (ExpertParallel);
dropless = Dropless (sorted rows, no expert-axis constraint). One JSON line per run.
"""
import argparse
import json
import os
import sys
import time

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402  (after the device count is set)

from glam import config  # noqa: E402
from glam.models.lm import DecoderLM  # noqa: E402
from glam.models.summary import abstract_model  # noqa: E402
from glam.parallel.hlo_stats import collective_stats  # noqa: E402
from glam.parallel.mesh import batch_sharding, describe, make_mesh  # noqa: E402
from glam.parallel.sharding import abstract_with_shardings, per_device_bytes  # noqa: E402
from glam.parallel.train_state import constrain_outputs, on_mesh, train_state_shardings  # noqa: E402
from glam.train.optimizers import make_optimizer  # noqa: E402
from glam.train.step import make_train_step  # noqa: E402
from glam.train.trainer import build_model  # noqa: E402

# --dispatcher NAME -> the gin bindings it adds.
DISPATCHERS = {
    "gspmd": ["MoeLayer.dispatcher = @CapacityEinsum()"],  # its default placement (index gathers on CPU)
    "gspmd_einsum": ["MoeLayer.dispatcher = @CapacityEinsum()", "CapacityEinsum.implementation = 'einsum'"],
    "expert_parallel": ["MoeLayer.dispatcher = @ExpertParallel()"],
    "dropless": ["MoeLayer.dispatcher = @Dropless()"],
}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--dispatcher", choices=sorted(DISPATCHERS), default="gspmd")
  parser.add_argument("--mesh", default="ep8", help="a configs/mesh/*.gin name")
  parser.add_argument("--model", default="configs/models/glam_0.1b_64e.gin")
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--seq_len", type=int, default=512)
  parser.add_argument("--num_blocks", type=int, default=None, help="override DecoderLM.num_blocks")
  parser.add_argument("--scan", action="store_true", help="keep lax.scan over blocks (counts the body once)")
  args = parser.parse_args()

  bindings = DISPATCHERS[args.dispatcher] + [f"DecoderLM.scan_layers = {args.scan}"]
  if args.num_blocks:
    bindings.append(f"DecoderLM.num_blocks = {args.num_blocks}")
  config.parse(["configs/runs/pretrain.gin", args.model, f"configs/mesh/{args.mesh}.gin"], bindings)
  mesh = make_mesh()
  optimizer = make_optimizer()
  graphdef = build_graphdef()
  params = jax.eval_shape(lambda: build_model(DecoderLM, 0)[1])
  state = {"step": jax.ShapeDtypeStruct((), "int32"), "params": params,
           "opt_state": jax.eval_shape(optimizer.init, params)}
  shardings = train_state_shardings(state, abstract_model(DecoderLM), mesh)
  abstract_state = abstract_with_shardings(state, shardings)
  rows = jax.ShapeDtypeStruct((args.batch_size, args.seq_len), "int32", sharding=batch_sharding(mesh))
  batch = {"inputs": rows, "targets": rows, "segment_ids": rows, "positions": rows,
           "loss_weights": jax.ShapeDtypeStruct(rows.shape, "float32", sharding=batch_sharding(mesh))}
  step = on_mesh(mesh, jax.jit(constrain_outputs(make_train_step(graphdef, optimizer), mesh, shardings),
                               donate_argnums=(0,)))
  start = time.perf_counter()
  compiled = step.lower(abstract_state, batch).compile()
  compile_s = time.perf_counter() - start
  memory = compiled.memory_analysis()
  stats = collective_stats(compiled.as_text())
  print(json.dumps({
      "dispatcher": args.dispatcher, "mesh": describe(mesh), "model": args.model,
      "num_blocks": args.num_blocks, "scan": args.scan, "batch_size": args.batch_size, "seq_len": args.seq_len,
      "state_bytes_per_device": per_device_bytes(state, shardings),
      "params_bytes_per_device": per_device_bytes(state["params"], shardings["params"]),
      "argument_bytes_per_device": memory.argument_size_in_bytes,
      "temp_bytes_per_device": memory.temp_size_in_bytes,
      "output_bytes_per_device": memory.output_size_in_bytes,
      "collectives": stats,
      "collective_count": sum(s["count"] for s in stats.values()),
      "collective_bytes_per_device": sum(s["bytes"] for s in stats.values()),
      "compile_s": round(compile_s, 1),
  }))


def build_graphdef():
  """The model's graphdef, from an abstract model (no weights)."""
  from flax import nnx
  return nnx.split(abstract_model(DecoderLM))[0]


if __name__ == "__main__":
  main()

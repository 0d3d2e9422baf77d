"""Train-step throughput and model-FLOP utilisation against this machine's measured matmul peak.

  python scripts/bench_train_step.py [--steps 5] [--only demo|dense_50m]

Prints one JSON line per model: tokens/s, model TFLOP/s, MFU, with the peak measured in the same run.
"""
import argparse
import functools
import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import gin
import jax
import numpy as np
from flax import nnx

from bench_common import random_batch, time_steps
from glam import config
from glam.models.lm import DecoderLM
from glam.models.summary import abstract_model, count_parameters, flops_per_token
from glam.train.flops import measure_matmul_peak
from glam.train.huge_pages import reexec_with_huge_pages
from glam.train.optimizers import adafactor, make_optimizer
from glam.train.step import DEFAULT_LOG_EVERY, make_train_step

MODELS = {
    # the demo model (configs/models/dense_tiny.gin) at the demo's batch shape
    "demo": dict(gin_files=["configs/models/dense_tiny.gin"], batch=16, seq_len=128, bindings=[]),
    # a ~50M-parameter dense model: 10 layers of d_model 512, GeGLU 2048, 8 heads of 64, 8k vocab
    "dense_50m": dict(gin_files=["configs/models/dense_tiny.gin"], batch=8, seq_len=256, bindings=[
        "DecoderLM.vocab_size = 8192", "DecoderLM.d_model = 512", "DecoderLM.num_blocks = 10",
        "Attention.num_heads = 8", "Attention.head_dim = 64", "FeedForward.d_ff = 2048"]),
}


def bench(name: str, spec: dict, steps: int, peak: float) -> dict:
  config.parse(spec["gin_files"], spec["bindings"])
  with gin.unlock_config():
    model = DecoderLM(rngs=nnx.Rngs(0))
    info = abstract_model(DecoderLM)
  graphdef, state = nnx.split(model)
  params = nnx.to_pure_dict(state)
  optimizer = make_optimizer(optimizer=functools.partial(adafactor, learning_rate=1e-3))
  train_state = {"step": np.int32(0), "params": params, "opt_state": optimizer.init(params)}
  # As `glam train` runs it: the norm metrics only on the steps it logs (every log_every)
  step = jax.jit(make_train_step(graphdef, optimizer, norms_every=DEFAULT_LOG_EVERY), donate_argnums=(0,))
  batch = random_batch(spec["batch"], spec["seq_len"], model.vocab_size)
  compile_s, step_s, _ = time_steps(step, train_state, batch, steps)
  tokens_per_s = spec["batch"] * spec["seq_len"] / step_s
  flops = flops_per_token(info, spec["seq_len"])["train"]
  return {"model": name, "params": count_parameters(info)["total"], "batch": spec["batch"],
          "seq_len": spec["seq_len"], "compile_s": round(compile_s, 2), "step_s": round(step_s, 4),
          "tokens_per_s": round(tokens_per_s), "model_tflops_per_s": round(flops * tokens_per_s / 1e12, 4),
          "peak_tflops_per_s": round(peak / 1e12, 4), "mfu": round(flops * tokens_per_s / peak, 4)}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--only", choices=sorted(MODELS), default=None)
  args = parser.parse_args()
  peak = measure_matmul_peak()
  print(json.dumps({"device": str(jax.devices()[0].device_kind), "matmul_peak_tflops_per_s": round(peak / 1e12, 4)}))
  for name, spec in MODELS.items():
    if args.only in (None, name):
      print(json.dumps(bench(name, spec, args.steps, peak)), flush=True)


if __name__ == "__main__":
  reexec_with_huge_pages()  # as `glam` does: malloc on huge pages unless GLAM_HUGE_PAGES=0
  main()

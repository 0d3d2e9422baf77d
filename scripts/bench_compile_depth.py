"""Compile time of one train step against depth: scanned blocks stay flat, unrolled ones grow.

  python scripts/bench_compile_depth.py [--depths 4 16 32]
"""
import argparse
import functools
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
import jax
import numpy as np
from flax import nnx

from bench_common import random_batch
from glam import config
from glam.models.lm import DecoderLM
from glam.train.optimizers import adafactor, make_optimizer
from glam.train.step import make_train_step
from glam.train.huge_pages import reexec_with_huge_pages


def compile_seconds(num_blocks: int, scan: bool) -> float:
  config.parse(["configs/models/dense_tiny.gin"], [f"DecoderLM.num_blocks = {num_blocks}",
                                                   f"DecoderLM.scan_layers = {scan}"])
  model = DecoderLM(rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  params = nnx.to_pure_dict(state)
  optimizer = make_optimizer(optimizer=functools.partial(adafactor, learning_rate=1e-3))
  train_state = {"step": np.int32(0), "params": params, "opt_state": optimizer.init(params)}
  batch = random_batch(4, 64, model.vocab_size)
  step = jax.jit(make_train_step(graphdef, optimizer))
  start = time.perf_counter()
  step.lower(train_state, batch).compile()
  return time.perf_counter() - start


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--depths", type=int, nargs="+", default=[4, 16, 32])
  args = parser.parse_args()
  for scan in (True, False):
    row = {"scan_layers": scan}
    for depth in args.depths:
      row[f"compile_s_{depth}_blocks"] = round(compile_seconds(depth, scan), 2)
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
  reexec_with_huge_pages()  # as `glam` does: malloc on huge pages unless GLAM_HUGE_PAGES=0
  main()

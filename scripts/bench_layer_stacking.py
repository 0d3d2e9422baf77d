"""What stacking the layers' parameters costs: a stack of expert FFNs, gradients of all weights.

  python scripts/bench_layer_stacking.py [--layers 4] [--rounds 6]

glam keeps every block's parameters stacked along a leading layers axis (so lax.scan can walk
them); each layer's slice is then copied out in the forward and again in the backward, and the
gradients are written back into a stacked buffer. This times three ways to run the same layers
(8 SwiGLU experts of 512 x 1024, 512 rows each, residual connections, at the peer-race shape):

  scan_stacked       lax.scan over the stacked parameters (glam's default, DecoderLM.scan_layers)
  unrolled_stacked   a Python loop over static slices of the stacked parameters (scan_layers=False)
  unrolled_separate  a Python loop over separate per-layer arrays (no slicing at all)

Interleaved rounds; least and median seconds per gradient step, one JSON line per variant.
"""
import argparse
import json
import statistics
import time

import bench_common  # noqa: F401  (applies GLAM_RETAIN_HOST_MEMORY before JAX starts)
import jax
import jax.numpy as jnp
from glam.train.huge_pages import reexec_with_huge_pages

EXPERTS, ROWS, D_MODEL, D_FF = 8, 512, 512, 1024


def expert_layer(h, weights):
  w_in, w_gate, w_out = weights
  hidden = jax.nn.silu(jnp.einsum("ecm,emf->ecf", h, w_gate)) * jnp.einsum("ecm,emf->ecf", h, w_in)  # [E, C, F]
  return h + jnp.einsum("ecf,efm->ecm", hidden, w_out)  # [E, C, M]


def scan_stacked(params, x):
  h, _ = jax.lax.scan(lambda h, weights: (expert_layer(h, weights), None), x, params)
  return jnp.sum(jnp.square(h))


def unrolled_stacked(params, x):
  h = x
  for layer in range(params[0].shape[0]):
    h = expert_layer(h, tuple(p[layer] for p in params))
  return jnp.sum(jnp.square(h))


def unrolled_separate(per_layer, x):
  h = x
  for weights in per_layer:
    h = expert_layer(h, weights)
  return jnp.sum(jnp.square(h))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--layers", type=int, default=4)
  parser.add_argument("--rounds", type=int, default=6)
  args = parser.parse_args()
  keys = jax.random.split(jax.random.key(0), 4)
  shapes = [(args.layers, EXPERTS, D_MODEL, D_FF)] * 2 + [(args.layers, EXPERTS, D_FF, D_MODEL)]
  stacked = tuple(jax.random.normal(key, shape) * 0.03 for key, shape in zip(keys, shapes))
  per_layer = [tuple(p[layer] for p in stacked) for layer in range(args.layers)]
  x = jax.random.normal(keys[3], (EXPERTS, ROWS, D_MODEL))
  variants = {"scan_stacked": (jax.jit(jax.grad(scan_stacked)), stacked),
              "unrolled_stacked": (jax.jit(jax.grad(unrolled_stacked)), stacked),
              "unrolled_separate": (jax.jit(jax.grad(unrolled_separate)), per_layer)}
  times = {name: [] for name in variants}
  for step, params in variants.values():
    jax.block_until_ready(step(params, x))
  for _ in range(args.rounds):
    for name, (step, params) in variants.items():
      start = time.perf_counter()
      jax.block_until_ready(step(params, x))
      times[name].append(time.perf_counter() - start)
  for name, seconds in times.items():
    print(json.dumps({"variant": name, "layers": args.layers, "min_s": round(min(seconds), 4),
                      "median_s": round(statistics.median(seconds), 4), "rounds": args.rounds}))


if __name__ == "__main__":
  reexec_with_huge_pages()  # as `glam` does: malloc on huge pages unless GLAM_HUGE_PAGES=0
  main()

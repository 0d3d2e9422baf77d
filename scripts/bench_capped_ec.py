"""Forward time of one expert-choice MoE layer with and without the cap (Zhou et al. 2022, §3.3).

  python scripts/bench_capped_ec.py [--reps 7] [--only 0]

For each size: the least wall-clock time of one jitted forward of MoeLayer (CapacityEinsum,
GELU experts, c = 2) with ExpertChoiceRouter uncapped and with max_experts_per_token = 2 (100
Dykstra rounds at the paper's entropy 0.001, annealed), run interleaved so that a busy machine
slows both alike; also the router alone, and how many tokens each version gives more than 2
experts. The router kernel is drawn with stddev 0.5 so that its scores are peaked, as after
training. One JSON line per size.
"""
import argparse
import functools
import json
import time

import jax
import jax.numpy as jnp
from flax import nnx

from glam.layers.context import LayerContext
from glam.moe.dispatch import CapacityEinsum
from glam.moe.layer import MoeLayer
from glam.moe.routers import ExpertChoiceRouter
from glam.train.host_memory import retain_freed_host_memory
from glam.train.huge_pages import reexec_with_huge_pages

retain_freed_host_memory()  # as `glam` does, before any JAX computation

SIZES = [  # tokens, d_model, experts, expert hidden, tokens per group
    dict(tokens=512, d_model=64, experts=4, hidden=128, group=64),  # the tests' tiny EC model
    dict(tokens=2048, d_model=512, experts=8, hidden=1024, group=1024),  # scripts/bench_moe_layer.py's shape
]
CAP = 2


def forward(layer: MoeLayer):
  graphdef, state = nnx.split(layer)
  ctx = LayerContext(mask=None, query_positions=None, key_positions=None, deterministic=True)
  step = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x, ctx)[0])
  return lambda x: step(state, x)


def route(router: ExpertChoiceRouter):
  graphdef, state = nnx.split(router)
  step = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x, deterministic=True, rng=None).token_index)
  return lambda x: step(state, x)


def least_times(steps: dict, x, reps: int) -> dict:
  for step in steps.values():  # compile and warm up
    jax.block_until_ready(step(x))
  times = {name: [] for name in steps}
  for _ in range(reps):
    for name, step in steps.items():
      start = time.perf_counter()
      jax.block_until_ready(step(x))
      times[name].append(time.perf_counter() - start)
  return {name: min(t) for name, t in times.items()}


def over_cap(token_index, tokens: int) -> tuple[float, int]:
  """Fraction of tokens taken by more than CAP experts, and the most experts on one token."""
  counts = jax.nn.one_hot(token_index, tokens, dtype=jnp.int32).sum(axis=(1, 2))  # [groups, tokens]
  return round(float(jnp.mean(counts > CAP)), 4), int(counts.max())


def bench(size: dict, reps: int) -> dict:
  d_model, experts, group = size["d_model"], size["experts"], size["group"]
  x = jax.random.normal(jax.random.key(0), (1, size["tokens"], d_model))
  steps, routers = {}, {}
  for name, cap in (("uncapped", None), ("capped", CAP)):
    router = functools.partial(ExpertChoiceRouter, capacity_factor=2.0, init_stddev=0.5, max_experts_per_token=cap)
    layer = MoeLayer(d_model, num_experts=experts, d_ff=size["hidden"], router=router,
                     dispatcher=CapacityEinsum(), group_size=group, rngs=nnx.Rngs(0))
    steps[f"{name}_layer"] = forward(layer)
    routers[name] = route(layer.router)
    steps[f"{name}_router"] = lambda x, r=routers[name]: r(x.reshape(-1, group, d_model))
  best = least_times(steps, x, reps)
  row = dict(size, **{f"{name}_ms": round(t * 1e3, 2) for name, t in best.items()})
  row["layer_ratio"] = round(best["capped_layer"] / best["uncapped_layer"], 2)
  for name, router in routers.items():
    row[f"{name}_over_cap_fraction"], row[f"{name}_max_experts_per_token"] = over_cap(
        router(x.reshape(-1, group, d_model)), group)
  return dict(row, cap=CAP, cap_iterations=100, device=jax.devices()[0].device_kind, reps=reps)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--reps", type=int, default=7)
  parser.add_argument("--only", type=int, default=None, help="index into SIZES")
  args = parser.parse_args()
  sizes = SIZES if args.only is None else [SIZES[args.only]]
  for size in sizes:
    print(json.dumps(bench(size, args.reps)), flush=True)


if __name__ == "__main__":
  reexec_with_huge_pages()  # as `glam` does: malloc on huge pages unless GLAM_HUGE_PAGES=0
  main()

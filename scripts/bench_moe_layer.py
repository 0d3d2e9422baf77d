"""MoE dispatch + experts against a dense FFN of the same activated FLOPs, forward + backward.

  python scripts/bench_moe_layer.py [--reps 7] [--only 0] [--dispatchers capacity_1.25,dropless] [--size test]
      [--gin=matmul.backend='xla']

For each size and dispatcher: the minimum time of one jitted forward+backward (gradients wrt the
expert weights, the input and the gates) divided by that of a dense SwiGLU FFN with hidden width
k * expert hidden on the same tokens, written with 2-D matmuls on [tokens, d_model] (the fastest
dense form; glam's FeedForward on [groups, tokens, d_model] is timed beside it as
glam_feedforward_ms). Both sides multiply with glam.kernels.matmul, so on one CPU device both run
on the CBLAS kernel's sgemm (oneMKL or OpenBLAS; matmul_backend in each row; `--gin=matmul.backend='xla'` for XLA's dots). Runs are interleaved (dense, then each dispatcher, in turn) so that a busy
machine slows all of them alike; cpu_time_ratio is the same ratio of process CPU seconds. The routing is fixed (a random softmax router's top-k; for the
expert_choice row each expert's top tokens * k / experts tokens), so only dispatch and experts are
compared. One JSON line per (size, dispatcher); ragged_dot (a CPU
fallback doing num_experts times the work) only for sizes with at most 8 experts.

Each (size, dispatcher) runs in a process of its own, beside its own dense baseline, as a training
run holds one step: steps of other shapes in the same process moved the ratios by up to 0.1
(2026-11-25, glibc malloc with huge pages). --in_process times them all in this process instead.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

from glam import config
from glam.kernels.matmul import matmul, resolve_backend
from glam.layers.context import LayerContext
from glam.layers.feedforward import FeedForward
from glam.moe.dispatch import CapacityEinsum, Dropless
from glam.moe.experts import Experts
from glam.moe.routers import ExpertChoiceRouting, TokenChoiceRouting
from glam.train.host_memory import retain_freed_host_memory
from glam.train.huge_pages import reexec_with_huge_pages

retain_freed_host_memory()  # as `glam` does (GLAM_RETAIN_HOST_MEMORY=1), before any JAX computation

SIZES = [  # tokens, d_model, experts, k, expert hidden, tokens per group
    dict(tokens=2048, d_model=512, experts=8, k=2, hidden=1024, group=1024),  # the shape
    dict(tokens=2048, d_model=512, experts=8, k=1, hidden=2048, group=1024),  # Switch-style top-1
    dict(tokens=4096, d_model=256, experts=32, k=2, hidden=256, group=1024),  # many small experts
]
TEST_SIZES = [  # --size=test: a tiny shape for the test of this script's process-per-dispatcher loop
    dict(tokens=64, d_model=16, experts=4, k=2, hidden=32, group=32),
]
DISPATCHERS = {  # name -> (dispatcher, target ratio from the issue, note)
    "capacity_1.25": (CapacityEinsum(capacity_factor=1.25), 1.3,
                      "gather placement (auto on CPU): kept assignments sorted on the fused expert FFN kernel, "
                      "else in the padded layout"),
    "capacity_1.25_einsum": (CapacityEinsum(capacity_factor=1.25, implementation="einsum"), None,
                             "GShard one-hot einsums"),
    "dropless": (Dropless(), 1.2, "auto: the fused expert FFN on the CBLAS kernel on one CPU device (else padded)"),
    "dropless_padded": (Dropless(implementation="padded"), None,
                        "padded [E, C] einsum + chunked overflow (auto on CPU without the kernel)"),
    "dropless_blocked": (Dropless(implementation="blocked"), None, "every row through the blocked grouped matmul"),
    "dropless_ragged_dot": (Dropless(implementation="ragged_dot"), None,
                            "CPU fallback: JAX masks the input once per expert"),
    "expert_choice": (CapacityEinsum(), None,
                      "expert-choice routing with c = k (each expert takes tokens * k / experts tokens: the "
                      "same FLOPs), gather placement"),
}
EXPERT_CHOICE = {"expert_choice"}  # rows routed by fixed_expert_choice instead of fixed_routing
RAGGED_DOT_MAX_EXPERTS = 8  # the CPU fallback does num_experts times the work: skipped above this


def fixed_routing(x, num_experts: int, k: int, seed: int = 1) -> TokenChoiceRouting:
  router = jax.random.normal(jax.random.key(seed), (x.shape[-1], num_experts)) * 0.02
  logits = jnp.einsum("gtm,me->gte", x, router)  # [groups, tokens, experts]
  probs = jax.nn.softmax(logits)
  gates, index = jax.lax.top_k(probs, k)
  gates = gates / jnp.sum(gates, axis=-1, keepdims=True)  # GShard renormalises the top-k
  return TokenChoiceRouting(index.astype(jnp.int32), gates, probs, logits, None)


def fixed_expert_choice(x, num_experts: int, k: int, seed: int = 1) -> ExpertChoiceRouting:
  """Expert choice from the same random router: each expert takes its tokens * k / experts
  best-scoring tokens of the group (capacity factor c = k, so the FLOPs equal top-k's)."""
  routing = fixed_routing(x, num_experts, k, seed)
  capacity = x.shape[1] * k // num_experts
  gates, token_index = jax.lax.top_k(jnp.swapaxes(routing.probs, 1, 2), capacity)  # [groups, experts, capacity]
  return ExpertChoiceRouting(token_index.astype(jnp.int32), gates, routing.probs, routing.logits)


def train_ctx():
  return LayerContext(mask=None, query_positions=None, key_positions=None, deterministic=False,
                      rng=jax.random.key(0))


def moe_step(dispatcher, experts: Experts, routing: TokenChoiceRouting):
  graphdef, params = nnx.split(experts)

  def loss(params, x, gates):
    y, _ = dispatcher(x, routing._replace(gates=gates), nnx.merge(graphdef, params), train_ctx())
    return jnp.mean(jnp.square(y))

  step = jax.jit(jax.grad(loss, (0, 1, 2)))
  return lambda x: step(params, x, routing.gates)


def dense_step(ffn: FeedForward):
  """The dense baseline: the same SwiGLU FFN on [tokens, d_model] rows (2-D matmuls)."""
  graphdef, params = nnx.split(ffn)

  def loss(params, x):
    ffn = nnx.merge(graphdef, params)
    rows = x.reshape(-1, x.shape[-1])  # [tokens, d_model]
    hidden = jax.nn.silu(matmul(rows, ffn.wi_gate[...])) * matmul(rows, ffn.wi[...])  # [tokens, d_ff]
    return jnp.mean(jnp.square(matmul(hidden, ffn.wo[...])))  # [tokens, d_model]

  step = jax.jit(jax.grad(loss, (0, 1)))
  return lambda x: step(params, x)


def feedforward_step(ffn: FeedForward):
  """glam's FeedForward as the model calls it (x [groups, tokens, d_model]), for reference."""
  graphdef, params = nnx.split(ffn)

  def loss(params, x):
    y, _, _ = nnx.merge(graphdef, params)(x, train_ctx())
    return jnp.mean(jnp.square(y))

  step = jax.jit(jax.grad(loss, (0, 1)))
  return lambda x: step(params, x)


def interleaved_minimums(steps: dict, x, reps: int) -> tuple[dict, dict]:
  """Least wall-clock and least process CPU seconds per step (the least disturbed runs). On a shared
  machine the CPU-time ratio is the steadier of the two (waiting for a core costs no CPU time)."""
  for step in steps.values():  # compile and warm up
    jax.block_until_ready(step(x))
    jax.block_until_ready(step(x))
  wall = {name: [] for name in steps}
  cpu = {name: [] for name in steps}
  for _ in range(reps):
    for name, step in steps.items():
      start, start_cpu = time.perf_counter(), time.process_time()
      jax.block_until_ready(step(x))
      wall[name].append(time.perf_counter() - start)
      cpu[name].append(time.process_time() - start_cpu)
  return {name: min(t) for name, t in wall.items()}, {name: min(t) for name, t in cpu.items()}


def dispatcher_names(size: dict, only_dispatchers=None) -> list[str]:
  names = [n for n in DISPATCHERS if n != "dropless_ragged_dot" or size["experts"] <= RAGGED_DOT_MAX_EXPERTS]
  return [n for n in names if only_dispatchers is None or n in only_dispatchers]


def bench(size: dict, reps: int, only_dispatchers=None) -> list[dict]:
  tokens, d_model, num_experts, k, hidden = (size[n] for n in ("tokens", "d_model", "experts", "k", "hidden"))
  x = jax.random.normal(jax.random.key(0), (tokens // size["group"], size["group"], d_model))
  experts = Experts(d_model, num_experts, d_ff=hidden, activation="swiglu", rngs=nnx.Rngs(0))
  routing = fixed_routing(x, num_experts, k)
  expert_choice = fixed_expert_choice(x, num_experts, k)
  ffn = FeedForward(d_model, d_ff=k * hidden, activation="swiglu", rngs=nnx.Rngs(0))
  steps = {"dense": dense_step(ffn), "feedforward": feedforward_step(ffn)}
  names = dispatcher_names(size, only_dispatchers)
  for name in names:
    steps[name] = moe_step(DISPATCHERS[name][0], experts, expert_choice if name in EXPERT_CHOICE else routing)
  best, best_cpu = interleaved_minimums(steps, x, reps)
  load = jnp.bincount(routing.expert_index.reshape(-1), length=num_experts)
  rows = []
  for name in names:
    _, target, note = DISPATCHERS[name]
    row = dict(size, dispatcher=name, moe_ms=round(best[name] * 1e3, 1),
               dense_ms=round(best["dense"] * 1e3, 1),
               glam_feedforward_ms=round(best["feedforward"] * 1e3, 1),
               ratio=round(best[name] / best["dense"], 3),
               cpu_time_ratio=round(best_cpu[name] / best_cpu["dense"], 3),
               target=target, note=note,
               max_expert_load=round(1 / num_experts if name in EXPERT_CHOICE else float(load.max() / load.sum()), 4),
               device=jax.devices()[0].device_kind, dtype="float32", reps=reps, pid=os.getpid(),
               matmul_backend=resolve_backend(jnp.float32))
    rows.append(row)
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument("--reps", type=int, default=7)
  parser.add_argument("--only", type=int, default=None, help="index into the sizes that --size picks")
  parser.add_argument("--dispatchers", default=None,
                      help=f"comma-separated names to time (default: all of {','.join(DISPATCHERS)})")
  parser.add_argument("--in_process", action="store_true",
                      help="time every dispatcher in this process (default: a process per size and dispatcher)")
  parser.add_argument("--size", choices=["issue", "test"], default="issue",
                      help="issue: the three sizes of SIZES (the issue's shape first); test: one tiny size (for this "
                           "script's test)")
  parser.add_argument("--gin", action="append", default=[], help="a gin binding, e.g. matmul.backend='xla' (repeatable)")
  args = parser.parse_args(argv)
  config.parse([], args.gin)
  only_dispatchers = None if args.dispatchers is None else args.dispatchers.split(",")
  for name in only_dispatchers or ():
    if name not in DISPATCHERS:
      parser.error(f"--dispatchers: unknown {name!r}; expected names from {list(DISPATCHERS)}")
  sizes = TEST_SIZES if args.size == "test" else SIZES
  for i, size in enumerate(sizes):
    if args.only is not None and i != args.only:
      continue
    if args.in_process:
      for row in bench(size, args.reps, only_dispatchers):
        print(json.dumps(row), flush=True)
      continue
    for name in dispatcher_names(size, only_dispatchers):
      subprocess.run([sys.executable, __file__, "--in_process", "--only", str(i), "--dispatchers", name,
                      "--reps", str(args.reps), "--size", args.size, *[f"--gin={b}" for b in args.gin]],
                     check=True)  # its JSON line goes straight to our stdout


if __name__ == "__main__":
  reexec_with_huge_pages()  # as `glam` does: malloc on huge pages unless GLAM_HUGE_PAGES=0
  main()

"""Where glam's train step loses to the peer: the same pieces timed in JAX (XLA:CPU) and PyTorch.

  python scripts/bench_peer_parts.py --peer_python=/path/to/peer-venv/bin/python [--rounds 3]

Each piece at the peer race's shape (scripts/bench_vs_peer.py: batch 8 x 256, d_model 512, 8 heads
of 64, 8 SwiGLU experts of 1024 with 512 rows each (the balanced top-2 load), vocab 8192, float32):

  matmul_2d        [2048, 512] @ [512, 1024], forward only: the raw kernel
  experts_fwd_bwd  one layer's experts as batched matmuls, forward + backward
  attention_fwd_bwd the causal attention core softmax(q k^T) v, forward + backward (glam: as the
                   model runs it, 4 causal blocks and the hand-written gradient; PyTorch:
                   scaled_dot_product_attention with is_causal)
  logits_ce        [2048, 512] @ [512, 8192] logits and cross-entropy, forward + backward
  adamw            one AdamW update of 62.9 M float32 parameters (the model's size), as a flat array

Rounds alternate the two frameworks; each keeps its least time over the rounds (load from other
jobs only slows a run down). Prints one JSON line per piece with both times and their ratio.
"""
import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
import bench_common  # noqa: F401  (applies GLAM_RETAIN_HOST_MEMORY before JAX starts)
import jax
import jax.numpy as jnp

from glam.layers.attention import attend_causal_blocks
from glam.train.huge_pages import reexec_with_huge_pages

PARAMS = 62_935_552  # the peer-race model's parameter count (glam and the peer agree)
E, C, M, F, B, H, L, D, V = 8, 512, 512, 1024, 8, 8, 256, 64, 8192

TORCH_PARTS = r"""
import json, sys, time, torch
torch.set_num_threads(int(sys.argv[1])); reps = int(sys.argv[2])
E, C, M, F, B, H, L, D, V, P = 8, 512, 512, 1024, 8, 8, 256, 64, 8192, 62_935_552
g = torch.Generator().manual_seed(0)
r = lambda *s: (torch.randn(*s, generator=g) * 0.05)
def best(f):
  f(); ts = []
  for _ in range(reps):
    t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
  return min(ts)
a, b = r(2048, 512), r(512, 1024)
x, wi, wg, wo = r(E, C, M).requires_grad_(), r(E, M, F).requires_grad_(), r(E, M, F).requires_grad_(), r(E, F, M).requires_grad_()
def experts():
  h = torch.nn.functional.silu(torch.bmm(x, wg)) * torch.bmm(x, wi)
  torch.bmm(h, wo).square().sum().backward()
q, k, v = r(B, H, L, D).requires_grad_(), r(B, H, L, D).requires_grad_(), r(B, H, L, D).requires_grad_()
def attention():
  torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).square().sum().backward()
rows, kernel, targets = r(2048, 512).requires_grad_(), r(512, V).requires_grad_(), torch.randint(0, V, (2048,), generator=g)
def logits_ce():
  torch.nn.functional.cross_entropy(rows @ kernel, targets).backward()
p = torch.nn.Parameter(r(P)); p.grad = r(P); opt = torch.optim.AdamW([p], lr=1e-4)
print(json.dumps({"matmul_2d": best(lambda: a @ b), "experts_fwd_bwd": best(experts),
                  "attention_fwd_bwd": best(attention), "logits_ce": best(logits_ce),
                  "adamw": best(opt.step), "threads": torch.get_num_threads()}))
"""


def glam_parts():
  """name -> a function that runs the piece once and waits for it."""
  keys = iter(jax.random.split(jax.random.key(0), 16))
  r = lambda *s: jax.random.normal(next(keys), s) * 0.05
  a, b = r(2048, 512), r(512, 1024)
  matmul = jax.jit(lambda a, b: a @ b)  # [2048, 1024]

  def expert_loss(x, wi, wg, wo):
    hidden = jax.nn.silu(jnp.einsum("ecm,emf->ecf", x, wg)) * jnp.einsum("ecm,emf->ecf", x, wi)  # [E, C, F]
    return jnp.sum(jnp.square(jnp.einsum("ecf,efm->ecm", hidden, wo)))  # [E, C, M]

  experts = jax.jit(jax.grad(expert_loss, argnums=(0, 1, 2, 3)))
  expert_args = (r(E, C, M), r(E, M, F), r(E, M, F), r(E, F, M))
  mask = jnp.broadcast_to(jnp.tril(jnp.ones((L, L), bool)), (B, 1, L, L))
  attention = jax.jit(jax.grad(
      lambda q, k, v: jnp.sum(jnp.square(attend_causal_blocks(q * D ** -0.5, k, v, mask, None, blocks=4))),
      argnums=(0, 1, 2)))
  qkv = (r(B, H, L, D), r(B, H, L, D), r(B, H, L, D))
  targets = jax.random.randint(next(keys), (2048,), 0, V)

  def ce_loss(rows, kernel):
    logits = rows @ kernel  # [2048, vocab]
    target_logit = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - target_logit)

  logits_ce = jax.jit(jax.grad(ce_loss, argnums=(0, 1)))
  ce_args = (r(2048, 512), r(512, V))

  def adamw(p, g, m, v, lr=1e-4, b1=0.9, b2=0.999, eps=1e-8, decay=0.01, count=10):
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    update = (m / (1 - b1 ** count)) / (jnp.sqrt(v / (1 - b2 ** count)) + eps) + decay * p
    return p - lr * update, m, v

  adam = jax.jit(adamw, donate_argnums=(0, 2, 3))
  state = {"p": r(PARAMS), "m": jnp.zeros(PARAMS), "v": jnp.zeros(PARAMS)}
  grad = r(PARAMS)

  def adam_step():
    state["p"], state["m"], state["v"] = adam(state["p"], grad, state["m"], state["v"])
    return state["p"]

  return {"matmul_2d": lambda: matmul(a, b), "experts_fwd_bwd": lambda: experts(*expert_args),
          "attention_fwd_bwd": lambda: attention(*qkv), "logits_ce": lambda: logits_ce(*ce_args),
          "adamw": adam_step}


def least_time(fn, reps: int) -> float:
  jax.block_until_ready(fn())
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return min(times)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--peer_python", required=True, help="python of a venv with torch")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--reps", type=int, default=5, help="timed runs per piece per round (least kept)")
  args = parser.parse_args()
  parts = glam_parts()
  best_glam = {name: float("inf") for name in parts}
  best_peer = dict(best_glam)
  threads = None
  for _ in range(args.rounds):
    out = subprocess.run([args.peer_python, "-c", TORCH_PARTS, str(os.cpu_count()), str(args.reps)],
                         capture_output=True, text=True, check=True).stdout
    peer = json.loads(out.strip().splitlines()[-1])
    threads = peer.pop("threads")
    for name, fn in parts.items():
      best_glam[name] = min(best_glam[name], least_time(fn, args.reps))
      best_peer[name] = min(best_peer[name], peer[name])
  for name in parts:
    print(json.dumps({"part": name, "glam_ms": round(best_glam[name] * 1e3, 2),
                      "peer_ms": round(best_peer[name] * 1e3, 2),
                      "glam_over_peer_time": round(best_glam[name] / best_peer[name], 3),
                      "peer_threads": threads, "rounds": args.rounds, "reps": args.reps}), flush=True)


if __name__ == "__main__":
  reexec_with_huge_pages()  # as `glam` does: malloc on huge pages unless GLAM_HUGE_PAGES=0
  main()

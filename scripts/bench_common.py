"""Shared helpers for the benchmarks: random batches and timing of a compiled step."""
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from glam.train.host_memory import retain_freed_host_memory

# As `glam` does: honours GLAM_RETAIN_HOST_MEMORY=1 (glam/train/host_memory.py). This runs before
# any JAX computation, since the benchmarks import this module first. (The scripts restart with
# huge-page malloc in their `__main__` blocks, not here: importing this module, as tests do, must
# not replace the importing process.)
HOST_MEMORY_RETAINED = retain_freed_host_memory()


def random_batch(batch: int, seq_len: int, vocab: int, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  targets = rng.integers(3, vocab, (batch, seq_len), dtype=np.int32)
  inputs = np.concatenate([np.zeros((batch, 1), np.int32), targets[:, :-1]], axis=1)
  return {"inputs": inputs, "targets": targets,
          "segment_ids": np.ones((batch, seq_len), np.int32),
          "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch, seq_len)).copy(),
          "loss_weights": np.ones((batch, seq_len), np.float32),
          "domain_ids": np.zeros((batch, seq_len), np.int32)}


def time_steps(step, state, batch, steps: int) -> tuple[float, float, object]:
  """Compiles (timed separately), then returns (compile_s, median step seconds, final state)."""
  start = time.perf_counter()
  state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - start
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  return compile_s, statistics.median(times), state

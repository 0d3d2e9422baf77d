"""Opt-in: keep freed host memory in the process, so that a CPU train step stops page-faulting.

Why: XLA:CPU allocates each execution's temporaries as one block (about 1 GB for the peer-race
step in scripts/bench_vs_peer.py) and frees it when the step ends. glibc serves a block that large
with a fresh mmap and returns it to the kernel on free, so every step the kernel zero-fills some
250,000 new 4 KiB pages: measured here, 0.4 s of system time in a 1.7 s step. With one malloc
arena, no mmap and no trimming, glibc hands the same pages back each step, and the step took
about 4% less wall time. The heap still grows now and then until it fits the step's layout of
allocations (the step that grows it varies from run to run, sometimes the tenth); after that a
step faults in nothing.

Why opt-in: with a single arena, XLA's compiler threads contend for the malloc lock, and that
step compiled in 7.4 s instead of 5.0 s. That pays off only for runs of hundreds of steps, not for
tests or the demo. Also, memory the process frees is not returned to the system until it exits.

Since `glam` runs malloc on transparent huge pages by default (huge_pages.py), which already
cuts those faults 100-fold, what retention adds on top was within the machine's noise (from 2%
slower to 8% faster on the race step, 2026-11-25). Turn it on with the environment variable
GLAM_RETAIN_HOST_MEMORY=1. `glam` applies it first thing, before XLA starts its thread pools (a thread keeps the arena it first allocated from);
the benchmarks in scripts/ do the same.
"""
import ctypes
import ctypes.util
import os
import platform

# mallopt parameters, from glibc's malloc.h
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
_TRIM_NEVER = 2**31 - 1  # mallopt takes an int: the largest trim threshold it can express
ENV_VAR = "GLAM_RETAIN_HOST_MEMORY"
_applied = False


def retain_freed_host_memory() -> bool:
  """When GLAM_RETAIN_HOST_MEMORY=1, tells glibc's malloc to keep freed memory for reuse. Returns
  whether it is in effect (always False on other platforms and C libraries)."""
  global _applied
  if _applied:
    return True
  value = os.environ.get(ENV_VAR, "0")
  if value not in ("0", "1"):
    raise ValueError(f"environment variable {ENV_VAR}={value!r}: expected 0 or 1")
  if value == "0" or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return False
  libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
  settings = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, _TRIM_NEVER))
  _applied = all(libc.mallopt(parameter, ctypes.c_int(value)) == 1 for parameter, value in settings)
  return _applied

"""GLAM_RETAIN_HOST_MEMORY=1: XLA:CPU's per-step temporaries stop page-faulting on every step."""
import json
import os
import platform
import subprocess
import sys

import pytest

# A tiny train step whose saved activations ([4096, 2048] float32, 32 MiB) are allocated and
# freed by every call; prints whether retention is on, the minor page faults of each call and the
# resident pages after it.
PROBE = """
import json, resource
from glam.train.host_memory import retain_freed_host_memory
applied = retain_freed_host_memory()
import jax, jax.numpy as jnp
def loss(w, x):
  return jnp.sum(jnp.tanh(jnp.tanh(x @ w) @ w.T) ** 2)
step = jax.jit(jax.grad(loss))
w, x = jnp.full((1024, 2048), 0.01), jnp.full((4096, 1024), 0.02)
faults, resident = [], []
for _ in range(12):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  step(w, x).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
  resident.append(int(open("/proc/self/statm").read().split()[1]))
print(json.dumps({"applied": applied, "faults": faults, "resident": resident}))
"""
ACTIVATION_PAGES = 4096 * 2048 * 4 // 4096


def probe(setting: str | None) -> dict:
  env = {k: v for k, v in os.environ.items() if k not in ("GLAM_RETAIN_HOST_MEMORY", "GLIBC_TUNABLES")}
  env["XLA_FLAGS"] = ""  # one device, as a plain run
  if setting is not None:
    env["GLAM_RETAIN_HOST_MEMORY"] = setting
  out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def refaults(run: dict) -> int:
  """Pages faulted in after the first step that did not grow the process: pages it had given
  back to the kernel and faulted in again."""
  grown = max(run["resident"][-1] - run["resident"][0], 0)
  return sum(run["faults"][1:]) - grown


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc malloc only")
def test_retention_stops_per_step_page_faults_and_is_opt_in():
  default, retained = probe(None), probe("1")
  assert not default["applied"] and retained["applied"]
  # without it every step faults its activations in afresh ...
  assert min(default["faults"][2:]) > ACTIVATION_PAGES / 2
  # ... with it, freed pages stay in the process. Its heap still grows for a while, until it fits
  # the step's layout of allocations (which steps grow it varies from run to run, so counting
  # fault-free steps is flaky), but almost every page it faults in is a page it keeps.
  assert refaults(retained) < refaults(default) / 5


def test_bad_setting_names_the_variable():
  out = subprocess.run([sys.executable, "-c", "from glam.train.host_memory import retain_freed_host_memory as r; r()"],
                       capture_output=True, text=True, env={**os.environ, "GLAM_RETAIN_HOST_MEMORY": "yes"})
  assert out.returncode != 0 and "GLAM_RETAIN_HOST_MEMORY='yes': expected 0 or 1" in out.stderr

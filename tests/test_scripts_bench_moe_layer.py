"""scripts/bench_moe_layer.py: one process per dispatcher, each timing it beside its own dense FFN."""
import json
import os
import subprocess
import sys

from cli_helpers import REPO, run_script


def test_each_dispatcher_is_timed_in_its_own_process_against_the_dense_ffn():
  proc = run_script("scripts/bench_moe_layer.py", "--size", "test", "--reps", "1",
                    "--dispatchers", "dropless,capacity_1.25")
  rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
  # the order of the dispatcher table, not of the flag; one line each
  assert [row["dispatcher"] for row in rows] == ["capacity_1.25", "dropless"]
  assert [row["target"] for row in rows] == [1.3, 1.2]  # the targets
  assert rows[0]["pid"] != rows[1]["pid"]  # each timed in a process of its own
  for row in rows:
    assert (row["tokens"], row["d_model"], row["experts"], row["k"], row["hidden"]) == (64, 16, 4, 2, 32)
    assert row["moe_ms"] > 0 and row["dense_ms"] > 0
    # the ratio is of the unrounded times, printed to 0.1 ms: within that rounding of moe_ms / dense_ms
    moe, dense = row["moe_ms"], row["dense_ms"]
    assert (moe - 0.05) / (dense + 0.05) - 1e-3 <= row["ratio"] <= (moe + 0.05) / max(dense - 0.05, 1e-3) + 1e-3
    assert 1 / 4 <= row["max_expert_load"] <= 1  # the busiest expert's share of the top-2 assignments


def test_an_unknown_dispatcher_is_refused_by_name():
  proc = subprocess.run([sys.executable, "scripts/bench_moe_layer.py", "--size", "test", "--dispatchers", "capacity_2"],
                        cwd=REPO, env=dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu"), capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 2
  assert "--dispatchers: unknown 'capacity_2'" in proc.stderr and "dropless_padded" in proc.stderr

"""scripts/profile_step.py end to end: XLA:CPU's per-op trace events still arrive and get grouped."""
import json

from cli_helpers import run_script


def test_profile_step_splits_a_traced_step_by_phase_and_kind():
  # One MoE layer with narrow experts: the peer-race shape otherwise, so it compiles in seconds.
  proc = run_script("scripts/profile_step.py", "--gin=DecoderLM.num_blocks=1", "--gin=MoeLayer.d_ff=64",
                    "--warmup=1", "--steps=1", "--top=3")
  lines = proc.stdout.strip().splitlines()
  header = json.loads(lines[0])
  assert header["busy_ms_per_step"] > 0 and header["gin"] == ["DecoderLM.num_blocks=1", "MoeLayer.d_ff=64"]
  table = dict(line.rsplit(None, 1) for line in lines[3:lines.index("", 3)])
  table = {key.strip(): float(ms) for key, ms in table.items()}
  # the model's matmuls are found in both passes, and the groups add up to the busy time
  assert table["forward/matmul"] > 0 and table["backward/matmul"] > 0
  assert abs(sum(table.values()) - header["busy_ms_per_step"]) < 0.1 * len(table)
  top_ops = lines[lines.index("", 3) + 2:]
  assert len(top_ops) == 3 and all("/" in row for row in top_ops)

"""Where the peer-race train step's time goes, op by op (XLA:CPU), grouped by phase and kind.

  python scripts/profile_step.py [--dispatcher dropless] [--steps 2] [--gin=DecoderLM.scan_layers=False]

Builds glam's step at the shape of scripts/bench_vs_peer.py, warms it up, traces `--steps` steps
with the JAX profiler and prints (glam/report/op_profile.py) the busy wall time per step split by
phase (forward, backward, update) and kind (matmul, data movement, elementwise, sort), then the
costliest ops with the JAX operation each came from. Tracing slows the step a little (about 5-10%
here): read the shares, not the absolute times. Honours GLAM_RETAIN_HOST_MEMORY=1.
"""
import os

# XLA:CPU records per-op trace events only with this flag, read when the backend starts.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true").strip()

import argparse  # noqa: E402
import glob  # noqa: E402
import gzip  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from bench_common import time_steps  # noqa: E402  (applies GLAM_RETAIN_HOST_MEMORY first)
import jax  # noqa: E402

from bench_vs_peer import DISPATCHERS, build_glam_step  # noqa: E402
from glam.report.op_profile import summarize  # noqa: E402
from glam.train.huge_pages import reexec_with_huge_pages  # noqa: E402


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--dispatcher", default="dropless", choices=sorted(DISPATCHERS))
  parser.add_argument("--steps", type=int, default=2, help="traced steps")
  parser.add_argument("--warmup", type=int, default=4, help="untraced steps first (compile, page faults)")
  parser.add_argument("--top", type=int, default=15, help="how many of the costliest ops to list")
  parser.add_argument("--gin", action="append", default=[], help="an extra gin binding for glam (repeatable)")
  args = parser.parse_args()
  step, state, batch, _ = build_glam_step(args.dispatcher, args.gin)
  compile_s, step_s, state = time_steps(step, state, batch, args.warmup)
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir):
      for _ in range(args.steps):
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
    trace_files = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
    if not trace_files:
      raise SystemExit(f"profile_step: the profiler wrote no *.trace.json.gz under {trace_dir}")
    with gzip.open(trace_files[0]) as f:
      events = json.load(f)["traceEvents"]
  hlo = step.lower(state, batch).compile().as_text()
  summary = summarize(events, hlo, args.steps, args.top)
  print(json.dumps({"dispatcher": args.dispatcher, "gin": args.gin, "untraced_step_s": round(step_s, 3),
                    "compile_s": round(compile_s, 1), "busy_ms_per_step": summary["busy_ms_per_step"]}))
  print(f"\n{'phase/kind':32s} ms/step")
  for key, ms in summary["by_phase_and_kind_ms"].items():
    print(f"{key:32s} {ms:8.1f}")
  print(f"\n{'op':40s} {'ms/step':>8s}  phase/kind, from JAX operation")
  for row in summary["top_ops_ms"]:
    print(f"{row['op']:40s} {row['ms']:8.1f}  {row['phase']}/{row['kind']}, {row['jax']}")


if __name__ == "__main__":
  reexec_with_huge_pages()  # as `glam` does: malloc on huge pages unless GLAM_HUGE_PAGES=0
  main()

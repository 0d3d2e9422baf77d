"""Where a compiled step's time goes on XLA:CPU: wall time per HLO op, from a profiler trace.

With XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true (set before JAX starts), XLA:CPU records one
trace event per op it executes. Independent ops run at the same time on the thread pool, so adding
up their durations counts some wall time twice; here each moment of wall time is split evenly
among the ops running then, so the shares add up to the time the step kept the CPU busy.

Ops are grouped by phase, from the op_name metadata JAX writes into each HLO instruction
("transpose(jvp(...))" is the backward pass, "jvp(...)" the forward, anything else the update and
metrics), and by kind, from the op's name: "matmul" (dots, the sgemm custom calls of glam/kernels, and
YNNPACK fusions that hold one),
"data movement" (slices, concatenations, copies, pads, broadcasts, gathers, transposes),
"elementwise" (every other fusion: activations, the optimizer's arithmetic, reductions), "sort".

Caveats: loops ("while") are containers whose body ops have events of their own, so only the body
ops count (the loop's own overhead is left out). Dots that XLA hands to Eigen instead of YNNPACK
record less time than their FLOPs need; the rest of their work overlaps, and is counted in, the
ops running beside them.
"""
import collections
import re

CONTAINERS = re.compile(r"^(while|conditional|call)(\.\d+)?$")
MOVEMENT = {"slice", "dynamic-slice", "dynamic-update-slice", "concatenate", "copy", "pad", "broadcast",
            "gather", "scatter", "transpose", "bitcast", "reshape", "select"}
# trace events that are not ops: the executor, Python frames, thread-pool waits, the jitted call
NOT_OPS = ("ThunkExecutor", "$", "SlinkyThreadPool", "PjitFunction", "TfrtCpu", "Execute")


def op_wall_shares(events: list[dict]) -> dict[str, float]:
  """Complete ("X") trace events -> {op name: microseconds of wall time}, concurrent ops sharing."""
  ops = [e for e in events if e.get("ph") == "X" and not e["name"].startswith(NOT_OPS)
         and not CONTAINERS.match(e["name"])]
  edges = sorted([(e["ts"], 1, i) for i, e in enumerate(ops)] + [(e["ts"] + e["dur"], -1, i) for i, e in enumerate(ops)])
  running, shares, last = set(), collections.Counter(), None
  for time, change, index in edges:
    if running and last is not None:
      for other in running:
        shares[ops[other]["name"]] += (time - last) / len(running)
    if change > 0:
      running.add(index)
    else:
      running.discard(index)
    last = time
  return dict(shares)


def op_metadata(hlo_text: str) -> dict[str, tuple[str, str]]:
  """Compiled HLO text -> {instruction name: (op_name metadata, the fused computation it calls)}."""
  found = {}
  for line in hlo_text.splitlines():
    match = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = ", line)
    if match and match.group(1) not in found:
      op_name = re.search(r'op_name="([^"]*)"', line)
      calls = re.search(r"calls=%?([\w.\-]+)", line)
      found[match.group(1)] = (op_name.group(1) if op_name else "", calls.group(1) if calls else "")
  return found


def phase_of(op_name: str) -> str:
  if "transpose(jvp" in op_name:
    return "backward"
  if "jvp(" in op_name:
    return "forward"
  return "update"


def kind_of(name: str, fused_computations: dict[str, str] | None = None, calls: str = "") -> str:
  """The kind of op `name` (an HLO instruction name such as "bitcast_dynamic-update-slice_fusion.4")."""
  base = re.sub(r"\.\d+$", "", name)
  if base.startswith(("dot", "convolution", "ffi_call")):  # glam's custom calls are all sgemms (glam/kernels)
    return "matmul"
  if base.startswith("ynn_fusion"):  # YNNPACK fusions hold a dot (or a reduction)
    body = (fused_computations or {}).get(calls, "")
    return "matmul" if not body or " dot(" in body else "elementwise"
  if base.startswith("sort"):
    return "sort"
  parts = re.sub(r"^wrapped_|_fusion$", "", base).split("_")
  return "data movement" if parts and all(part in MOVEMENT for part in parts) else "elementwise"


def fused_computation_bodies(hlo_text: str) -> dict[str, str]:
  """{computation name: its text} for the computations defined in compiled HLO text."""
  bodies, name, lines = {}, None, []
  for line in hlo_text.splitlines():
    header = re.match(r"%?([\w.\-]+) \(.*\) -> .* \{$", line)
    if header:
      name, lines = header.group(1), []
    elif name is not None and line.startswith("}"):
      bodies[name], name = "\n".join(lines), None
    elif name is not None:
      lines.append(line)
  return bodies


def summarize(events: list[dict], hlo_text: str, steps: int, top: int = 15) -> dict:
  """Milliseconds per step by phase and kind, and the `top` ops, from a trace of `steps` steps."""
  shares = op_wall_shares(events)
  metadata, bodies = op_metadata(hlo_text), fused_computation_bodies(hlo_text)
  table = collections.Counter()
  rows = []
  for name, micros in shares.items():
    op_name, calls = metadata.get(name, ("", ""))
    phase, kind = phase_of(op_name), kind_of(name, bodies, calls)
    table[(phase, kind)] += micros
    rows.append((micros, name, phase, kind, op_name))
  per_step = lambda micros: round(micros / steps / 1e3, 2)
  rows.sort(reverse=True)
  return {"busy_ms_per_step": per_step(sum(shares.values())),
          "by_phase_and_kind_ms": {f"{phase}/{kind}": per_step(micros) for (phase, kind), micros in
                                   sorted(table.items(), key=lambda item: -item[1])},
          "top_ops_ms": [{"op": name, "ms": per_step(micros), "phase": phase, "kind": kind, "jax": op_name[-90:]}
                         for micros, name, phase, kind, op_name in rows[:top]]}

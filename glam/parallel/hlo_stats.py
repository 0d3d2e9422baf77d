"""Collectives in compiled HLO text: how many of each kind, and the bytes their results hold."""
import math
import re

COLLECTIVES = ("all-to-all", "all-gather", "all-reduce", "reduce-scatter", "collective-permute")
DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4,
               "f32": 4, "s64": 8, "u64": 8, "f64": 8}
# `%name = <result type> <op>(` or `<op>-start(` (async pairs count once, at the start).
_INSTRUCTION = re.compile(r"=\s*(?P<type>\(.*?\)|[a-z0-9]+\[[^\]]*\](?:\{[^}]*\})?)\s+(?P<op>"
                          + "|".join(COLLECTIVES) + r")(?:-start)?\(")
_ARRAY = re.compile(r"\b(" + "|".join(DTYPE_BYTES) + r")\[([\d,]*)\]")


def result_bytes(type_text: str) -> int:
  """Bytes of an HLO result type: an array `f32[8,128]{1,0}` or a tuple of them."""
  total = 0
  for dtype, dims in _ARRAY.findall(type_text):
    total += DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
  return total


def collective_stats(hlo_text: str) -> dict[str, dict[str, int]]:
  """{kind: {"count", "bytes"}} for every collective kind (zeros included), per device.

  Counts are static: an op inside a while loop (e.g. the scanned block stack) appears once.
  """
  stats = {kind: {"count": 0, "bytes": 0} for kind in COLLECTIVES}
  for match in _INSTRUCTION.finditer(hlo_text):
    entry = stats[match.group("op")]
    entry["count"] += 1
    entry["bytes"] += result_bytes(match.group("type"))
  return stats

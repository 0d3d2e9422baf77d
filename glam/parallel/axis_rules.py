"""Logical axis rules: parameter and activation dimension names -> mesh axes.

Layers name their dimensions (`nnx.Param(..., logical_axes=("embed", "mlp"))`); one table, bound
by gin, says which mesh axes each name is split over. A mesh axis is used at most once per array
(the first dimension that asks for it wins) and a dimension that its mesh axes do not divide is
kept whole, except the expert dimensions (MoE experts, MoDE domain experts), where that is a
configuration error.
"""
import math
from typing import Sequence

import gin
from jax.sharding import PartitionSpec

from glam.config import ConfigError

# What a MaxText / T5X user expects: batch over every data-like axis, weights' embed over fsdp,
# Megatron tensor parallelism over mlp / heads / vocab, experts over expert, layers never split.
# MoDE's domain experts (glam.models.mode) stay whole on every device unless a run binds
# `axis_rules.rules = @mode_axis_rules()` with `mode_axis_rules.domain_expert = "expert"`.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp", "expert")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("vocab", "tensor"),
    ("expert", "expert"),
    ("domain_expert", None),
    ("kv", None),
    ("layers", None),
    ("length", None),
    ("relpos_buckets", None),
)

# Dimensions whose rule is a placement promise (expert k lives on slice k), not a best effort:
# an uneven split is a configuration error naming the binding, never a silent replication.
SPLIT_OR_FAIL = {"expert": "num_experts", "domain_expert": "MoDELM.num_domains"}


class UnevenSplitError(ConfigError):
  """An expert dimension that its mesh axes do not divide (callers may choose to keep it whole)."""


@gin.configurable
def axis_rules(rules: Sequence = DEFAULT_RULES) -> dict[str, tuple[str, ...]]:
  """The rules table as {logical name: mesh axes}.

  Args:
    rules: (logical name, mesh axis | (mesh axes...) | None) pairs; DEFAULT_RULES maps batch ->
      (data, fsdp, expert), embed -> fsdp, mlp / heads / vocab -> tensor, expert -> expert, and
      keeps domain_expert (MoDE), kv, layers, length and relpos_buckets whole. Override all of it in gin, e.g.
      `axis_rules.rules = (("batch", ("data", "fsdp", "expert")), ("embed", None), ...)`.
  """
  table = {}
  for entry in rules:
    if not (isinstance(entry, (tuple, list)) and len(entry) == 2 and isinstance(entry[0], str)):
      raise ConfigError(f"axis_rules.rules: entry {entry!r} must be (logical name, mesh axes or None)")
    name, axes = entry
    table[name] = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
  return table


def spec_for(logical_axes: Sequence[str | None], shape: Sequence[int], mesh, rules: dict, where: str = "") -> PartitionSpec:
  """The PartitionSpec of an array with these logical dimension names on `mesh`.

  Unknown names are an error naming `where`; mesh axes of size 1 are left out (they split nothing).
  """
  if len(logical_axes) != len(shape):
    raise ValueError(f"{where}: logical axes {tuple(logical_axes)} do not match shape {tuple(shape)}")
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
  used, spec = set(), []
  for name, dim in zip(logical_axes, shape):
    if name is None:
      spec.append(None)
      continue
    if name not in rules:
      raise ConfigError(f"{where}: logical axis {name!r} has no entry in axis_rules.rules "
                        f"(known: {sorted(rules)})")
    axes = [axis for axis in rules[name] if axis not in used and sizes.get(axis, 1) > 1]
    shards = math.prod(sizes[axis] for axis in axes)
    if name in SPLIT_OR_FAIL and dim % shards:
      raise UnevenSplitError(f"{where}: {SPLIT_OR_FAIL[name]}={dim} is not divisible by the mesh's "
                        f"{' x '.join(axes)} axis of size {shards}")
    while axes and dim % math.prod(sizes[axis] for axis in axes):
      axes.pop()  # keep the dimension whole rather than split it unevenly
    used.update(axes)
    spec.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
  return PartitionSpec(*spec)

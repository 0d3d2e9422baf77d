"""Freezing: parameters (or slices of the expert axis) whose updates are zeroed, so they stay bit-identical.

Gin interface (other configs rely on exactly these names):

  freeze.patterns = ["blocks/moe_1/router/.*", "embed/.*"]   # regexes, re.fullmatch'ed against
                                                              # '/'-joined parameter paths
  freeze.first_experts = 4   # experts [0, 4) of every stacked expert weight and router columns [0, 4)

Parameter paths are those of the params dict, as `glam model summary --per_parameter` prints them,
e.g. `blocks/moe_1/experts/wi`, `blocks/moe_1/router/kernel`, `blocks/attn_0/query`, `embed/embedding`,
`logits_kernel`. Scanned blocks have one leading "layers" axis: a pattern freezes every layer.

`first_experts` masks single elements: every parameter with an "expert" logical axis (stacked expert
weights [layers, E, ...], router kernels [layers, d_model, E], router biases) gets updates zeroed at
expert indices < first_experts (Lifelong-MoE: old experts and old gating columns stay frozen).

How: `freeze_updates(optimizer, model)` wraps the optimizer; after the inner update it replaces the
frozen entries of the updates with -0.0 (x + (-0.0) == x bit for bit for every x, as in
skip_nonfinite_updates). The wrapper adds no optimizer state, so checkpoints of frozen and unfrozen
runs have the same layout. The optimizer still keeps statistics for frozen entries; they are unused.
"""
import re
import sys
from typing import NamedTuple, Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax

from glam.config import ConfigError, check
from glam.models.per_layer import PerLayer, is_per_layer
from glam.models.summary import parameter_rows


class FreezeSpec(NamedTuple):
  patterns: tuple[str, ...]
  first_experts: int

  def is_empty(self) -> bool:
    return not self.patterns and self.first_experts == 0


@gin.configurable
def freeze(patterns: Sequence[str] = (), first_experts: int = 0) -> FreezeSpec:
  """What to freeze (see the module docstring).

  Args:
    patterns: regexes matched with re.fullmatch against '/'-joined parameter paths; matching
      parameters are frozen entirely. () = none.
    first_experts: freeze experts [0, first_experts) of every parameter with an expert axis
      (Lifelong-MoE: the experts and gating columns of earlier stages). 0 = none.
  """
  if isinstance(patterns, str):
    patterns = (patterns,)
  for pattern in patterns:
    try:
      re.compile(pattern)
    except re.error as error:
      raise ConfigError(f"freeze.patterns: {pattern!r} is not a valid regex: {error}") from None
  check(first_experts >= 0, "freeze.first_experts", first_experts, "must be >= 0")
  return FreezeSpec(tuple(patterns), int(first_experts))


def frozen_masks(spec: FreezeSpec, model) -> dict[str, np.ndarray | bool]:
  """path -> True (whole parameter frozen) or a bool array broadcastable to it (frozen elements).

  `model` is the (abstract) model; parameters not frozen at all are absent. Raises ConfigError
  for a pattern that matches nothing or first_experts beyond a layer's expert count.
  """
  rows = parameter_rows(model)
  masks: dict[str, np.ndarray | bool] = {}
  for pattern in spec.patterns:
    matched = [path for path, *_ in rows if re.fullmatch(pattern, path)]
    if not matched:
      examples = ", ".join(path for path, *_ in rows[:6])
      raise ConfigError(f"freeze.patterns: {pattern!r} matches no parameter (paths look like {examples}, ...; "
                        "see `glam model summary --per_parameter`)")
    masks.update({path: True for path in matched})
  if spec.first_experts:
    expert_rows = [(path, shape, axes) for path, shape, axes, _ in rows if "expert" in axes]
    if not expert_rows:
      raise ConfigError(f"freeze.first_experts={spec.first_experts}: the model has no parameter with an expert axis")
    for path, shape, axes in expert_rows:
      axis = axes.index("expert")
      check(spec.first_experts <= shape[axis], "freeze.first_experts", spec.first_experts,
            f"{path} has only {shape[axis]} experts")
      if masks.get(path) is True:
        continue
      mask_shape = [1] * len(shape)
      mask_shape[axis] = shape[axis]
      masks[path] = (np.arange(shape[axis]) < spec.first_experts).reshape(mask_shape)
  return masks


def _path(key_path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in key_path)


def apply_masks(updates, masks: dict):
  """updates with frozen entries replaced by -0.0 (a no-op under optax.apply_updates). A PerLayer
  node (unrolled blocks' per-layer train state) takes its stacked parameter's mask, layer by layer."""
  def masked(update, mask):
    zero = jnp.array(-0.0, update.dtype)
    return jnp.full_like(update, zero) if mask is True else jnp.where(mask, zero, update)

  def one(key_path, update):
    mask = masks.get(_path(key_path))
    if mask is None:
      return update
    if is_per_layer(update):  # the mask's leading (layers) axis has size 1: every layer alike
      return PerLayer(masked(part, mask if mask is True else mask[0]) for part in update.slices)
    return masked(update, mask)
  return jax.tree_util.tree_map_with_path(one, updates, is_leaf=is_per_layer)


def freeze_updates(optimizer: optax.GradientTransformation, model,
                   spec: FreezeSpec | None = None) -> optax.GradientTransformation:
  """`optimizer` with the updates of frozen parameters zeroed (spec: the gin-bound `freeze()`)."""
  spec = freeze() if spec is None else spec
  if spec.is_empty():
    return optimizer
  masks = frozen_masks(spec, model)
  total = sum(count for *_, count in parameter_rows(model))
  frozen = sum(count if masks[path] is True else count * float(np.mean(masks[path]))
               for path, _, _, count in parameter_rows(model) if path in masks)
  print(f"glam: freezing {int(frozen):,} of {total:,} parameters (freeze.patterns={list(spec.patterns)}, "
        f"freeze.first_experts={spec.first_experts})", file=sys.stderr)

  def update(grads, state, params=None):
    updates, state = optimizer.update(grads, state, params)
    return apply_masks(updates, masks), state

  return optax.GradientTransformation(optimizer.init, update)

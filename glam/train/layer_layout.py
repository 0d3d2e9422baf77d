"""The train state of unrolled blocks, one array per layer (glam/models/per_layer.py says why).

`per_layer_layout` decides, from the model and the optimizer, whether the trainer may hold the
state that way, and returns the conversions both ways: in the per-layer layout, every array of
the stacked blocks, in the parameters and in the optimizer state that mirrors them, is a PerLayer
node of separate arrays. The optimizer's state for the per-layer parameters comes from
`optimizer.init` on them, so each of its arrays is either a stacked one split by layer or one that
does not depend on the layer count (Adafactor's placeholder for factored parameters): both are
mapped explicitly, and anything else keeps the stacked layout with a note on stderr.
"""
import sys
from typing import Any, NamedTuple

import jax
from jax.sharding import NamedSharding, PartitionSpec

from glam.models.per_layer import PerLayer, is_per_layer, split_layers


class LayerLayout(NamedTuple):
  """to_per_layer(state) and to_stacked(state) convert a whole train state ({"step", "params",
  "opt_state"}) on its mesh; `shardings` are the per-layer state's."""
  to_per_layer: Any
  to_stacked: Any
  shardings: Any


def per_layer_layout(model, optimizer, state: dict, shardings: dict | None = None) -> LayerLayout | None:
  """The per-layer layout for this run, or None where it keeps the stacked one: the blocks are
  scanned (DecoderLM.scan_layers), or the optimizer's state or the shardings do not split by layer.
  shardings: the stacked state's NamedShardings, or None (arrays where JAX puts them)."""
  if getattr(model, "scan_layers", True) or not hasattr(model, "num_blocks"):
    return None
  layers = model.num_blocks
  stacked = jax.eval_shape(lambda s: s, state)
  target = {**stacked, "params": jax.eval_shape(lambda p: split_layers(p, layers), stacked["params"])}
  target["opt_state"] = jax.eval_shape(optimizer.init, target["params"])
  try:
    jax.tree.map(lambda t, s: _check(t, s, layers), target, stacked, is_leaf=is_per_layer)
    target_shardings = None if shardings is None else jax.tree.map(
        lambda t, s, sh: _split_sharding(t, s, sh, layers), target, stacked, shardings, is_leaf=is_per_layer)
  except (ValueError, TypeError) as error:
    print(f"glam: unrolled blocks keep their stacked train state: {error}", file=sys.stderr)
    return None
  split = lambda state: jax.tree.map(lambda t, x: _split(t, x, layers), target, state, is_leaf=is_per_layer)
  stack = lambda state: jax.tree.map(_stack, target, stacked, state, is_leaf=is_per_layer)
  return LayerLayout(jax.jit(split, out_shardings=target_shardings),
                     jax.jit(stack, out_shardings=shardings), target_shardings)


def _slice_shape(target: PerLayer) -> tuple:
  shapes = {tuple(s.shape) for s in target.slices}
  if len(shapes) != 1:
    raise ValueError(f"per-layer arrays of different shapes {sorted(shapes)}")
  return shapes.pop()


def _check(target, stacked, layers: int) -> None:
  if is_per_layer(target):
    shape = _slice_shape(target)
    if tuple(stacked.shape) not in ((layers,) + shape, shape):
      raise ValueError(f"an array of shape {tuple(stacked.shape)} has per-layer arrays of shape {shape}")
  elif tuple(getattr(target, "shape", ())) != tuple(getattr(stacked, "shape", ())):
    raise ValueError(f"an array of shape {getattr(stacked, 'shape', None)} becomes {getattr(target, 'shape', None)}")


def _stacked_by_layer(target: PerLayer, stacked) -> bool:
  """Whether the stacked array holds one slice per layer (else it is shared: a placeholder)."""
  return tuple(stacked.shape) != _slice_shape(target)


def _split(target, x, layers: int):
  if not is_per_layer(target):
    return x
  if _stacked_by_layer(target, x):
    return PerLayer(x[layer] for layer in range(layers))
  return PerLayer([x] * layers)


def _stack(target, stacked, x):
  if not is_per_layer(target):
    return x
  return jax.numpy.stack(x.slices) if _stacked_by_layer(target, stacked) else x.slices[0]


def _split_sharding(target, stacked, sharding, layers: int):
  if not is_per_layer(target):
    return sharding
  if not _stacked_by_layer(target, stacked):
    return PerLayer([sharding] * layers)
  if not isinstance(sharding, NamedSharding):
    raise TypeError(f"a stacked array has sharding {sharding}, expected a NamedSharding")
  spec = tuple(sharding.spec) + (None,) * (len(stacked.shape) - len(sharding.spec))
  if spec[0] is not None:
    raise ValueError(f"the layers axis is sharded over mesh axes {spec[0]!r}")
  return PerLayer([NamedSharding(sharding.mesh, PartitionSpec(*spec[1:]))] * layers)

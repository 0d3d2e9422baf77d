"""Start a run from another run's parameters (fine-tuning, instruction tuning, MoDE composition).

`train.init_checkpoint` names a run directory (its latest checkpoint), a checkpoint directory
(`RUN/checkpoints`, its latest step) or one step directory (`RUN/checkpoints/1000`). Only the
parameters are read (on abstract shapes, nothing else is materialised); the step and the
optimizer state start fresh. The trainer uses it only when its own model_dir has no checkpoint,
so a fine-tuning run that is interrupted resumes from its own checkpoints.

The checkpoint must fit the model: same vocabulary (the fingerprint saved with it) and the same
parameter shapes. A model parameter absent from the checkpoint is an error unless its path
("blocks/moe_1/router/kernel", as `glam model summary --per_parameter` prints them) matches one of
`train.init_allow_missing` (regular expressions matched with `re.fullmatch`, as freeze.patterns
are, e.g. "blocks/moe_.*/router/.*"); those keep their fresh initialisation. A checkpoint parameter the model lacks is an error.
"""
import os
import re
import sys
from typing import Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp

from glam.config import ConfigError
from glam.train.checkpoint import CheckpointMismatchError, path_str

RUN_SUBDIR = "checkpoints"  # glam.train.trainer.CHECKPOINT_SUBDIR (not imported: no cycle)


def resolve(path: str) -> tuple[str, int | None]:
  """(checkpoint directory, step or None for the latest) named by `train.init_checkpoint`."""
  path = os.path.abspath(os.path.expanduser(path))
  if os.path.isdir(os.path.join(path, RUN_SUBDIR)):
    return os.path.join(path, RUN_SUBDIR), None
  if os.path.basename(path).isdigit() and os.path.isdir(os.path.join(path, "state")):
    return os.path.dirname(path), int(os.path.basename(path))
  if os.path.isdir(path) and any(name.isdigit() for name in os.listdir(path)):
    return path, None
  raise FileNotFoundError(f"train.init_checkpoint={path!r}: not a run directory (holding {RUN_SUBDIR}/), "
                          "a checkpoint directory or a checkpoint step directory")


def _registry():
  registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
  registry.add("state", ocp.args.PyTreeRestore)  # PyTree, not Standard: it restores a subtree
  for item in ("metadata", "data", "config"):  # all registered, so Orbax does not warn; only metadata is read
    registry.add(item, ocp.args.JsonRestore)
  return registry


def _shapes(tree) -> dict[str, tuple]:
  return {path_str(p): tuple(leaf.shape)
          for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0] if hasattr(leaf, "shape")}


def _subtree(tree, keep: set[str], prefix: str = ""):
  """The nested dict `tree` restricted to the leaf paths in `keep` (empty branches dropped)."""
  out = {}
  for key, value in tree.items():
    path = f"{prefix}{key}"
    if isinstance(value, dict):
      sub = _subtree(value, keep, path + "/")
      if sub:
        out[key] = sub
    elif path in keep:
      out[key] = value
  return out


def _merge(fresh, loaded):
  return {k: _merge(v, loaded.get(k, {})) if isinstance(v, dict) else loaded.get(k, v)
          for k, v in fresh.items()}


def load_params(path: str, params: dict, vocab_fingerprint: str,
                allow_missing: Sequence[str] = ()) -> tuple[dict, int, list[str]]:
  """`params` (a nested dict of arrays, the fresh model) with every array the checkpoint at `path`
  holds replaced by the saved one. Returns (params, the checkpoint's step, the paths kept fresh).
  Raises CheckpointMismatchError naming every problem (vocabulary, shapes, missing or extra)."""
  if isinstance(allow_missing, str):
    allow_missing = (allow_missing,)
  try:
    patterns = [re.compile(p) for p in allow_missing]
  except re.error as error:
    raise ConfigError(f"train.init_allow_missing={tuple(allow_missing)!r}: not a valid regex: {error}") from None
  directory, step = resolve(path)
  manager = ocp.CheckpointManager(directory, handler_registry=_registry(),
                                  options=ocp.CheckpointManagerOptions(create=False))
  try:
    if step is None:
      step = manager.latest_step()
      if step is None:
        raise FileNotFoundError(f"train.init_checkpoint={path!r}: no checkpoints in {directory}")
    where = f"train.init_checkpoint={path!r} ({directory}/{step})"
    metadata = manager.restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))["metadata"] or {}
    saved_vocab = metadata.get("vocab")
    if saved_vocab is not None and saved_vocab != vocab_fingerprint:
      raise CheckpointMismatchError(f"{where}: trained with vocabulary {saved_vocab}, this run uses "
                                    f"{vocab_fingerprint}; set train.vocab_path to the checkpoint's vocabulary")
    tree = manager.item_metadata(step)["state"]
    tree = getattr(tree, "tree", tree)
    if not isinstance(tree, dict) or "params" not in tree:
      raise CheckpointMismatchError(f"{where}: no 'params' in the saved train state")
    saved, expected = _shapes(tree["params"]), _shapes(params)
    problems = [f"{p}: saved {saved[p]}, model expects {shape}"
                for p, shape in expected.items() if p in saved and saved[p] != shape]
    problems += [f"{p}: in the checkpoint only (saved {saved[p]})" for p in saved if p not in expected]
    missing = [p for p in expected if p not in saved]
    problems += [f"{p}: expected by the model but not in the checkpoint (allow it with "
                 "train.init_allow_missing)" for p in missing if not any(r.fullmatch(p) for r in patterns)]
    if problems:
      raise CheckpointMismatchError(f"{where}: the checkpoint does not fit the model:\n  " + "\n  ".join(problems))
    abstract = _subtree(jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=getattr(a, "sharding", None)),
                                     params), set(saved))
    restore_args = ocp.checkpoint_utils.construct_restore_args({"params": abstract})
    loaded = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item={"params": abstract}, restore_args=restore_args, partial_restore=True)))["state"]["params"]
  finally:
    manager.close()
  if missing:
    print(f"glam: {len(missing)} parameters not in {where} keep their fresh init: {', '.join(missing)}",
          file=sys.stderr)
  return _merge(params, loaded), step, missing


def init_from_checkpoint(state: dict, path: str, vocab_fingerprint: str, optimizer,
                         allow_missing: Sequence[str] = ()) -> dict:
  """A fresh train state (step 0, optimizer re-initialised) on the checkpoint's parameters."""
  params, step, _ = load_params(path, state["params"], vocab_fingerprint, allow_missing)
  print(f"glam: initialised from {path} (step {step}); fresh optimizer, step 0", file=sys.stderr)
  return {"step": np.int32(0), "params": params, "opt_state": optimizer.init(params)}

"""`glam mode compose`: one MoDE checkpoint from a backbone and independently trained domain experts.

Each expert run (configs/runs/mode_expert.gin) is a MoDELM with num_domains = 1 whose backbone was
loaded from the backbone run and frozen, so its checkpoint holds the backbone bit for bit plus
`domain_experts/...` arrays with a leading K axis of 1. Composition:

  1. reads every checkpoint's parameters (never writing to them);
  2. checks that each expert was trained against *this* backbone: the fingerprint (SHA-256 of
     every backbone array's path, dtype, shape and bytes) of the expert's non-expert parameters
     must equal the backbone's, and that the experts share one architecture and vocabulary;
  3. concatenates the experts' `domain_experts` arrays along axis 0 (K = the number of experts);
     with gate="backbone" the gate scales are zeroed, so the composed model computes exactly the
     backbone's logits until a composition run (configs/runs/mode_compose.gin) trains the gate;
  4. writes DIR/checkpoints/0 (parameters, a fresh optimizer state, the first expert's config
     with MoDELM.num_domains = K, the fingerprints) and DIR/config.gin. A DIR that already holds
     a checkpoint is refused.
"""
import hashlib
import os
from typing import NamedTuple, Sequence

import gin
import jax
import numpy as np
import orbax.checkpoint as ocp

from glam import config as glam_config
from glam.train.checkpoint import Checkpointer, path_str
from glam.train.init_checkpoint import resolve

EXPERTS_KEY = "domain_experts"  # glam.models.mode: the experts' top-level parameter key
GATE_CHOICES = ("backbone", "experts")
CHECKPOINT_SUBDIR = "checkpoints"  # glam.train.trainer.CHECKPOINT_SUBDIR
# The bindings that fix the experts' shapes and wiring: composed experts must agree on all of them.
ARCHITECTURE_BINDINGS = ("MoDELM.boundaries", "MoDELM.expert_depth", "MoDELM.expert_block")


class RunCheckpoint(NamedTuple):
  where: str          # "directory/step", for messages
  params: dict        # nested dict of numpy arrays
  config_text: str    # the operative gin config saved with it
  metadata: dict      # e.g. {"vocab": fingerprint}


def _registry():
  registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
  registry.add("state", ocp.args.PyTreeRestore)  # a subtree (the params) of the train state
  for item in ("config", "metadata"):
    registry.add(item, ocp.args.JsonRestore)
  return registry


def read_checkpoint(path: str, what: str) -> RunCheckpoint:
  """The parameters, config and metadata of a run directory (latest step), checkpoint directory
  or step directory, as numpy arrays. `what` names the flag in errors (e.g. "--backbone")."""
  try:
    directory, step = resolve(path)
  except FileNotFoundError as error:
    raise FileNotFoundError(f"{what}={path}: {str(error).split(': ', 1)[-1]}") from None
  manager = ocp.CheckpointManager(directory, handler_registry=_registry(),
                                  options=ocp.CheckpointManagerOptions(create=False, read_only=True))
  try:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"{what}={path}: no checkpoints in {directory}")
    tree = manager.item_metadata(step)["state"]
    tree = getattr(tree, "tree", tree)
    if not isinstance(tree, dict) or "params" not in tree:
      raise ValueError(f"{what}={path} ({directory}/{step}): no 'params' in the saved train state")
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), tree["params"])
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), abstract)
    out = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(item={"params": abstract}, restore_args={"params": restore_args},
                                     partial_restore=True),
        config=ocp.args.JsonRestore(), metadata=ocp.args.JsonRestore()))
  finally:
    manager.close()
  params = jax.tree.map(np.asarray, out["state"]["params"])
  return RunCheckpoint(f"{directory}/{step}", params, out["config"]["gin"], out["metadata"] or {})


def flat(params: dict) -> dict[str, np.ndarray]:
  return {path_str(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}


def backbone_part(params: dict) -> dict:
  return {k: v for k, v in params.items() if k != EXPERTS_KEY}


def fingerprint(params: dict) -> str:
  """SHA-256 (first 16 hex digits) over every array's path, dtype, shape and bytes, in path order."""
  digest = hashlib.sha256()
  for path, leaf in sorted(flat(params).items()):
    leaf = np.ascontiguousarray(leaf)
    digest.update(f"{path}|{leaf.dtype.str}|{leaf.shape}|".encode())
    digest.update(leaf.tobytes())
  return digest.hexdigest()[:16]


def backbone_differences(backbone: dict, other: dict) -> list[str]:
  """Why two backbones differ: paths on one side only, shapes, then arrays whose values differ."""
  a, b = flat(backbone), flat(other)
  problems = [f"{p}: only in the backbone" for p in a if p not in b]
  problems += [f"{p}: only in the expert's checkpoint" for p in b if p not in a]
  shared = [p for p in a if p in b]
  problems += [f"{p}: shape {b[p].shape} != backbone {a[p].shape}" for p in shared if a[p].shape != b[p].shape]
  if not problems:
    differing = [p for p in shared if not np.array_equal(a[p], b[p])]
    problems += [f"{len(differing)} of {len(shared)} arrays differ in value (e.g. {', '.join(differing[:3])})"]
  return problems


def architecture(config_text: str, where: str) -> dict:
  """The ARCHITECTURE_BINDINGS values a stored config sets (unset ones as None)."""
  glam_config.register_configurables()
  gin.clear_config()
  try:
    with gin.unlock_config():
      gin.parse_config(config_text)
  except (ValueError, SyntaxError) as error:
    raise glam_config.ConfigError(f"{where}: cannot parse its stored config: {error}") from None
  values = {}
  for name in ARCHITECTURE_BINDINGS:
    try:
      value = gin.query_parameter(name)
    except ValueError:
      value = None
    values[name] = tuple(value) if isinstance(value, list) else value
  gin.clear_config()
  return values


def check_target(target: str) -> None:
  """A target that already holds a checkpoint (or is not a directory) is refused."""
  if os.path.exists(target) and not os.path.isdir(target):
    raise ValueError(f"--to={target}: exists and is not a directory")
  checkpoints = os.path.join(target, CHECKPOINT_SUBDIR)
  held = [name for folder in (target, checkpoints) if os.path.isdir(folder)
          for name in os.listdir(folder) if name.isdigit()]
  if held:
    raise ValueError(f"--to={target}: already holds a checkpoint (steps {sorted({int(n) for n in held})}); "
                          "composition never overwrites one: choose an empty directory")


def compose(backbone_path: str, expert_paths: Sequence[str], target: str, gate: str = "backbone") -> dict:
  """Writes the composed checkpoint to `target`; returns a summary (fingerprint, K, parameter counts)."""
  if gate not in GATE_CHOICES:
    raise ValueError(f"--gate={gate!r}: expected one of {GATE_CHOICES}")
  if not expert_paths:
    raise ValueError("--experts: give at least one expert run (comma-separated)")
  check_target(target)
  for flag, source in [("--backbone", backbone_path)] + [("--experts", path) for path in expert_paths]:
    inside = os.path.realpath(target) + os.sep
    if inside.startswith(os.path.realpath(source) + os.sep):
      raise ValueError(f"--to={target}: is (inside) the {flag} run {source}, which composition never "
                       "modifies; choose a directory outside it")
  backbone = read_checkpoint(backbone_path, "--backbone")
  if EXPERTS_KEY in backbone.params:
    raise ValueError(f"--backbone={backbone_path}: holds '{EXPERTS_KEY}' parameters (a MoDE model); "
                     "give the plain DecoderLM run the experts were trained on")
  backbone_print = fingerprint(backbone.params)
  experts = []
  for path in expert_paths:
    expert = read_checkpoint(path, "--experts")
    if EXPERTS_KEY not in expert.params:
      raise ValueError(f"--experts: {path} ({expert.where}) has no '{EXPERTS_KEY}' parameters: "
                       "not a MoDE expert run (train one with configs/runs/mode_expert.gin)")
    if fingerprint(backbone_part(expert.params)) != backbone_print:
      problems = backbone_differences(backbone.params, backbone_part(expert.params))
      raise ValueError(f"--experts: {path} was trained against a different backbone than --backbone="
                       f"{backbone_path} (backbone fingerprint {backbone_print}); its backbone "
                       "parameters differ (or were not frozen: freeze.patterns in mode_expert.gin):\n  "
                       + "\n  ".join(problems[:10]))
    vocab, expected = expert.metadata.get("vocab"), backbone.metadata.get("vocab")
    if vocab != expected:
      raise ValueError(f"--experts: {path} uses vocabulary {vocab}, the backbone {expected}")
    experts.append(expert)

  first_arch = architecture(experts[0].config_text, experts[0].where)
  first_shapes = {p: a.shape[1:] for p, a in flat(experts[0].params[EXPERTS_KEY]).items()}
  for path, expert in zip(expert_paths[1:], experts[1:]):
    arch = architecture(expert.config_text, expert.where)
    differing = [f"{n}: {arch[n]} != {first_arch[n]}" for n in ARCHITECTURE_BINDINGS if arch[n] != first_arch[n]]
    shapes = {p: a.shape[1:] for p, a in flat(expert.params[EXPERTS_KEY]).items()}
    differing += [f"{EXPERTS_KEY}/{p}: {shapes.get(p)} != {first_shapes.get(p)} (per expert)"
                  for p in sorted(set(shapes) | set(first_shapes)) if shapes.get(p) != first_shapes.get(p)]
    if differing:
      raise ValueError(f"--experts: {path} has another expert architecture than {expert_paths[0]}:\n  "
                       + "\n  ".join(differing))

  stacked = jax.tree.map(lambda *a: np.concatenate(a, axis=0), *[e.params[EXPERTS_KEY] for e in experts])
  if gate == "backbone":
    stacked["gate"]["scale"] = np.zeros_like(stacked["gate"]["scale"])
  params = dict(backbone.params, **{EXPERTS_KEY: stacked})
  num_domains = int(stacked["gate"]["scale"].shape[0])
  config_text = (experts[0].config_text.rstrip("\n") + "\n\n# glam mode compose\n"
                 f"MoDELM.num_domains = {num_domains}\n")
  _check_fits(config_text, params)
  opt_state = _fresh_optimizer_state(config_text, params)
  metadata = dict(backbone.metadata, mode={
      "backbone": os.path.abspath(backbone_path), "backbone_fingerprint": backbone_print,
      "experts": [os.path.abspath(p) for p in expert_paths], "gate": gate,
      "expert_fingerprints": [fingerprint(e.params[EXPERTS_KEY]) for e in experts]})
  state = {"step": np.int32(0), "params": params, "opt_state": opt_state}
  with Checkpointer(os.path.join(target, CHECKPOINT_SUBDIR), async_save=False) as checkpointer:
    checkpointer.save(0, state, {}, config_text, force=True, metadata=metadata)
  glam_config.save_text(os.path.join(target, "config.gin"), config_text)
  backbone_count = sum(a.size for a in flat(backbone.params).values())
  expert_count = sum(a.size for a in flat(stacked).values())
  return {"composed": os.path.abspath(target), "num_domains": num_domains, "gate": gate,
          "backbone_fingerprint": backbone_print, "backbone_parameters": int(backbone_count),
          "expert_parameters": int(expert_count), "total_parameters": int(backbone_count + expert_count)}


def _parse(config_text: str) -> None:
  glam_config.register_configurables()
  gin.clear_config()
  with gin.unlock_config():
    gin.parse_config(config_text)


def _check_fits(config_text: str, params: dict) -> None:
  """The composed config must build a model of exactly the composed parameters' shapes."""
  from flax import nnx
  from glam.models.lm import DecoderLM
  from glam.models.summary import abstract_model
  from glam.train.loading import binding
  _parse(config_text)
  try:
    model = abstract_model(binding("train.model", DecoderLM), binding("train.seed", 0))
    expected = {p: tuple(a.shape) for p, a in flat(nnx.to_pure_dict(nnx.state(model))).items()}
  finally:
    gin.clear_config()
  got = {p: tuple(a.shape) for p, a in flat(params).items()}
  problems = [f"{p}: composed {got.get(p)}, model expects {expected.get(p)}"
              for p in sorted(set(got) | set(expected)) if got.get(p) != expected.get(p)]
  if problems:
    raise ValueError("the composed parameters do not fit the composed config:\n  " + "\n  ".join(problems[:10]))


def _fresh_optimizer_state(config_text: str, params: dict):
  """The optimizer state of the stored config's optimizer, so `glam eval` / load_trained restore it."""
  from glam.train.optimizers import make_optimizer
  _parse(config_text)
  try:
    return jax.device_get(make_optimizer().init(jax.tree.map(jax.numpy.asarray, params)))
  finally:
    gin.clear_config()

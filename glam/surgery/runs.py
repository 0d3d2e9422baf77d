"""Reading a run's checkpoint as plain pytrees, and writing a new run directory: shared by the
surgery commands. Surgery never writes into the source directory (DESIGN.md principle 5)."""
import os
from typing import Any, NamedTuple

import gin
import jax
import numpy as np
from flax import nnx

from glam import config as glam_config
from glam.models.lm import DecoderLM
from glam.parallel.sharding import on_one_device
from glam.models.summary import abstract_model, parameter_rows
from glam.train.checkpoint import Checkpointer, read_checkpoint_config
from glam.train.loading import binding
from glam.train.optimizers import make_optimizer
from glam.train.trainer import CHECKPOINT_SUBDIR, build_model


class Run(NamedTuple):
  step: int
  state: dict            # {"step", "params", "opt_state"} as host numpy arrays
  data_state: dict
  metadata: dict
  config_text: str
  model: Any             # the abstract model (shapes and logical axes)


def parse_config_text(text: str, where: str, bindings=()) -> None:
  """Clears gin and parses a stored config plus extra bindings; errors name `where`."""
  glam_config.register_configurables()
  gin.clear_config()
  try:
    with gin.unlock_config():
      gin.parse_config(text)
      gin.parse_config(list(bindings))
  except (ValueError, SyntaxError, NameError, TypeError) as error:
    raise glam_config.ConfigError(f"{where}: cannot parse its config: {error}") from None


def fresh_state(seed_offset: int = 0) -> tuple[dict, Any]:
  """A freshly initialised state for the parsed config, and the abstract model."""
  factory, seed = binding("train.model", DecoderLM), binding("train.seed", 0)
  with gin.unlock_config():
    _, params = build_model(factory, seed + seed_offset)
    model = abstract_model(factory, seed)
  optimizer = make_optimizer()
  return {"step": np.int32(0), "params": params, "opt_state": optimizer.init(params)}, model


def read_run(run_dir: str, step: int | None = None, bindings=()) -> Run:
  """The checkpoint of `run_dir` (a run directory holding checkpoints/) with its own config."""
  directory = os.path.join(run_dir, CHECKPOINT_SUBDIR)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"--from={run_dir}: no checkpoints (expected {directory})")
  text = read_checkpoint_config(directory, step)
  parse_config_text(text, run_dir, bindings)
  state, model = fresh_state()
  checkpointer = Checkpointer(directory, async_save=False)
  try:
    restored = checkpointer.restore(on_one_device(jax.eval_shape(lambda: state)), step=step)  # from any mesh
  finally:
    checkpointer.close()
  return Run(restored.step, jax.device_get(restored.state), restored.data_state, restored.metadata, text, model)


def check_target(target_dir: str, source_dir: str) -> None:
  """Refuses the source itself, a target inside the source (writing there would change the source
  directory), a target that is a file, and one that already holds a checkpoint: checkpoints/<step>
  in it, or <step> folders directly (a checkpoints folder given as the target)."""
  source, target = os.path.realpath(source_dir), os.path.realpath(target_dir)
  if target == source:
    raise ValueError(f"--to={target_dir}: is the source directory; surgery writes a new run directory")
  if target.startswith(source + os.sep):
    raise ValueError(f"--to={target_dir}: is inside the source directory {source_dir}, which surgery "
                     "never modifies; choose a directory outside it")
  if os.path.exists(target_dir) and not os.path.isdir(target_dir):
    raise ValueError(f"--to={target_dir}: exists and is not a directory")
  checkpoints = os.path.join(target_dir, CHECKPOINT_SUBDIR)
  held = sorted({int(name) for folder in (target_dir, checkpoints) if os.path.isdir(folder)
                 for name in os.listdir(folder) if name.isdigit()})
  if held or (os.path.isdir(checkpoints) and os.listdir(checkpoints)):
    raise ValueError(f"--to={target_dir}: already holds checkpoints (steps {held} in {checkpoints}); "
                     "surgery never overwrites one: choose an empty directory")


def write_run(target_dir: str, step: int, state: dict, data_state: dict, config_text: str,
              metadata: dict) -> str:
  """Writes checkpoints/<step>/ and config.gin in `target_dir`; returns the checkpoint path."""
  os.makedirs(target_dir, exist_ok=True)
  glam_config.save_text(os.path.join(target_dir, "config.gin"), config_text)
  with Checkpointer(os.path.join(target_dir, CHECKPOINT_SUBDIR), async_save=False) as checkpointer:
    checkpointer.save(step, state, data_state, config_text, force=True, metadata=metadata)
  return os.path.join(target_dir, CHECKPOINT_SUBDIR, str(step))


def axes_by_path(model) -> dict[str, tuple]:
  return {path: axes for path, _, axes, _ in parameter_rows(model)}


def flat(tree) -> dict[str, Any]:
  """'/'-joined key path -> leaf (the paths `glam model summary --per_parameter` prints)."""
  from glam.train.checkpoint import path_str
  return {path_str(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def unflat_like(tree, values: dict[str, Any]):
  """`tree` with each leaf replaced by values[path]."""
  from glam.train.checkpoint import path_str
  return jax.tree_util.tree_map_with_path(lambda p, leaf: values[path_str(p)], tree)


def expert_axis_size() -> int:
  """The mesh's expert axis size under the parsed config (1 without a mesh configuration)."""
  try:
    from glam.parallel.mesh import mesh_shape, resolve_axis_sizes
  except ImportError:
    return 1
  with gin.unlock_config():
    sizes = dict(mesh_shape())
  if sizes["expert"] != -1:  # the configured size, whatever machine runs the surgery
    return sizes["expert"]
  return resolve_axis_sizes(sizes, jax.device_count())["expert"]


def params_of(model) -> dict:
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))

"""Load a trained model back from a run directory, using the config stored with its checkpoint."""
import os
from typing import NamedTuple

import gin
import jax
from flax import nnx

from glam import config as glam_config
from glam.data.vocab import get_vocabulary
from glam.models.lm import DecoderLM
from glam.parallel.sharding import on_one_device
from glam.train.checkpoint import Checkpointer, read_checkpoint_config
from glam.train.optimizers import make_optimizer
from glam.train.trainer import CHECKPOINT_SUBDIR, build_model, check_vocab_fits


class LoadedModel(NamedTuple):
  model: nnx.Module
  vocab: object
  step: int
  config_text: str


def binding(name: str, default):
  """The value a parsed config binds to `name`, or `default` when it is unbound."""
  try:
    value = gin.query_parameter(name)
  except ValueError:
    return default
  if isinstance(value, gin.config.ConfigurableReference):  # `train.model = @MoDELM`: the configurable itself
    return value.scoped_configurable_fn() if value.evaluate else value.scoped_configurable_fn
  return value


def load_trained(model_dir: str, step: int | None = None, bindings=()) -> LoadedModel:
  """Parses the checkpoint's operative config (plus `bindings`), rebuilds the model, restores it."""
  directory = os.path.join(model_dir, CHECKPOINT_SUBDIR)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"{model_dir}: no checkpoints (expected {directory}); train first with `glam train`")
  config_text = read_checkpoint_config(directory, step)
  glam_config.register_configurables()
  gin.clear_config()
  try:
    with gin.unlock_config():
      gin.parse_config(config_text)
      gin.parse_config(list(bindings))
  except (ValueError, SyntaxError) as error:
    raise glam_config.ConfigError(f"{model_dir}: cannot parse its stored config: {error}") from None
  vocab = get_vocabulary(binding("train.vocab_path", None))
  model_factory = binding("train.model", DecoderLM)
  seed = binding("train.seed", 0)
  graphdef, params = build_model(model_factory, seed)
  check_vocab_fits(nnx.merge(graphdef, params).vocab_size, vocab)
  optimizer = make_optimizer()
  state = {"step": jax.numpy.int32(0), "params": params, "opt_state": optimizer.init(params)}
  checkpointer = Checkpointer(directory, async_save=False)
  restored = checkpointer.restore(on_one_device(jax.eval_shape(lambda: state)), step=step)  # from any mesh
  checkpointer.close()
  return LoadedModel(nnx.merge(graphdef, restored.state["params"]), vocab, restored.step, config_text)

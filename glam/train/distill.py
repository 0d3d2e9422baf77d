"""Output-level distillation from a frozen previous-stage model (Lifelong-MoE, LwF-style).

  train.distill_from = "runs/stage1"   # a run directory (its latest checkpoint) of the previous stage
  train.distill_weight = 1.0           # lambda (default 0 = off; both must be set, check_distillation)

The loss becomes L_LM + lambda * KL(p_old || p_new), the KL of the next-token distributions
averaged over target tokens (loss_weights), logged as `distill_kl`. The previous-stage model is
loaded once from its own stored config, kept frozen (its parameters are an input of the train
step, never updated) and run deterministically (no dropout, evaluation capacity).
"""
import gin
import jax
import jax.numpy as jnp
from flax import nnx

from glam.config import ConfigError


def check_distillation(distill_from: str | None, distill_weight: float) -> None:
  """Distillation is on exactly when both train.distill_from and train.distill_weight > 0 are set;
  one without the other is an error, so a stage config whose previous-stage directory was left
  unset (configs/runs/lifelong_stage.gin: PREVIOUS_STAGE) fails instead of training without it."""
  if distill_weight < 0:
    raise ConfigError(f"train.distill_weight={distill_weight!r}: must be >= 0 (0 = no distillation)")
  if distill_weight > 0 and not distill_from:
    raise ConfigError(
        f"train.distill_weight={distill_weight!r} but train.distill_from is unset ({distill_from!r}): "
        "give the previous stage's run directory (configs/runs/lifelong_stage.gin: "
        "--gin.PREVIOUS_STAGE=\"'runs/stage1'\"), or train without distillation with "
        "--gin.train.distill_weight=0")
  if distill_from and distill_weight == 0:
    raise ConfigError(f"train.distill_from={distill_from!r} but train.distill_weight=0: set the weight "
                      "lambda > 0 (e.g. 1.0), or unset train.distill_from to train without distillation")


def kl_divergence(teacher_logits: jax.Array, student_logits: jax.Array) -> jax.Array:
  """KL(p_teacher || p_student) per position: [batch, length, vocab] x2 -> [batch, length] float32."""
  teacher_log_p = jax.nn.log_softmax(teacher_logits.astype(jnp.float32), axis=-1)
  student_log_p = jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1)
  return jnp.sum(jnp.exp(teacher_log_p) * (teacher_log_p - student_log_p), axis=-1)


def load_teacher(run_dir: str, vocab_size: int):
  """(graphdef, params) of the frozen model in `run_dir`, built from its stored config.

  Loading parses the teacher's config, which replaces gin's bindings: the caller's bindings are
  saved first and parsed again afterwards (the operative config recorded so far is lost, so call
  this after the run's config has been saved).
  """
  from glam.train.loading import load_trained  # pylint: disable=import-outside-toplevel  (import cycle)
  saved = gin.config_str()
  try:
    loaded = load_trained(run_dir)
  except FileNotFoundError as error:
    raise ConfigError(f"train.distill_from={run_dir!r}: {error}") from None
  finally:
    gin.clear_config()
    with gin.unlock_config():
      gin.parse_config(saved)
  if loaded.model.vocab_size != vocab_size:
    raise ConfigError(f"train.distill_from={run_dir!r}: its model has vocab_size {loaded.model.vocab_size}, "
                      f"this one {vocab_size}; distillation compares the same output classes")
  graphdef, state = nnx.split(loaded.model)
  return graphdef, nnx.to_pure_dict(state)


def place_teacher(graphdef, params: dict, mesh):
  """The teacher's parameters on `mesh`, sharded by the same logical axis rules as the student's
  (its experts split over the expert axis), so a large previous stage is not copied whole onto
  every device. A teacher whose expert count the expert axis does not divide (E before growth,
  when only E+N does) stays whole on every device."""
  from glam.parallel.axis_rules import UnevenSplitError, axis_rules  # pylint: disable=import-outside-toplevel
  from glam.parallel.sharding import named, param_logical_axes, param_specs
  from glam.parallel.train_state import place_state
  try:
    specs = param_specs(params, param_logical_axes(nnx.merge(graphdef, nnx.State(params))), mesh, axis_rules())
  except UnevenSplitError:
    specs = jax.tree.map(lambda _: jax.sharding.PartitionSpec(), params)
  return place_state(params, named(specs, mesh))

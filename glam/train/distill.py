"""Output-level distillation from a frozen previous-stage model (Lifelong-MoE, LwF-style).

  train.distill_from = "runs/stage1"   # a run directory (its latest checkpoint) of the previous stage
  train.distill_weight = 1.0           # lambda

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

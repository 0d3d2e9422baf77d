"""Pure train and eval steps: functions of (state, batch), compiled once with jax.jit.

The train state is a plain dict {"step", "params", "opt_state"} of arrays so that it checkpoints
as-is; the model is rebuilt inside the step from its graphdef (static) and the params.
"""
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from glam.train.distill import kl_divergence
from glam.train.optimizers import current_learning_rate, skipped_updates

# How often `glam train` writes metrics unless train.log_every says otherwise; its step computes the
# norm metrics only on those steps (make_train_step's norms_every).
DEFAULT_LOG_EVERY = 10


def token_losses(logits: jax.Array, targets: jax.Array):
  """Per-token negative log-likelihood, log-partition and whether the target is the top prediction,
  all [batch, length] (float32, float32, bool).

  "Top prediction" compares the target's logit with the row maximum, which XLA computes once for
  both logsumexp and this (a separate argmax was a second pass over the logits: 1.8% of the peer-race
  step). An exact tie with another logit counts as correct, where argmax would pick the lower id.
  """
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  top = target_logit >= jax.lax.stop_gradient(jnp.max(logits, axis=-1))
  return log_z - target_logit, log_z, top


def forward(graphdef, params, batch, *, deterministic: bool, rng=None):
  model = nnx.merge(graphdef, params)
  return model(batch["inputs"], segment_ids=batch["segment_ids"], positions=batch["positions"],
               prefix_mask=batch.get("prefix_mask"), deterministic=deterministic, rng=rng)


def make_train_step(graphdef, optimizer: optax.GradientTransformation, *, seed: int = 0,
                    z_loss: float = 0.0, grad_accum_steps: int = 1, distill=None,
                    norms_every: int = 1, last_step: int | None = None) -> Callable:
  """Returns train_step(state, batch[, teacher_params]) -> (state, metrics).

  z_loss: coefficient of the output-logit z-loss mean(log Z^2) (praxis GLaM uses 1e-4; 0 = off).
  grad_accum_steps: the batch is split into this many micro-batches whose gradients are summed
    before one update; the result equals one big batch up to float rounding.
  distill: (teacher_graphdef, weight): add weight * KL(p_teacher || p_model) averaged over target
    tokens (glam/train/distill.py); the step then takes the frozen teacher_params as third argument.
  norms_every, last_step: the "grad_norm" and "param_norm" metrics are computed only by the steps
    that bring the step count to a multiple of norms_every or to last_step (the steps whose
    metrics the trainer writes) and are NaN on the others. Each norm reads every parameter or
    gradient once more: at the peer-race shape on a 2-core CPU, leaving them out saved about 1.5%
    of the median step and 4.5% of the fastest.
  """
  if norms_every < 1:
    raise ValueError(f"make_train_step: norms_every={norms_every}: must be >= 1")

  def micro_loss(params, micro, rng, total_weight, teacher_params=None):
    out = forward(graphdef, params, micro, deterministic=False, rng=rng)
    nll, log_z, top = token_losses(out.logits, micro["targets"])
    weights = micro["loss_weights"]
    nll_sum = jnp.sum(nll * weights)
    z_sum = jnp.sum(jnp.square(log_z) * weights)
    loss = (nll_sum + z_loss * z_sum) / total_weight + out.aux_loss / grad_accum_steps
    kl_sum = jnp.zeros((), jnp.float32)
    if distill is not None:
      teacher_logits = jax.lax.stop_gradient(forward(distill[0], teacher_params, micro, deterministic=True).logits)
      kl_sum = jnp.sum(kl_divergence(teacher_logits, out.logits) * weights)
      loss = loss + distill[1] * kl_sum / total_weight
    correct = jnp.sum(top * weights)
    stats = {"nll_sum": nll_sum, "z_sum": z_sum, "correct": correct, "aux_loss": out.aux_loss / grad_accum_steps,
             "kl_sum": kl_sum}
    routing = jax.tree.map(lambda v: v / grad_accum_steps, out.metrics)
    return loss, (stats, routing)

  grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

  def train_step(state: dict[str, Any], batch: dict[str, jax.Array], teacher_params=None):
    params = state["params"]
    rng = jax.random.fold_in(jax.random.key(seed), state["step"])
    total_weight = jnp.maximum(jnp.sum(batch["loss_weights"]), 1.0)
    if grad_accum_steps == 1:
      (_, (stats, routing)), grads = grad_fn(params, batch, rng, total_weight, teacher_params)
    else:
      micro_batches = jax.tree.map(
          lambda x: x.reshape((grad_accum_steps, x.shape[0] // grad_accum_steps) + x.shape[1:]), batch)

      def accumulate(carry, xs):
        micro, index = xs
        (_, aux), grads = grad_fn(params, micro, jax.random.fold_in(rng, index), total_weight, teacher_params)
        return jax.tree.map(jnp.add, carry, (grads, aux)), None

      zero_aux = jax.eval_shape(lambda: grad_fn(params, jax.tree.map(lambda x: x[0], micro_batches),
                                                rng, total_weight, teacher_params)[0][1])
      zeros = jax.tree.map(jnp.zeros_like, (params, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero_aux)))
      (grads, (stats, routing)), _ = jax.lax.scan(accumulate, zeros,
                                                  (micro_batches, jnp.arange(grad_accum_steps)))
    new_step = state["step"] + 1
    wanted = new_step % norms_every == 0
    if last_step is not None:
      wanted = wanted | (new_step == last_step)
    norm = lambda tree: jax.lax.cond(wanted, lambda: optax.tree.norm(tree).astype(jnp.float32),
                                     lambda: jnp.full((), jnp.nan, jnp.float32))
    grad_norm = norm(grads)  # before the update, which may then reuse the gradients' buffers
    updates, opt_state = optimizer.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    # After the update: reading the old (donated) parameters here made XLA copy all of them.
    param_norm = norm(new_params)
    metrics = {
        "loss": stats["nll_sum"] / total_weight,
        "z_loss": stats["z_sum"] / total_weight,
        "aux_loss": stats["aux_loss"],
        "accuracy": stats["correct"] / total_weight,
        **({"distill_kl": stats["kl_sum"] / total_weight} if distill is not None else {}),
        "grad_norm": grad_norm,
        "param_norm": param_norm,
        "skipped_updates": skipped_updates(opt_state),
        **({"learning_rate": lr} if (lr := current_learning_rate(opt_state)) is not None else {}),
        "tokens": jnp.sum(batch["segment_ids"] > 0),
        **{f"routing/{k}": v for k, v in routing.items()},
    }
    return {"step": new_step, "params": new_params, "opt_state": opt_state}, metrics

  return train_step


def make_eval_step(graphdef, num_domains: int) -> Callable:
  """Returns eval_step(params, batch) -> per-domain sums {"nll", "tokens", "correct"}: [num_domains]."""

  def eval_step(params, batch):
    out = forward(graphdef, params, batch, deterministic=True)
    nll, _, top = token_losses(out.logits, batch["targets"])
    weights = batch["loss_weights"]
    correct = top.astype(jnp.float32)
    domains = jnp.where(weights > 0, batch["domain_ids"], num_domains)  # padding -> an extra bucket
    per_domain = lambda values: jax.ops.segment_sum((values * weights).ravel(), domains.ravel(),
                                                    num_segments=num_domains + 1)[:num_domains]
    return {"nll": per_domain(nll), "tokens": per_domain(jnp.ones_like(nll)), "correct": per_domain(correct)}

  return eval_step

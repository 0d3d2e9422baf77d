"""Optimizers: GLaM's Adafactor, AdamW, and the wrapper the trainer uses (clipping, NaN/Inf skipping).

Every optimizer ends in `scale_by_learning_rate`, whose state records the rate it applied, and
`make_optimizer` wraps the chain in `skip_nonfinite_updates`, whose state counts skipped updates;
`current_learning_rate(opt_state)` and `skipped_updates(opt_state)` read them back for the metrics.
All state is a pytree of arrays (namedtuples), so it checkpoints and shards like the parameters.
"""
from typing import Any, Callable, NamedTuple

import gin
import jax
import jax.numpy as jnp
import optax

from glam.config import check
from glam.models.per_layer import PerLayer, is_per_layer
from glam.train.schedules import constant_then_rsqrt


class LearningRateState(NamedTuple):
  count: jax.Array          # int32: updates applied so far (the schedule's argument)
  learning_rate: jax.Array  # float32: the rate the latest update used (the step-0 rate before any)


def scale_by_learning_rate(learning_rate: float | optax.Schedule) -> optax.GradientTransformation:
  """Multiplies updates by -learning_rate, keeping the rate used in the state for logging."""
  schedule = learning_rate if callable(learning_rate) else (lambda count: learning_rate)

  def rate(count):
    return jnp.asarray(schedule(count), jnp.float32)

  def init(params):
    del params
    zero = jnp.zeros([], jnp.int32)
    return LearningRateState(zero, rate(zero))

  def update(updates, state, params=None):
    del params
    lr = rate(state.count)
    updates = jax.tree.map(lambda u: (-lr * u).astype(u.dtype), updates)
    return updates, LearningRateState(optax.safe_increment(state.count), lr)

  return optax.GradientTransformation(init, update)


def capped_decay_rate(count, decay_rate: float, cap: float) -> jax.Array:
  """Adafactor's second-moment decay for the update after `count` others: min(cap, 1 - t^-decay_rate)
  with t = count + 1, so the first update keeps only the current squared gradient (beta2 = 0)."""
  t = jnp.asarray(count, jnp.float32) + 1.0
  return jnp.minimum(cap, 1.0 - t ** (-decay_rate))


@gin.configurable
def adafactor(learning_rate: float | optax.Schedule | None = None, decay_rate: float = 0.8,
              beta2_cap: float = 0.99, beta1: float | None = None,
              clipping_threshold: float | None = 1.0, factored: bool = True,
              min_dim_size_to_factor: int = 128, epsilon1: float = 1e-30,
              weight_decay: float | None = None,
              multiply_by_parameter_scale: bool = False) -> optax.GradientTransformation:
  """Adafactor (Shazeer & Stern 2018) with GLaM's settings as defaults.

  Per parameter: V = beta2_t V + (1 - beta2_t) (G^2 + epsilon1), factored into row and column
  statistics for arrays whose two largest dims are >= min_dim_size_to_factor; U = G / sqrt(V);
  U /= max(1, RMS(U) / clipping_threshold); optional momentum, parameter scale and weight decay;
  then the learning rate.

  Args:
    learning_rate: a float or schedule; None = `constant_then_rsqrt()` with its gin bindings.
      # GLaM (Du et al. 2021): constant 0.01 for 10k steps, then rsqrt
    decay_rate: beta2_t = min(beta2_cap, 1 - t^-decay_rate) for the t-th update (t from 1).
      # GLaM (Du et al. 2021): 1 - t^-0.8 decay schedule, second-moment decay 0.99
    beta2_cap: the upper bound of beta2_t, reached after ~316 updates with decay_rate 0.8.
    beta1: first-moment (momentum) decay; None or 0 = no momentum, no state.
      # GLaM (Du et al. 2021): beta1 = 0
    clipping_threshold: update clipping, the RMS of each parameter's update is capped at this
      value; None = off. # GLaM (Du et al. 2021) and Shazeer & Stern 2018: 1.0
    factored: factor second moments of arrays with >= 2 dims (else full per-element statistics).
      # GLaM (Du et al. 2021): factored second-moment estimation
    min_dim_size_to_factor: factor only when the second-largest dim is at least this (128, as in
      Shazeer & Stern's reference code); the two largest dims are the factored ones, so the row and
      column statistics have the parameter's shape minus one of those dims.
    epsilon1: added to squared gradients (1e-30, Shazeer & Stern 2018).
    weight_decay: decoupled decay: weight_decay * param is added to the update before the learning
      rate multiplies it (as AdamW does); None = off.
    multiply_by_parameter_scale: scale updates by max(1e-3, RMS(param)) (Shazeer & Stern's
      relative step); False, as GLaM-style training with an absolute learning rate uses.
  """
  check(0 < decay_rate <= 1, "adafactor.decay_rate", decay_rate, "must be in (0, 1]")
  check(0 < beta2_cap < 1, "adafactor.beta2_cap", beta2_cap, "must be in (0, 1)")
  check(beta1 is None or 0 <= beta1 < 1, "adafactor.beta1", beta1, "must be None or in [0, 1)")
  check(clipping_threshold is None or clipping_threshold > 0, "adafactor.clipping_threshold",
        clipping_threshold, "must be None or > 0")
  check(min_dim_size_to_factor >= 1, "adafactor.min_dim_size_to_factor", min_dim_size_to_factor,
        "must be >= 1")
  check(epsilon1 > 0, "adafactor.epsilon1", epsilon1, "must be > 0")
  check(weight_decay is None or weight_decay >= 0, "adafactor.weight_decay", weight_decay,
        "must be None or >= 0")
  if learning_rate is None:
    learning_rate = constant_then_rsqrt()
  # optax's factored RMS takes the decay as a function of (count, decay_rate): that is where the
  # cap goes, so its state (rows/columns per parameter, shapes from the parameter's) is reused.
  parts = [optax.scale_by_factored_rms(
      factored=factored, decay_rate=decay_rate, min_dim_size_to_factor=min_dim_size_to_factor,
      epsilon=epsilon1,
      decay_rate_fn=lambda count, rate: capped_decay_rate(count, rate, beta2_cap))]
  if clipping_threshold is not None:
    parts.append(clip_by_block_rms(clipping_threshold))
  if beta1:
    parts.append(optax.ema(beta1, debias=False))  # Adafactor's momentum has no bias correction
  if multiply_by_parameter_scale:
    parts.append(scale_by_param_block_rms(1e-3))
  if weight_decay:
    parts.append(optax.add_decayed_weights(weight_decay))
  parts.append(scale_by_learning_rate(learning_rate))
  return optax.chain(*parts)


def _block_rms(block) -> jax.Array:
  """RMS of one parameter's array, or of all the arrays of a PerLayer node together."""
  parts = block.slices if is_per_layer(block) else (block,)
  total = sum(jnp.sum(jnp.square(part)) for part in parts)
  return jnp.sqrt(total / sum(part.size for part in parts))


def clip_by_block_rms(threshold: float) -> optax.GradientTransformation:
  """optax.clip_by_block_rms, where the arrays of a PerLayer node (unrolled blocks' per-layer train
  state, glam/models/per_layer.py) are one block, as their stacked array is, so that both layouts
  train alike."""

  def update(updates, state, params=None):
    def clip(block):
      if not is_per_layer(block):
        return optax.clip_by_block_rms(threshold).update(block, None)[0]
      denominator = jnp.maximum(1.0, _block_rms(block) / threshold)
      return PerLayer(part / denominator for part in block.slices)

    return jax.tree.map(clip, updates, is_leaf=is_per_layer), state

  return optax.GradientTransformation(optax.init_empty_state, update)


def scale_by_param_block_rms(min_scale: float) -> optax.GradientTransformation:
  """optax.scale_by_param_block_rms, with a PerLayer node's arrays as one block (as above)."""

  def update(updates, state, params):
    def scale(block, param):
      if not is_per_layer(block):
        return optax.scale_by_param_block_rms(min_scale).update(block, None, param)[0]
      factor = jnp.maximum(_block_rms(param), min_scale)
      return PerLayer(part * factor for part in block.slices)

    return jax.tree.map(scale, updates, params, is_leaf=is_per_layer), state

  return optax.GradientTransformation(optax.init_empty_state, update)


@gin.configurable
def adamw(learning_rate: float | optax.Schedule = 1e-3, b1: float = 0.9, b2: float = 0.95,
          eps: float = 1e-8, weight_decay: float = 0.0) -> optax.GradientTransformation:
  """AdamW (Loshchilov & Hutter 2019), numerically optax.adamw, with the rate kept in the state.

  Args:
    learning_rate: a float or schedule (1e-3; e.g. `@warmup_cosine()`).
    b1: first-moment decay (0.9, Kingma & Ba 2015).
    b2: second-moment decay (0.95, the usual LM choice since GPT-3, Brown et al. 2020).
    eps: added to the root of the second moment (1e-8, Kingma & Ba 2015).
    weight_decay: decoupled decay, multiplied by the learning rate (0.0 = off).
  """
  check(0 <= b1 < 1, "adamw.b1", b1, "must be in [0, 1)")
  check(0 <= b2 < 1, "adamw.b2", b2, "must be in [0, 1)")
  check(eps > 0, "adamw.eps", eps, "must be > 0")
  check(weight_decay >= 0, "adamw.weight_decay", weight_decay, "must be >= 0")
  parts = [optax.scale_by_adam(b1=b1, b2=b2, eps=eps)]
  if weight_decay:
    parts.append(optax.add_decayed_weights(weight_decay))
  parts.append(scale_by_learning_rate(learning_rate))
  return optax.chain(*parts)


class SkipNonfiniteState(NamedTuple):
  skipped: jax.Array  # int32: updates skipped so far because of NaN/Inf
  inner_state: Any


def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def skip_nonfinite_updates(inner: optax.GradientTransformation) -> optax.GradientTransformation:
  """Runs `inner`, but when its input gradients or its output updates hold a NaN or Inf, returns
  -0.0 updates and the unchanged inner state, and counts the skip.

  -0.0 (not +0.0) because x + (-0.0) == x bit for bit for every x, negative zero included, so
  `optax.apply_updates` leaves skipped parameters bit-identical. (optax.apply_if_finite emits
  +0.0, which turns -0.0 parameters into +0.0, and gives up after a number of consecutive skips.)
  """

  def init(params):
    return SkipNonfiniteState(jnp.zeros([], jnp.int32), inner.init(params))

  def update(grads, state, params=None):
    updates, new_inner = inner.update(grads, state.inner_state, params)
    ok = jnp.logical_and(_all_finite(grads), _all_finite(updates))
    updates = jax.tree.map(lambda u: jnp.where(ok, u, jnp.array(-0.0, u.dtype)), updates)
    new_inner = jax.tree.map(lambda new, old: jnp.where(ok, new, old), new_inner, state.inner_state)
    skipped = state.skipped + jnp.where(ok, 0, 1).astype(jnp.int32)
    return updates, SkipNonfiniteState(skipped, new_inner)

  return optax.GradientTransformation(init, update)


@gin.configurable
def make_optimizer(optimizer: Callable[[], optax.GradientTransformation] = adafactor,
                   grad_clip_norm: float | None = None,
                   skip_nonfinite: bool = True) -> optax.GradientTransformation:
  """The optimizer the trainer uses: [clip_by_global_norm] -> optimizer(), wrapped in
  `skip_nonfinite_updates`.

  Args:
    optimizer: a configurable called with no arguments (`@adafactor`, the GLaM default, or `@adamw`).
    grad_clip_norm: clip gradients to this global L2 norm first; None = off (GLaM relies on
      Adafactor's update clipping instead).
    skip_nonfinite: skip (and count) updates whose gradients hold NaN/Inf, leaving parameters and
      optimizer state bit-identical. # GLaM (Du et al. 2021): skip batches with NaN/Inf gradients
  """
  check(grad_clip_norm is None or grad_clip_norm > 0, "make_optimizer.grad_clip_norm", grad_clip_norm,
        "must be None or > 0")
  tx = optimizer()
  if not isinstance(tx, optax.GradientTransformation):
    raise TypeError(f"make_optimizer.optimizer={optimizer!r} returned {type(tx).__name__}, "
                    "expected an optax.GradientTransformation")
  if grad_clip_norm is not None:
    tx = optax.chain(optax.clip_by_global_norm(grad_clip_norm), tx)
  if skip_nonfinite:
    tx = skip_nonfinite_updates(tx)
  return tx


def _find(opt_state, cls) -> list:
  is_node = lambda x: isinstance(x, cls)
  return [x for x in jax.tree.leaves(opt_state, is_leaf=is_node) if is_node(x)]


def skipped_updates(opt_state) -> jax.Array:
  """Updates skipped for NaN/Inf so far (int32; 0 when `make_optimizer` was told not to skip)."""
  found = _find(opt_state, SkipNonfiniteState)
  return found[0].skipped if found else jnp.zeros([], jnp.int32)


def current_learning_rate(opt_state) -> jax.Array | None:
  """The learning rate the latest update used (float32), or None for an optimizer that does not
  end in `scale_by_learning_rate` (e.g. a plain optax one)."""
  found = _find(opt_state, LearningRateState)
  return found[0].learning_rate if found else None

"""Routers decide which experts see which tokens: top-k token choice and expert choice.

Both routers compute the same scores, in float32 whatever the input dtype ("selective precision",
Fedus et al. 2021): logits = x W_r with W_r [d_model, experts] and no bias, then a softmax over
experts. They differ in who picks: in token choice each token picks its k best experts; in
expert choice each expert picks its `capacity` best tokens of the group.

Conventions shared with the dispatchers (glam/moe/dispatch.py):
  * A choice whose gate is 0 is not routed: it must not take expert capacity. Padding tokens
    (token_mask False) and second choices dropped by random routing have gate 0.
  * Padding tokens still carry a valid expert_index (their top-k) so that every index is in range.
"""
import math
from typing import NamedTuple

import gin
import jax
import jax.numpy as jnp
from flax import nnx

from glam.moe.capped_assignment import log_capped_assignment

_JITTER_SALT = 0x6A17  # rng streams folded from the layer's key; distinct from dropout's small salts
_SECOND_EXPERT_SALT = 0x5EC2


class TokenChoiceRouting(NamedTuple):
  """What a token-choice router decided, per group of tokens.

  expert_index: [groups, tokens, k] int32, the chosen experts, best first.
  gates:        [groups, tokens, k] float32 combine weights; 0 for a choice that is not routed
                (a padding token, or a second choice dropped by random routing).
  probs:        [groups, tokens, experts] float32 softmax over experts (load-balancing loss).
  logits:       [groups, tokens, experts] float32 (z-loss).
  priority:     [groups, tokens] int32 rank in which tokens claim expert capacity (0 first), or
                None for token order.
  """

  expert_index: jax.Array
  gates: jax.Array
  probs: jax.Array
  logits: jax.Array
  priority: jax.Array | None


class ExpertChoiceRouting(NamedTuple):
  """What an expert-choice router decided, per group of tokens.

  token_index: [groups, experts, capacity] int32, each expert's chosen tokens, best first.
  gates:       [groups, experts, capacity] float32, their router scores (0 for a padding token,
               which is chosen only when the group has fewer real tokens than the capacity).
  probs:       [groups, tokens, experts] float32 softmax over experts.
  logits:      [groups, tokens, experts] float32.
  """

  token_index: jax.Array
  gates: jax.Array
  probs: jax.Array
  logits: jax.Array


def _check_common(cls: str, d_model: int, num_experts: int, jitter_eps: float, init_stddev: float):
  if d_model < 1:
    raise ValueError(f"{cls}.d_model={d_model}: must be >= 1")
  if num_experts < 1:
    raise ValueError(f"{cls}.num_experts={num_experts}: must be >= 1")
  if not 0.0 <= jitter_eps < 1.0:
    raise ValueError(f"{cls}.jitter_eps={jitter_eps}: must be in [0, 1) (noise is U(1-eps, 1+eps))")
  if init_stddev < 0:
    raise ValueError(f"{cls}.init_stddev={init_stddev}: must be >= 0")


class _Router(nnx.Module):
  """The router kernel and the float32 logits shared by both routers."""

  def __init__(self, d_model: int, num_experts: int, jitter_eps: float, init_stddev: float,
               rngs: nnx.Rngs):
    _check_common(type(self).__name__, d_model, num_experts, jitter_eps, init_stddev)
    self.num_experts, self.jitter_eps = num_experts, jitter_eps
    init = nnx.initializers.normal(init_stddev)
    self.kernel = nnx.Param(init(rngs.params(), (d_model, num_experts), jnp.float32),
                            logical_axes=("embed", "expert"))

  def active_parameter_count(self) -> int:
    """Every token uses the whole router."""
    return int(self.kernel[...].size)

  def _logits(self, x: jax.Array, deterministic: bool, rng: jax.Array | None) -> jax.Array:
    """x [groups, tokens, d_model] -> logits [groups, tokens, experts] in float32."""
    if x.ndim != 3:
      raise ValueError(f"{type(self).__name__}: input must be [groups, tokens, d_model], got shape {x.shape}")
    x = x.astype(jnp.float32)
    if not deterministic and self.jitter_eps > 0:
      if rng is None:
        raise ValueError(f"{type(self).__name__}.jitter_eps={self.jitter_eps}: training needs an rng")
      eps = self.jitter_eps
      x = x * jax.random.uniform(jax.random.fold_in(rng, _JITTER_SALT), x.shape, jnp.float32,
                                 1.0 - eps, 1.0 + eps)
    return jnp.einsum("gtm,me->gte", x, self.kernel[...].astype(jnp.float32))  # [groups, tokens, experts]


def _real(token_mask: jax.Array | None, shape) -> jax.Array:
  """[groups, tokens] bool, True on real tokens."""
  if token_mask is None:
    return jnp.ones(shape, bool)
  if token_mask.shape != tuple(shape):
    raise ValueError(f"token_mask has shape {token_mask.shape}; expected [groups, tokens] = {tuple(shape)}")
  return token_mask.astype(bool)


def _check_cap(capacity_factor: float, cap: int | None, entropy: float, iterations: int, entropy_start: float | None):
  if cap is None:
    return
  if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
    raise ValueError(f"ExpertChoiceRouter.max_experts_per_token={cap!r}: must be an int >= 1 or None (uncapped)")
  if cap < capacity_factor:
    raise ValueError(f"ExpertChoiceRouter.max_experts_per_token={cap}: must be >= capacity_factor={capacity_factor} "
                     "(tokens see capacity_factor experts on average, so a smaller cap cannot hold)")
  if not entropy > 0:
    raise ValueError(f"ExpertChoiceRouter.cap_entropy={entropy}: must be > 0")
  if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
    raise ValueError(f"ExpertChoiceRouter.cap_iterations={iterations!r}: must be an int >= 1")
  if entropy_start is not None and not entropy_start >= entropy:
    raise ValueError(f"ExpertChoiceRouter.cap_entropy_start={entropy_start}: must be >= cap_entropy={entropy} "
                     "or None (no annealing)")


@gin.configurable
class TokenChoiceRouter(_Router):
  """Each token picks its k highest-probability experts (k=1 Switch, k=2 GShard / GLaM).

  Args:
    d_model: model width (given by the MoE layer).
    num_experts: experts to choose from (given by the MoE layer).
    k: experts per token (GShard and GLaM: 2; Switch: 1).
    renormalize: divide the k gates by their sum (GShard top-2). Ignored when k=1, where it would
      set every gate to 1 and cut the router off from the task loss; Switch gates by p (Fedus et al.).
    jitter_eps: in training, multiply the router input by U(1-eps, 1+eps) (Switch; HF Switch
      configs: 0.01). Default 0: off.
    random_second_expert: in training, keep the second choice only if U(0,1) < g2 / threshold,
      else set its gate to 0 (GShard, Lepikhin et al. 2020). g2 is the gate after renormalisation;
      the first gate is not renormalised again after a drop (as in mesh-TF). Needs k=2.
    second_expert_threshold: the threshold above (GShard: 0.2, i.e. keep with probability min(1, 5 g2)).
    batch_prioritized: tokens claim capacity in order of their top-1 probability, highest first
      (Batch-Prioritized Routing, Riquelme et al. 2021). Default off: token order.
    init_stddev: router kernel initialiser, normal(stddev) (flaxformer: 2e-2).

  Padding (token_mask False): those tokens keep their top-k expert_index but get gate 0, so a
  dispatcher gives them no capacity, and with batch_prioritized they come after every real token.
  """

  def __init__(self, d_model: int, num_experts: int, *, k: int = 2, renormalize: bool = True,
               jitter_eps: float = 0.0, random_second_expert: bool = False,
               second_expert_threshold: float = 0.2, batch_prioritized: bool = False,
               init_stddev: float = 2e-2, rngs: nnx.Rngs):
    if k < 1:
      raise ValueError(f"TokenChoiceRouter.k={k}: must be >= 1")
    if num_experts >= 1 and k > num_experts:
      raise ValueError(f"TokenChoiceRouter.k={k}: must be <= num_experts={num_experts}")
    if random_second_expert and k != 2:
      raise ValueError(f"TokenChoiceRouter.random_second_expert=True: needs k=2 (GShard top-2), got k={k}")
    if random_second_expert and second_expert_threshold <= 0:
      raise ValueError(f"TokenChoiceRouter.second_expert_threshold={second_expert_threshold}: must be > 0")
    super().__init__(d_model, num_experts, jitter_eps, init_stddev, rngs)
    self.k, self.renormalize = k, renormalize
    self.random_second_expert, self.second_expert_threshold = random_second_expert, second_expert_threshold
    self.batch_prioritized = batch_prioritized

  def __call__(self, x: jax.Array, *, deterministic: bool, rng: jax.Array | None,
               token_mask: jax.Array | None = None) -> TokenChoiceRouting:
    """x: [groups, tokens, d_model]; token_mask: [groups, tokens] bool (False = padding)."""
    logits = self._logits(x, deterministic, rng)  # [groups, tokens, experts]
    probs = jax.nn.softmax(logits, axis=-1)
    real = _real(token_mask, probs.shape[:2])
    top_probs, expert_index = jax.lax.top_k(probs, self.k)  # [groups, tokens, k]
    gates = top_probs
    if self.renormalize and self.k > 1:
      gates = gates / jnp.sum(gates, axis=-1, keepdims=True)
    if self.random_second_expert and not deterministic:
      if rng is None:
        raise ValueError("TokenChoiceRouter.random_second_expert=True: training needs an rng")
      u = jax.random.uniform(jax.random.fold_in(rng, _SECOND_EXPERT_SALT), gates.shape[:2])  # [groups, tokens]
      keep = u < gates[..., 1] / self.second_expert_threshold
      gates = gates.at[..., 1].multiply(keep.astype(gates.dtype))
    gates = jnp.where(real[..., None], gates, 0.0)
    priority = None
    if self.batch_prioritized:
      # Rank by top-1 probability, highest first; padding (key -1 < any probability) goes last.
      key = jnp.where(real, top_probs[..., 0], -1.0)  # [groups, tokens]
      order = jnp.argsort(-key, axis=-1, stable=True)  # token ids, first claimant first
      priority = jnp.argsort(order, axis=-1).astype(jnp.int32)  # the inverse permutation: rank per token
    return TokenChoiceRouting(expert_index.astype(jnp.int32), gates, probs, logits, priority)


@gin.configurable
class ExpertChoiceRouter(_Router):
  """Each expert picks the `capacity` tokens of its group that score it highest (Zhou et al. 2022).

  Scores S = softmax over experts per token; expert e takes the top-capacity tokens of S[:, e],
  with capacity = n c / e for n tokens per group. Load is balanced by construction, so no
  load-balancing loss is needed; a token may be processed by 0, 1 or many experts.

  Not causal: a token's routing depends on the other tokens of its group, including later ones.
  For autoregressive decoding use `decode_routing`, a token-choice fallback: each token takes
  the top-k experts of the same scores S (k defaults to capacity_factor rounded half up, the
  average experts per token in training; at least 1, at most num_experts) with gates equal to those scores, not renormalised.

  Args:
    d_model: model width (given by the MoE layer).
    num_experts: experts (given by the MoE layer).
    capacity_factor: c, the average number of experts per token (Zhou et al.: 2, matching GShard
      top-2 compute).
    jitter_eps: in training, multiply the router input by U(1-eps, 1+eps) (Switch; default 0: off).
    init_stddev: router kernel initialiser, normal(stddev) (flaxformer: 2e-2).
    max_experts_per_token: b, capped expert choice (Zhou et al. §3.3): experts pick the top
      tokens of an entropy-regularised assignment whose token columns sum to at most b (see
      glam/moe/capped_assignment.py); gates stay the scores S. None (default): uncapped. Must be
      >= capacity_factor, the mean experts per token. Applies to training and eval groups;
      `decode_routing` is unchanged.
    cap_entropy: the assignment's entropy weight lambda (Zhou et al. §3.3: 0.001).
    cap_iterations: Dykstra rounds per group (Zhou et al. §3.3: at most 100).
    cap_entropy_start: anneal lambda from this value to cap_entropy over the first 80% of the
      rounds, a warm start that the paper does not use; without it 100 rounds at lambda = 0.001
      barely move peaked scores. None: every round at cap_entropy, as in the paper.

  Padding (token_mask False): padding tokens score -inf before the top-k over tokens, so an
  expert picks one only when the group has fewer real tokens than the capacity; its gate is 0.
  """

  def __init__(self, d_model: int, num_experts: int, *, capacity_factor: float = 2.0,
               jitter_eps: float = 0.0, init_stddev: float = 2e-2, max_experts_per_token: int | None = None,
               cap_entropy: float = 0.001, cap_iterations: int = 100, cap_entropy_start: float | None = 1.0,
               rngs: nnx.Rngs):
    if not capacity_factor > 0:
      raise ValueError(f"ExpertChoiceRouter.capacity_factor={capacity_factor}: must be > 0")
    _check_cap(capacity_factor, max_experts_per_token, cap_entropy, cap_iterations, cap_entropy_start)
    super().__init__(d_model, num_experts, jitter_eps, init_stddev, rngs)
    self.capacity_factor = capacity_factor
    self.max_experts_per_token, self.cap_entropy = max_experts_per_token, cap_entropy
    self.cap_iterations, self.cap_entropy_start = cap_iterations, cap_entropy_start

  def capacity(self, tokens_per_group: int) -> int:
    """Tokens per expert: n c / e rounded half up, at least 1 and at most n."""
    exact = tokens_per_group * self.capacity_factor / self.num_experts
    return max(1, min(tokens_per_group, math.floor(exact + 0.5)))

  def __call__(self, x: jax.Array, *, deterministic: bool, rng: jax.Array | None,
               token_mask: jax.Array | None = None) -> ExpertChoiceRouting:
    """x: [groups, tokens, d_model]; token_mask: [groups, tokens] bool (False = padding)."""
    logits = self._logits(x, deterministic, rng)  # [groups, tokens, experts]
    probs = jax.nn.softmax(logits, axis=-1)
    real = _real(token_mask, probs.shape[:2])
    scores = jnp.where(real[..., None], probs, -jnp.inf).swapaxes(1, 2)  # [groups, experts, tokens]
    if self.max_experts_per_token is not None:
      return self._capped(scores, real, probs, logits)
    top_scores, token_index = jax.lax.top_k(scores, self.capacity(x.shape[1]))  # [groups, experts, capacity]
    gates = jnp.where(jnp.isneginf(top_scores), 0.0, top_scores)
    return ExpertChoiceRouting(token_index.astype(jnp.int32), gates, probs, logits)

  def _capped(self, scores, real, probs, logits) -> ExpertChoiceRouting:
    """Each expert takes the top-capacity tokens of its row of the capped assignment A."""
    capacity = self.capacity(scores.shape[2])
    log_a = log_capped_assignment(jnp.where(real[:, None, :], scores, 0.0), capacity, self.max_experts_per_token,
                                  self.cap_entropy, self.cap_iterations, real, self.cap_entropy_start)
    _, token_index = jax.lax.top_k(log_a, capacity)  # [groups, experts, capacity]; padding (-inf) last
    gates = jnp.take_along_axis(scores, token_index, axis=2)  # S keeps its gradient; A has none
    gates = jnp.where(jnp.isneginf(gates), 0.0, gates)
    return ExpertChoiceRouting(token_index.astype(jnp.int32), gates, probs, logits)

  def decode_routing(self, x: jax.Array, *, k: int | None = None,
                     token_mask: jax.Array | None = None) -> TokenChoiceRouting:
    """Causal per-token routing for decoding (see the class docstring); no jitter."""
    if k is None:
      k = max(1, min(self.num_experts, math.floor(self.capacity_factor + 0.5)))  # rounded half up
    elif not 1 <= k <= self.num_experts:
      raise ValueError(f"ExpertChoiceRouter.decode_routing k={k}: must be in [1, num_experts={self.num_experts}]")
    logits = self._logits(x, True, None)  # [groups, tokens, experts]
    probs = jax.nn.softmax(logits, axis=-1)
    real = _real(token_mask, probs.shape[:2])
    gates, expert_index = jax.lax.top_k(probs, k)  # [groups, tokens, k]
    gates = jnp.where(real[..., None], gates, 0.0)
    return TokenChoiceRouting(expert_index.astype(jnp.int32), gates, probs, logits, None)

"""Capped expert choice: an entropy-regularised assignment of tokens to experts (Zhou et al. 2022, §3.3).

Uncapped expert choice lets a token be taken by every expert. The capped variant first solves,
per routing group, for A in R^{experts x tokens}:

  maximise <S, A> + entropy * H(A),  H(A) = sum -A log A
  subject to  each expert row sums to k,  each token column sums to at most b,  0 <= A <= 1,

and then lets each expert take the top-k tokens of its row of A. Up to a constant this is the
KL projection of K = exp(S / entropy) onto the intersection of the three convex sets, which
Dykstra's alternating Bregman projections reach. Each projection is a rescaling (rows by
k / rowsum, columns by min(1, b / colsum), entries by min(1, .)), and Dykstra's corrections of
the two inequality sets are exactly their dual variables, so one round is block coordinate ascent
on the dual:

  log A = (S - u - v - W) / entropy,   u [experts] free,  v [tokens] >= 0,  W [experts, tokens] >= 0,
  u: rows sum to k;   v: columns sum to at most b;   W: entries at most 1.

Working on these duals, in the units of S, keeps everything finite in float32 (with entropy =
0.001 and S in [0, 1], exp(S / entropy) itself would overflow: exp(89) does) and makes
"entropy scaling" a one-line change: start at a large entropy and shrink it geometrically to the
target over the first ANNEAL_FRACTION of the rounds, a warm start for the same final problem.
With the paper's entropy = 0.001, 100 plain rounds leave the solution far from converged on
peaked scores (the cap is barely felt); see README "Capped expert choice".
"""
import math

import jax
import jax.numpy as jnp

ANNEAL_FRACTION = 0.8  # rounds spent shrinking the entropy when entropy_start is given; the rest run at `entropy`
# Scores of padding tokens inside the loop: finite (so that no shift computes inf - inf), and so
# low that their entries of A are exactly 0.
_PADDING_SCORE = -1e30


def _check(k: int, b: int, entropy: float, iterations: int, entropy_start: float | None, tokens: int):
  if not 1 <= k <= tokens:
    raise ValueError(f"capped_assignment k={k}: must be in [1, tokens={tokens}] (tokens per expert)")
  if b < 1:
    raise ValueError(f"capped_assignment b={b}: must be >= 1 (experts per token)")
  if not entropy > 0:
    raise ValueError(f"capped_assignment entropy={entropy}: must be > 0")
  if iterations < 1:
    raise ValueError(f"capped_assignment iterations={iterations}: must be >= 1")
  if entropy_start is not None and not entropy_start >= entropy:
    raise ValueError(f"capped_assignment entropy_start={entropy_start}: must be >= entropy={entropy} (or None)")


def _entropy_at(step, entropy: float, iterations: int, entropy_start: float | None):
  """The entropy of round `step`: geometric from entropy_start to entropy, then constant."""
  if entropy_start is None:
    return jnp.float32(entropy)
  anneal = max(1, math.ceil(ANNEAL_FRACTION * iterations))
  progress = jnp.minimum(step / anneal, 1.0)
  return jnp.float32(entropy_start) * jnp.float32(entropy / entropy_start) ** progress


def log_capped_assignment(scores: jax.Array, k: int, b: int, entropy: float, iterations: int,
                          token_mask: jax.Array | None = None, entropy_start: float | None = None) -> jax.Array:
  """log A for scores [groups, experts, tokens]; -inf on padding tokens (token_mask [groups, tokens] False).

  Selecting on log A rather than A keeps the order of entries that underflow to 0 in A.
  `iterations` rounds of (rows, column cap, clip), then a last row update, so rows sum to k
  exactly and the column cap and the bound 1 hold as far as the rounds converged. When no A meets
  all three constraints (experts x k > tokens x b, or fewer than k real tokens) the result stays
  finite on real tokens. No gradient flows (the top-k selection made from A is discrete).
  entropy_start: None runs every round at `entropy` (plain Dykstra, as in the paper); a value
  anneals from it (see the module docstring).
  """
  if scores.ndim != 3:
    raise ValueError(f"capped_assignment: scores must be [groups, experts, tokens], got shape {scores.shape}")
  _check(k, b, entropy, iterations, entropy_start, scores.shape[2])
  groups, experts, tokens = scores.shape
  if token_mask is None:
    real = jnp.ones((groups, 1, tokens), bool)
  else:
    if token_mask.shape != (groups, tokens):
      raise ValueError(f"capped_assignment: token_mask has shape {token_mask.shape}; expected "
                       f"[groups, tokens] = {(groups, tokens)}")
    real = token_mask.astype(bool)[:, None, :]  # [groups, 1, tokens]
  scores = jnp.where(real, jax.lax.stop_gradient(scores).astype(jnp.float32), _PADDING_SCORE)
  log_k, log_b = math.log(k), math.log(b)

  def row_dual(v, clip, temperature):  # u [groups, experts, 1]: rows of A sum to k
    log_a = jnp.where(real, (scores - v - clip) / temperature, _PADDING_SCORE)
    return temperature * (jax.nn.logsumexp(log_a, axis=2, keepdims=True) - log_k)

  def round_of_projections(step, duals):
    v, clip = duals  # v [groups, 1, tokens] >= 0, clip [groups, experts, tokens] >= 0
    temperature = _entropy_at(step, entropy, iterations, entropy_start)
    u = row_dual(v, clip, temperature)
    log_a = jnp.where(real, (scores - u - clip) / temperature, _PADDING_SCORE)
    v = jnp.maximum(temperature * (jax.nn.logsumexp(log_a, axis=1, keepdims=True) - log_b), 0.0)
    clip = jnp.maximum(scores - u - v, 0.0)
    return v, clip

  duals = (jnp.zeros((groups, 1, tokens), jnp.float32), jnp.zeros(scores.shape, jnp.float32))
  v, clip = jax.lax.fori_loop(0, iterations, round_of_projections, duals)
  # The last row update in log units: dividing (S - u) by a small entropy would scale float32
  # rounding up by 1 / entropy, normalising after the division keeps rows at k to ~1e-6.
  log_a = jnp.where(real, (scores - v - clip) / jnp.float32(entropy), _PADDING_SCORE)
  log_a = log_a - (jax.nn.logsumexp(log_a, axis=2, keepdims=True) - log_k)
  return jnp.where(real, log_a, -jnp.inf)


def capped_assignment(scores: jax.Array, k: int, b: int, entropy: float, iterations: int,
                      token_mask: jax.Array | None = None, entropy_start: float | None = None) -> jax.Array:
  """A [groups, experts, tokens] in [0, 1] (see the module docstring); 0 on padding tokens."""
  return jnp.exp(log_capped_assignment(scores, k, b, entropy, iterations, token_mask, entropy_start))

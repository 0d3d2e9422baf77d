"""Routers with a per-expert logit bias, so that grown experts can start unreachable.

`glam experts grow --init=preserve` switches a model to these routers: the bias of the old
experts is 0 and that of the new ones so negative that their softmax probability is exactly 0 in
float32, so routing, gates and outputs are those of the old model (see glam/surgery/grow.py).
The bias is an ordinary parameter ([experts], logical axis "expert"): it trains, and
`freeze.first_experts` freezes its old entries like the old router columns.

The subclasses take every other setting from the parent's gin bindings (TokenChoiceRouter.k,
ExpertChoiceRouter.capacity_factor, ...): gin fills them when the parent's __init__ runs.
"""
import gin
import jax
import jax.numpy as jnp
from flax import nnx

from glam.moe.routers import ExpertChoiceRouter, TokenChoiceRouter


def _bias(num_experts: int) -> nnx.Param:
  return nnx.Param(jnp.zeros((num_experts,), jnp.float32), logical_axes=("expert",))


@gin.configurable
class BiasedTokenChoiceRouter(TokenChoiceRouter):
  """TokenChoiceRouter whose logits get a trainable per-expert bias (initialised to 0)."""

  def __init__(self, d_model: int, num_experts: int, *, rngs: nnx.Rngs):
    super().__init__(d_model, num_experts, rngs=rngs)
    self.bias = _bias(num_experts)

  def _logits(self, x: jax.Array, deterministic: bool, rng: jax.Array | None) -> jax.Array:
    return super()._logits(x, deterministic, rng) + self.bias[...]  # [groups, tokens, experts]


@gin.configurable
class BiasedExpertChoiceRouter(ExpertChoiceRouter):
  """ExpertChoiceRouter whose logits get a trainable per-expert bias (initialised to 0)."""

  def __init__(self, d_model: int, num_experts: int, *, rngs: nnx.Rngs):
    super().__init__(d_model, num_experts, rngs=rngs)
    self.bias = _bias(num_experts)

  def _logits(self, x: jax.Array, deterministic: bool, rng: jax.Array | None) -> jax.Array:
    return super()._logits(x, deterministic, rng) + self.bias[...]  # [groups, tokens, experts]

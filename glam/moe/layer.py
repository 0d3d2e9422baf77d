"""MoeLayer = router x dispatcher x experts, a sub-layer kind ("moe") for block specs.

The layer only wires the three parts together and reports what happened: auxiliary losses
(already multiplied by their weights; the LM adds every `loss_*` entry to the training loss) and
routing statistics (per-expert load, dropped tokens, router entropy and confidence).
"""
from typing import Callable

import gin
import jax
import jax.numpy as jnp
from flax import nnx

from glam.layers.context import LayerContext
from glam.models.blocks import register_sublayer
from glam.moe.dispatch import CapacityEinsum, Dropless
from glam.moe.experts import Experts
from glam.moe.losses import load_balancing_loss, router_z_loss, routing_statistics
from glam.moe.routers import ExpertChoiceRouter, ExpertChoiceRouting, TokenChoiceRouter
from glam.parallel.constraints import DISPATCHED, DISPATCHED_ROWS, GROUPED_TOKENS, ExpertShardedCall, constrain
from glam.parallel.mesh import batch_shards


def _param_count(module) -> int:
  return sum(v.get_value().size for _, v in nnx.to_flat_state(nnx.state(module, nnx.Param)))


@gin.configurable
class MoeLayer(nnx.Module):
  """A sparse FFN: each token is processed by the experts its router picks.

  Args:
    d_model: model width (given by the block).
    num_experts: experts in this layer (GLaM: 64).
    d_ff: hidden width of each expert (GLaM: the dense model's FFN width).
    activation: expert activation; GLaM experts are plain "gelu" (the EC paper's GeLU(x W1) W2).
    router: a router class, e.g. @TokenChoiceRouter (k=1 Switch, k=2 GShard/GLaM) or @ExpertChoiceRouter.
    dispatcher: @CapacityEinsum() (GShard-style, drops over capacity) or @Dropless() (sorted, grouped matmul).
    group_size: tokens routed together (capacity and expert choice are per group; GShard uses 1024).
      The last group is padded with masked tokens when the batch does not divide into groups.
    expert_dropout: dropout inside experts (Switch fine-tuning: 0.4; pretraining: 0).
    load_balance_weight: Switch load-balancing loss coefficient (Fedus et al.: 0.01; GLaM: 0.01).
    z_loss_weight: router z-loss coefficient (ST-MoE, Zoph et al.: 0.001).
  """

  def __init__(self, d_model: int, *, num_experts: int = 8, d_ff: int = 2048, activation: str = "gelu",
               router: Callable[..., nnx.Module] = TokenChoiceRouter, dispatcher=CapacityEinsum(),
               group_size: int = 1024, expert_dropout: float = 0.0, load_balance_weight: float = 0.01,
               z_loss_weight: float = 0.001, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
    if num_experts < 1:
      raise ValueError(f"MoeLayer.num_experts={num_experts}: must be >= 1")
    if group_size < 1:
      raise ValueError(f"MoeLayer.group_size={group_size}: must be >= 1")
    self.router = router(d_model, num_experts, rngs=rngs)
    if isinstance(self.router, ExpertChoiceRouter) and isinstance(dispatcher, Dropless):
      raise ValueError("MoeLayer.dispatcher=Dropless() with MoeLayer.router=@ExpertChoiceRouter: expert choice "
                       "has a fixed capacity per expert; use @CapacityEinsum()")
    self.experts = Experts(d_model, num_experts, d_ff=d_ff, activation=activation,
                           dropout_rate=expert_dropout, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.dispatcher = dispatcher
    self.num_experts, self.group_size, self.dtype = num_experts, group_size, dtype
    self.load_balance_weight, self.z_loss_weight = load_balance_weight, z_loss_weight

  def experts_per_token(self) -> float:
    if isinstance(self.router, ExpertChoiceRouter):
      return float(self.router.capacity_factor)  # on average c experts per token (Zhou et al. 2022)
    return float(self.router.k)

  def active_parameter_count(self) -> int:
    """Parameters one token uses: the router and experts_per_token of the E experts."""
    expert = _param_count(self.experts)
    return _param_count(self.router) + round(expert * self.experts_per_token() / self.num_experts)

  def active_matmul_parameter_count(self) -> int:
    return self.active_parameter_count()

  def _groups(self, x: jax.Array, token_mask: jax.Array | None):
    """[batch, length, d] -> [groups, group_size, d] plus the mask of real tokens."""
    batch, length, d_model = x.shape
    tokens = batch * length
    size = min(self.group_size, tokens)
    groups = -(-tokens // size)
    pad = groups * size - tokens
    mask = jnp.ones((batch, length), bool) if token_mask is None else token_mask.astype(bool)
    flat_x = jnp.pad(x.reshape(tokens, d_model), ((0, pad), (0, 0)))
    flat_mask = jnp.pad(mask.reshape(tokens), (0, pad))
    return flat_x.reshape(groups, size, d_model), flat_mask.reshape(groups, size)

  def __call__(self, x: jax.Array, ctx: LayerContext, cache=None):
    batch, length, d_model = x.shape
    grouped, mask = self._groups(x, ctx.token_mask)  # [groups, tokens, d_model], [groups, tokens]
    grouped = constrain(grouped, GROUPED_TOKENS)  # groups over the batch axes
    decoding = ctx.cache_index is not None
    if decoding and isinstance(self.router, ExpertChoiceRouter):
      routing = self.router.decode_routing(grouped, token_mask=mask)  # causal fallback, see the router
    else:
      routing = self.router(grouped, deterministic=ctx.deterministic, rng=ctx.rng, token_mask=mask)
    # GSPMD expert parallelism: the capacity path's [experts, rows, d_model] is split over `expert`.
    experts = self.experts
    if isinstance(self.dispatcher, CapacityEinsum):
      experts = ExpertShardedCall(self.experts, self._dispatched_axes(grouped.shape[0]))
    y, dispatch_stats = self.dispatcher(grouped, routing, experts, ctx)
    y = y.reshape(-1, d_model)[: batch * length].reshape(batch, length, d_model)

    aux = {"loss_router_z": self.z_loss_weight * router_z_loss(routing.logits, mask)}
    if not isinstance(routing, ExpertChoiceRouting):  # expert choice is balanced by construction
      aux["loss_load_balance"] = self.load_balance_weight * load_balancing_loss(routing, token_mask=mask)
    aux.update(routing_statistics(routing, self.num_experts, token_mask=mask))
    aux.update(dispatch_stats)  # the dispatcher's expert_load counts what was kept after capacity
    return y.astype(x.dtype), None, aux

  def _dispatched_axes(self, groups: int) -> tuple:
    """Logical axes of the capacity path's [experts, rows, d_model]: experts over `expert`.

    Except for the one-hot einsum placement when the groups do not divide the batch shards: XLA's
    SPMD partitioner (jax 0.10, CPU) then computes a wrong result with the experts split (4 groups
    on data 2 x expert 4: loss off by 7e-3, tests/test_parallel_equivalence.py), so every device
    runs every expert on its rows (correct, but the expert weights are gathered).
    """
    if self.dispatcher.uses_einsum() and groups % batch_shards():
      return DISPATCHED_ROWS
    return DISPATCHED


register_sublayer("moe", MoeLayer)

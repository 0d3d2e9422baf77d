"""MoDE (Schafhalter et al. 2024): a backbone LM plus K modular domain experts.

Each expert is a small stack of transformer blocks attached *in parallel* to a span of the
backbone's blocks. At the end of the span a learned gate mixes the backbone's hidden state h with
every expert's output e_k (all experts are active for every token; nothing is sparse):

  x_in              the residual stream where the span starts (input to backbone span and experts)
  h   = backbone blocks [start, stop)(x_in)
  e_k = expert k's `expert_depth` blocks(x_in)                       k = 1..K, run batched (vmap)
  g_k = gate_scale_k * sigmoid(rms(x_in) . gate_kernel_k + gate_bias_k)   per token
  out = h + sum_k g_k * (e_k - h)

The paper does not give the gate formula (specs/moe-papers.md, open gap 4); this one is ours:
one sigmoid per expert so that composing experts is a concatenation, times a learned scalar that
starts at `gate_scale_init` = 0 so that a fresh gate passes exactly the backbone (as Flamingo's
zero-initialised tanh gates do); the gate reads x_in so it can run concurrently with both branches.

Parameter layout: MoDELM *is* a DecoderLM (subclass), so the backbone keeps exactly DecoderLM's
paths (embed/..., blocks/..., final_norm/..., logits_kernel) and a backbone checkpoint loads
directly; everything new lives under `domain_experts/`, each array with a leading axis of size K
(logical axis "domain_expert"), so `glam mode compose` concatenates experts along axis 0.
"""
from typing import Any, Sequence

import gin
import jax
import jax.numpy as jnp
from flax import nnx

from glam.config import check
from glam.layers.context import LayerContext
from glam.models.blocks import Block, parse_block_spec
from glam.models.lm import REMAT_POLICIES, DecoderLM
from glam.parallel.axis_rules import DEFAULT_RULES
from glam.parallel.constraints import TOKENS, constrain

EXPERT_AXIS = "domain_expert"  # logical name of the K axis: map it to a mesh axis in axis_rules
EXPERT_CACHE_KEY = "domain_experts"  # the experts' KV cache sits beside the backbone's layers
EXPERT_OUTPUTS = (EXPERT_AXIS, "batch", "length", None)  # [experts, batch, length, d_model]


@gin.configurable
def mode_axis_rules(domain_expert: str | Sequence[str] | None = None) -> tuple:
  """The default axis rules plus the MoDE expert axis: bind `axis_rules.rules = @mode_axis_rules()`.

  Args:
    domain_expert: mesh axis (or axes) the K domain experts are split over; None keeps every
      expert on every device. "expert" places expert k's weights (and its activations) on the
      devices of slice k of the mesh's expert axis: each device group then computes only its
      own experts (SPMD; the paper's concurrent device groups are MPMD).
  """
  # DEFAULT_RULES already keeps domain_expert whole: replace that entry rather than append a second.
  return tuple(rule for rule in DEFAULT_RULES if rule[0] != EXPERT_AXIS) + ((EXPERT_AXIS, domain_expert),)


def _prefix_axes(module: nnx.Module, prefix: tuple) -> None:
  """Writes the stacked leading axes into every parameter's logical axes, so the sharding rules
  and `glam model summary --per_parameter` see [domain_expert, layers, ...] dims."""
  for _, variable in nnx.iter_graph(module):
    if isinstance(variable, nnx.Param):
      axes = tuple(variable.get_metadata().get("logical_axes", ()) or ())
      rank = len(variable.get_value().shape)
      names = prefix + axes if len(axes) == rank - len(prefix) else (None,) * rank
      variable.set_metadata(logical_axes=names)


class DomainGate(nnx.Module):
  """Per site and expert: g_k = scale_k * sigmoid(rms(x) . kernel_k + bias_k). See the module doc."""

  def __init__(self, num_domains: int, num_sites: int, d_model: int, *, scale_init: float,
               bias_init: float, rngs: nnx.Rngs, param_dtype=jnp.float32):
    init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=-1, out_axis=(0, 1))
    self.kernel = nnx.Param(init(rngs.params(), (num_domains, num_sites, d_model), param_dtype),
                            logical_axes=(EXPERT_AXIS, "layers", "embed"))
    self.bias = nnx.Param(jnp.full((num_domains, num_sites), bias_init, param_dtype),
                          logical_axes=(EXPERT_AXIS, "layers"))
    self.scale = nnx.Param(jnp.full((num_domains, num_sites), scale_init, param_dtype),
                           logical_axes=(EXPERT_AXIS, "layers"))

  def __call__(self, x: jax.Array, site: int) -> jax.Array:
    """x: [batch, length, d_model] -> gates [experts, batch, length] float32."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + 1e-6)
    kernel = self.kernel[...][:, site].astype(jnp.float32)
    logits = jnp.einsum("btd,kd->kbt", normed, kernel)  # [experts, batch, length]
    logits = logits + self.bias[...][:, site, None, None].astype(jnp.float32)
    return self.scale[...][:, site, None, None].astype(jnp.float32) * jax.nn.sigmoid(logits)


class DomainExperts(nnx.Module):
  """K experts x (sites x depth) blocks, stacked [K, sites * depth, ...], and their gates."""

  def __init__(self, num_domains: int, num_sites: int, depth: int, block: Sequence[Any], d_model: int, *,
               gate_scale_init: float, gate_bias_init: float, rngs: nnx.Rngs, dtype, param_dtype):
    make_block = lambda key: Block(block, d_model, rngs=nnx.Rngs(key), dtype=dtype, param_dtype=param_dtype)
    keys = jax.random.split(rngs.params(), (num_domains, num_sites * depth))
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: make_block(keys[0, 0])))
    stacked = jax.vmap(jax.vmap(lambda key: nnx.split(make_block(key))[1]))(keys)
    self.blocks = nnx.merge(graphdef, stacked)
    _prefix_axes(self.blocks, (EXPERT_AXIS, "layers"))
    self.gate = DomainGate(num_domains, num_sites, d_model, scale_init=gate_scale_init,
                           bias_init=gate_bias_init, rngs=rngs, param_dtype=param_dtype)


def run_stack(graphdef, stacked, x, ctx: LayerContext, cache, layer_ids: jax.Array, *,
              scan: bool, remat_policy: str, rng_salt: int = 0):
  """Runs blocks stacked along axis 0 of `stacked` (and of `cache`) in order, like
  DecoderLM._run_blocks but over any slice: dropout keys fold in the global layer ids (plus
  `rng_salt`) so a backbone span sees the keys the whole-stack run would."""
  base_rng = ctx.rng

  def one_block(x, xs):
    block_state, cache_slice, layer = xs
    block_ctx = ctx if base_rng is None else ctx.with_rng(jax.random.fold_in(base_rng, layer + rng_salt))
    y, new_slice, aux = nnx.merge(graphdef, block_state)(x, block_ctx, cache_slice)
    return y, (new_slice, aux)

  if remat_policy != "none":
    one_block = jax.checkpoint(one_block, policy=REMAT_POLICIES[remat_policy], prevent_cse=not scan)
  xs = (stacked, cache, layer_ids)
  if scan:
    x, (new_cache, aux) = jax.lax.scan(one_block, x, xs)
    return x, new_cache, aux
  outputs = []
  for i in range(layer_ids.shape[0]):
    x, out = one_block(x, jax.tree.map(lambda a: a[i], xs))
    outputs.append(out)
  new_cache, aux = jax.tree.map(lambda *a: jnp.stack(a), *outputs)
  return x, new_cache, aux


def _take(tree, start: int, stop: int, axis: int = 0):
  return jax.tree.map(lambda a: jax.lax.slice_in_dim(a, start, stop, axis=axis), tree)


@gin.configurable
class MoDELM(DecoderLM):
  """A DecoderLM backbone (configured by the DecoderLM.* bindings) plus K domain experts.

  Args:
    num_domains: K, the number of domain experts (1 while training one expert; the sum of the
      experts' K after `glam mode compose`). # MoDE (Schafhalter et al. 2024): 2 domains (Code, Math) ◐
    boundaries: backbone block indices, strictly increasing in [0, DecoderLM.num_blocks]; each
      consecutive pair (start, stop) is a span that gets one expert stack per domain in parallel,
      and the gate mixes at `stop`. None = one span over the whole backbone, (0, num_blocks).
      # MoDE: 3 MoDE blocks ◐, e.g. (0, 8, 16, 24) for a 24-block backbone
    expert_depth: blocks per expert per span. # MoDE: 2 transformer layers per expert ◐
    expert_block: the block spec of the expert layers (default a dense ("attn", "ffn") layer; the
      sub-layers take the same Attention.* / FeedForward.* bindings as the backbone's).
    gate_scale_init: initial gate scale; 0 = the model starts exactly as the backbone (ours: the
      paper gives no gate formula).
    gate_bias_init: initial gate logit bias (0 = sigmoid 0.5 once the scale has moved).
  Everything else (vocab_size, d_model, num_blocks, block, dtype, ...) goes to DecoderLM.
  """

  def __init__(self, *, num_domains: int = 2, boundaries: Sequence[int] | None = None,
               expert_depth: int = 2, expert_block: Sequence[Any] = ("attn", "ffn"),
               gate_scale_init: float = 0.0, gate_bias_init: float = 0.0, rngs: nnx.Rngs, **backbone):
    super().__init__(rngs=rngs, **backbone)
    check(num_domains >= 1, "MoDELM.num_domains", num_domains, "must be >= 1")
    check(expert_depth >= 1, "MoDELM.expert_depth", expert_depth, "must be >= 1")
    boundaries = (0, self.num_blocks) if boundaries is None else tuple(int(b) for b in boundaries)
    check(len(boundaries) >= 2 and all(a < b for a, b in zip(boundaries, boundaries[1:]))
          and boundaries[0] >= 0 and boundaries[-1] <= self.num_blocks, "MoDELM.boundaries", boundaries,
          f"expected >= 2 strictly increasing block indices in [0, DecoderLM.num_blocks={self.num_blocks}]")
    parse_block_spec(expert_block)
    self.num_domains, self.boundaries, self.expert_depth = num_domains, boundaries, expert_depth
    self.expert_block_spec = tuple(expert_block)
    self.domain_experts = DomainExperts(
        num_domains, len(boundaries) - 1, expert_depth, expert_block, self.d_model,
        gate_scale_init=gate_scale_init, gate_bias_init=gate_bias_init, rngs=rngs,
        dtype=self.dtype, param_dtype=self.embed.embedding[...].dtype)

  @property
  def num_sites(self) -> int:
    return len(self.boundaries) - 1

  def _pieces(self):
    """(start, stop, site or None) covering the backbone in order; None = no experts attached."""
    pieces, previous = [], 0
    for site, (start, stop) in enumerate(zip(self.boundaries, self.boundaries[1:])):
      if start > previous:
        pieces.append((previous, start, None))
      pieces.append((start, stop, site))
      previous = stop
    if previous < self.num_blocks:
      pieces.append((previous, self.num_blocks, None))
    return pieces

  def init_expert_cache(self, batch: int, max_length: int) -> dict:
    """Zero KV caches of the experts' attention sub-layers: [K, sites * depth, batch, max_len, heads, head_dim]."""
    caches = {}
    for i, (kind, _) in enumerate(parse_block_spec(self.expert_block_spec)):
      if kind == "attn":
        layer = getattr(self.domain_experts.blocks, f"{kind}_{i}")
        shape = (self.num_domains, self.num_sites * self.expert_depth, batch, max_length,
                 layer.num_heads, layer.head_dim)
        caches[f"{kind}_{i}"] = {"key": jnp.zeros(shape, self.dtype), "value": jnp.zeros(shape, self.dtype)}
    return caches

  def _run_blocks(self, x, ctx: LayerContext, layer_cache):
    """Overrides DecoderLM's stack walk: backbone spans, with the experts and gate at each site."""
    graphdef, stacked = nnx.split(self.blocks)
    expert_graphdef, expert_stacked = nnx.split(self.domain_experts.blocks)
    backbone_cache, expert_cache = layer_cache, None
    if layer_cache is not None:
      backbone_cache = {k: v for k, v in layer_cache.items() if k != EXPERT_CACHE_KEY}
      expert_cache = layer_cache.get(EXPERT_CACHE_KEY)
      if expert_cache is None:  # the first call with a fresh decode.init_cache: add the experts'
        expert_cache = self.init_expert_cache(x.shape[0], ctx.mask.shape[-1])
    run = dict(scan=self.scan_layers, remat_policy=self.remat_policy)
    caches, auxes, expert_caches, expert_losses, gate_means = [], [], [], {}, []
    for start, stop, site in self._pieces():
      x_in = x
      x, new_cache, aux = run_stack(graphdef, _take(stacked, start, stop), x_in, ctx,
                                    None if backbone_cache is None else _take(backbone_cache, start, stop),
                                    jnp.arange(start, stop), **run)
      caches.append(new_cache)
      auxes.append(aux)
      if site is None:
        continue
      lo, hi = site * self.expert_depth, (site + 1) * self.expert_depth
      site_cache = None if expert_cache is None else _take(expert_cache, lo, hi, axis=1)
      run_expert = lambda state, cache: run_stack(expert_graphdef, state, x_in, ctx, cache, jnp.arange(lo, hi),
                                                  rng_salt=self.num_blocks, **run)
      outputs, new_site_cache, expert_aux = jax.vmap(run_expert)(_take(expert_stacked, lo, hi, axis=1), site_cache)
      outputs = constrain(outputs, EXPERT_OUTPUTS)  # [experts, batch, length, d_model]
      expert_caches.append(new_site_cache)
      for key, value in expert_aux.items():
        if key.rsplit("/", 1)[-1].startswith("loss_"):
          expert_losses[key] = expert_losses.get(key, 0.0) + jnp.sum(value)
      gates = self.domain_experts.gate(x_in, site)  # [experts, batch, length]
      delta = outputs - x[None].astype(outputs.dtype)
      x = x + jnp.einsum("kbt,kbtd->btd", gates.astype(delta.dtype), delta).astype(x.dtype)  # [batch, length, d_model]
      x = constrain(x, TOKENS)
      gate_means.append(_masked_mean(gates, ctx.token_mask))
    aux = jax.tree.map(lambda *a: jnp.concatenate(a), *auxes)
    aux.update({f"domain_experts.{key}": value for key, value in expert_losses.items()})
    aux["mode_gate/mean"] = jnp.stack(gate_means)  # [sites, experts]: how much each expert is used
    new_cache = None
    if layer_cache is not None:
      new_cache = jax.tree.map(lambda *a: jnp.concatenate(a), *caches)
      new_cache[EXPERT_CACHE_KEY] = jax.tree.map(lambda *a: jnp.concatenate(a, axis=1), *expert_caches)
    return x, new_cache, aux


def _masked_mean(gates: jax.Array, token_mask: jax.Array | None) -> jax.Array:
  """gates [experts, batch, length] -> [experts], the mean over real (non-padding) tokens."""
  if token_mask is None:
    return jnp.mean(gates, axis=(1, 2))
  weights = token_mask.astype(gates.dtype)
  return jnp.sum(gates * weights, axis=(1, 2)) / jnp.maximum(jnp.sum(weights), 1.0)

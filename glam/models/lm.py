"""Decoder-only language model: embed -> repeated blocks (scanned) -> RMSNorm -> logits."""
import functools
from typing import Any, NamedTuple, Sequence

import gin
import jax
import jax.numpy as jnp
from flax import nnx

from glam.kernels.matmul import matmul
from glam.layers.context import LayerContext
from glam.layers.embedding import Embed
from glam.layers.masks import attention_mask
from glam.layers.norms import RMSNorm
from glam.models.blocks import Block, parse_block_spec
from glam.models.per_layer import after_input_gradient, is_per_layer, layer_trees
from glam.parallel.constraints import TOKENS, constrain

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
REMAT_POLICIES = {
    "none": None,  # keep every activation (fastest, most memory)
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute the whole block in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots,  # keep matmul outputs, recompute the rest
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class LmOutput(NamedTuple):
  logits: jax.Array  # [batch, length, vocab] float32
  aux_loss: jax.Array  # scalar: weighted auxiliary losses of all sub-layers (MoE), already scaled
  metrics: dict  # "sublayer/name" -> [num_blocks, ...] per-layer values (routing statistics)
  cache: dict | None  # the updated KV cache when decoding


def dtype_from_name(binding: str, name: str):
  if name not in DTYPES:
    raise ValueError(f"{binding}={name!r}: expected one of {sorted(DTYPES)}")
  return DTYPES[name]


@gin.configurable
class DecoderLM(nnx.Module):
  """A decoder-only LM built from `num_blocks` copies of one block spec.

  Args:
    vocab_size: output classes; must cover the vocabulary used for the data.
    d_model: residual width.
    num_blocks: how many times the block is repeated (layers = num_blocks x sub-layers).
    block: the block spec, e.g. ("attn", "ffn") for a dense transformer layer.
    tie_embeddings: reuse the input embedding as the output projection.
    dtype: compute dtype ("float32" or "bfloat16"); parameters stay in `param_dtype`.
    param_dtype: parameter storage dtype (GLaM: float32 weights, bfloat16 activations).
    remat_policy: activation rematerialisation per block: "none", "full", "dots", "dots_no_batch".
    scan_layers: run the blocks with lax.scan (compile time independent of depth) or unrolled
      (faster steps on CPU: no per-layer copies in and out of the stacked parameters and
      gradients; compile time grows with depth). The parameters are stacked either way; `glam
      train` holds unrolled blocks' train state one array per layer (glam/models/per_layer.py),
      which this model also accepts, and checkpoints it stacked.
  """

  def __init__(self, *, vocab_size: int = 512, d_model: int = 512, num_blocks: int = 8,
               block: Sequence[Any] = ("attn", "ffn"), tie_embeddings: bool = False,
               dtype: str = "float32", param_dtype: str = "float32", remat_policy: str = "none",
               scan_layers: bool = True, rngs: nnx.Rngs):
    for name, value in (("vocab_size", vocab_size), ("d_model", d_model), ("num_blocks", num_blocks)):
      if value <= 0:
        raise ValueError(f"DecoderLM.{name}={value}: must be positive")
    if remat_policy not in REMAT_POLICIES:
      raise ValueError(f"DecoderLM.remat_policy={remat_policy!r}: expected one of {sorted(REMAT_POLICIES)}")
    parse_block_spec(block)  # fail early, naming the entry
    self.vocab_size, self.d_model, self.num_blocks = vocab_size, d_model, num_blocks
    self.block_spec = tuple(block)
    self.tie_embeddings, self.scan_layers, self.remat_policy = tie_embeddings, scan_layers, remat_policy
    self.dtype = dtype_from_name("DecoderLM.dtype", dtype)
    pdt = dtype_from_name("DecoderLM.param_dtype", param_dtype)

    self.embed = Embed(vocab_size, d_model, rngs=rngs, dtype=self.dtype, param_dtype=pdt)
    # One block's parameters stacked along a leading "layers" axis, so scan can walk them.
    make_block = lambda key: Block(block, d_model, rngs=nnx.Rngs(key), dtype=self.dtype, param_dtype=pdt)
    block_keys = jax.random.split(rngs.params(), num_blocks)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: make_block(block_keys[0])))
    stacked = jax.vmap(lambda key: nnx.split(make_block(key))[1])(block_keys)
    self.blocks = nnx.merge(graphdef, stacked)
    self.final_norm = RMSNorm(d_model, dtype=self.dtype, param_dtype=pdt)
    if not tie_embeddings:
      init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
      self.logits_kernel = nnx.Param(init(rngs.params(), (d_model, vocab_size), pdt),
                                     logical_axes=("embed", "vocab"))

  def __call__(self, inputs: jax.Array, *, segment_ids: jax.Array | None = None,
               positions: jax.Array | None = None, prefix_mask: jax.Array | None = None,
               cache: dict | None = None, deterministic: bool = True,
               rng: jax.Array | None = None) -> LmOutput:
    """inputs: [batch, length] token ids. segment_ids (0 = padding) and positions come from packing.

    With `cache` (see glam.models.decode.init_cache) the tokens are appended at cache["index"]
    and attend to everything cached before them.
    """
    batch, length = inputs.shape
    if segment_ids is None:
      segment_ids = jnp.ones((batch, length), jnp.int32)
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    if not deterministic and rng is None:
      rng = jax.random.key(0)

    if cache is None:
      row_index = jnp.arange(length)
      mask = attention_mask(segment_ids, segment_ids, row_index, row_index, prefix_mask, prefix_mask)
      ctx = LayerContext(mask, positions, positions, None, deterministic, None if deterministic else rng,
                         token_mask=segment_ids > 0, causal=prefix_mask is None)
      layer_cache, new_cache = None, None
    else:
      index = cache["index"]
      write = lambda buffer, values: jax.lax.dynamic_update_slice(buffer, values.astype(buffer.dtype), (0, index))
      key_segments = write(cache["segments"], segment_ids)
      key_positions = write(cache["positions"], positions)
      query_prefix = prefix_mask if prefix_mask is not None else jnp.zeros_like(segment_ids)
      key_prefix = write(cache["prefix"], query_prefix)
      mask = attention_mask(segment_ids, key_segments, index + jnp.arange(length),
                            jnp.arange(key_segments.shape[1]), query_prefix, key_prefix)
      ctx = LayerContext(mask, positions, key_positions, index, deterministic, None if deterministic else rng,
                         token_mask=segment_ids > 0)
      layer_cache = cache["layers"]
      new_cache = {"index": index + length, "segments": key_segments, "positions": key_positions,
                   "prefix": key_prefix}

    x = constrain(self.embed(inputs), TOKENS)  # rows over the batch axes from the start
    x, layer_cache, aux = self._run_blocks(x, ctx, layer_cache)
    x = self.final_norm(x)
    if self.tie_embeddings:
      logits = self.embed.attend(x)
    else:
      # On 2-D token rows: XLA:CPU computes the kernel's gradient of a 3-D einsum much more slowly.
      kernel = self.logits_kernel[...].astype(self.dtype)
      logits = matmul(x.reshape(batch * length, self.d_model), kernel).reshape(batch, length, -1)  # [batch, length, vocab]
    if new_cache is not None:
      new_cache["layers"] = layer_cache
    aux_loss = sum((jnp.sum(v) for k, v in aux.items() if k.rsplit("/", 1)[-1].startswith("loss_")),
                   jnp.zeros((), jnp.float32))
    metrics = {k: v for k, v in aux.items() if not k.rsplit("/", 1)[-1].startswith("loss_")}
    metrics.update({k: v for k, v in aux.items() if k.rsplit("/", 1)[-1].startswith("loss_")})
    return LmOutput(logits.astype(jnp.float32), aux_loss, metrics, new_cache)

  def _run_blocks(self, x, ctx: LayerContext, layer_cache):
    graphdef, stacked = nnx.split(self.blocks)
    base_rng = ctx.rng

    def one_block(x, xs):
      block_state, cache_slice, layer = xs
      block_ctx = ctx if base_rng is None else ctx.with_rng(jax.random.fold_in(base_rng, layer))
      y, new_slice, aux = nnx.merge(graphdef, block_state)(x, block_ctx, cache_slice)
      return y, (new_slice, aux)

    policy = REMAT_POLICIES[self.remat_policy]
    if self.remat_policy != "none":
      one_block = jax.checkpoint(one_block, policy=policy, prevent_cse=not self.scan_layers)
    xs = (stacked, layer_cache, jnp.arange(self.num_blocks))
    if self.scan_layers:
      x, (new_cache, aux) = jax.lax.scan(one_block, x, xs)
      return x, new_cache, aux
    outputs = []
    per_layer = any(is_per_layer(a) for a in jax.tree.leaves(stacked, is_leaf=is_per_layer))
    layer_states = layer_trees(stacked, self.num_blocks, unstack_layers)  # stacked or PerLayer (trainer)
    for layer in range(self.num_blocks):
      cache_slice = None if layer_cache is None else jax.tree.map(lambda a: a[layer], layer_cache)
      layer_state = layer_states[layer]
      if per_layer:  # parameters of their own: updated in place once their last reader is done
        x, layer_state = after_input_gradient(x, layer_state)
      x, out = one_block(x, (layer_state, cache_slice, layer))
      outputs.append(out)
    new_cache, aux = jax.tree.map(lambda *a: jnp.stack(a), *outputs) if outputs else (None, {})
    return x, new_cache, aux


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def unstack_layers(stacked, num_layers: int) -> list:
  """The per-layer slices of stacked block parameters [layers, ...], for the unrolled blocks.

  Its backward stacks the per-layer gradients in one concatenation: the default transpose of each
  slice zero-pads it to the whole stack and sums the pads, which made the unrolled step no faster
  than the scanned one.
  """
  return [jax.tree.map(lambda a: a[layer], stacked) for layer in range(num_layers)]


def _unstack_fwd(stacked, num_layers):
  return unstack_layers(stacked, num_layers), None


def _unstack_bwd(num_layers, _, layer_grads):
  return (jax.tree.map(lambda *g: jnp.stack(g), *layer_grads),)


unstack_layers.defvjp(_unstack_fwd, _unstack_bwd)

"""What every sub-layer of a block sees besides its input: masks, positions, dropout."""
import dataclasses

import jax


@dataclasses.dataclass(frozen=True)
class LayerContext:
  """Per-call information shared by all sub-layers.

  mask:            [batch, 1, q_len, k_len] bool, True where a query may attend a key.
  query_positions: [batch, q_len] int32 positions of the current tokens inside their documents.
  key_positions:   [batch, k_len] int32 (equal to query_positions without a KV cache).
  cache_index:     where the current tokens are written into a KV cache (a scalar), or None.
  deterministic:   True disables dropout and router noise.
  rng:             a key for dropout/noise, already folded with the layer index; None if deterministic.
  token_mask:      [batch, q_len] bool, False on padding (MoE routing ignores those tokens), or None.
  causal:          True when `mask` lets no query attend a later key and keys are the queries
                   (no KV cache, no prefix-LM), so attention may skip the blocks above the diagonal.
  """

  mask: jax.Array
  query_positions: jax.Array
  key_positions: jax.Array
  cache_index: jax.Array | None = None
  deterministic: bool = True
  rng: jax.Array | None = None
  token_mask: jax.Array | None = None
  causal: bool = False

  def with_rng(self, rng):
    return dataclasses.replace(self, rng=rng)


def dropout(x: jax.Array, rate: float, ctx: LayerContext, salt: int) -> jax.Array:
  """Inverted dropout with an explicit key (no hidden RNG state in modules)."""
  if ctx.deterministic or rate <= 0.0:
    return x
  if ctx.rng is None:
    raise ValueError("dropout_rate > 0 in training needs an rng in the LayerContext")
  keep = jax.random.bernoulli(jax.random.fold_in(ctx.rng, salt), 1.0 - rate, x.shape)
  return jax.numpy.where(keep, x / (1.0 - rate), 0).astype(x.dtype)

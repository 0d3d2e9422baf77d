"""Token embedding, optionally reused as the output projection (tied embeddings)."""
import jax
import jax.numpy as jnp
from flax import nnx

from glam.kernels.matmul import matmul


class Embed(nnx.Module):
  """Looks up token vectors; `attend` computes logits against the same table."""

  def __init__(self, vocab_size: int, d_model: int, *, rngs: nnx.Rngs,
               dtype=jnp.float32, param_dtype=jnp.float32):
    self.dtype = dtype
    self.d_model = d_model
    # Unit-variance rows (T5): the first RMSNorm rescales anyway.
    init = nnx.initializers.normal(stddev=1.0)
    self.embedding = nnx.Param(init(rngs.params(), (vocab_size, d_model), param_dtype),
                               logical_axes=("vocab", "embed"))

  def __call__(self, ids: jax.Array) -> jax.Array:
    return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)

  def attend(self, x: jax.Array) -> jax.Array:
    # Scale by 1/sqrt(d_model) so that logits start near unit variance with unit-variance rows.
    table = self.embedding[...].astype(self.dtype)
    rows = x.reshape(-1, x.shape[-1])  # 2-D token rows: the fast case for XLA:CPU's weight gradient
    logits = matmul(rows, table, transpose_b=True).reshape(x.shape[:-1] + (-1,))  # [batch, length, vocab]
    return logits * (self.d_model ** -0.5)

"""Position-wise feed-forward layers: GELU, ReLU, and gated GeGLU / SwiGLU."""
import gin
import jax
import jax.numpy as jnp
from flax import nnx

from glam.kernels.matmul import matmul
from glam.layers.context import LayerContext, dropout

ACTIVATIONS = {
    "gelu": jax.nn.gelu,
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}
GATED = {"geglu": "gelu", "swiglu": "silu", "reglu": "relu"}


def check_activation(binding: str, activation: str) -> None:
  if activation not in ACTIVATIONS and activation not in GATED:
    valid = sorted(ACTIVATIONS) + sorted(GATED)
    raise ValueError(f"{binding}={activation!r}: expected one of {valid}")


def apply_activation(activation: str, hidden: jax.Array, gate: jax.Array | None) -> jax.Array:
  """Plain activation, or act(gate) * hidden for gated variants."""
  if activation in GATED:
    return ACTIVATIONS[GATED[activation]](gate) * hidden
  return ACTIVATIONS[activation](hidden)


@gin.configurable
class FeedForward(nnx.Module):
  """Dense FFN. GLaM's non-MoE FFNs are GeGLU without biases (praxis glam.py).

  Args:
    d_model: model width (given by the block).
    d_ff: hidden width.
    activation: "gelu", "relu", "silu", or gated "geglu", "swiglu", "reglu".
    dropout_rate: dropout on the hidden activations (GLaM: 0).
  """

  def __init__(self, d_model: int, *, d_ff: int = 2048, activation: str = "geglu",
               dropout_rate: float = 0.0, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32):
    check_activation("FeedForward.activation", activation)
    if d_ff <= 0:
      raise ValueError(f"FeedForward.d_ff={d_ff}: must be positive")
    self.activation, self.dropout_rate, self.dtype = activation, dropout_rate, dtype
    init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
    self.wi = nnx.Param(init(rngs.params(), (d_model, d_ff), param_dtype), logical_axes=("embed", "mlp"))
    self.wi_gate = (nnx.Param(init(rngs.params(), (d_model, d_ff), param_dtype), logical_axes=("embed", "mlp"))
                    if activation in GATED else None)
    self.wo = nnx.Param(init(rngs.params(), (d_ff, d_model), param_dtype), logical_axes=("mlp", "embed"))

  def __call__(self, x: jax.Array, ctx: LayerContext, cache=None):
    dt = self.dtype
    # Token rows as one 2-D matrix: XLA:CPU runs the weight gradient of a 3-D einsum (a
    # contraction over batch and length) far slower (measured 265 ms vs 158 ms fwd+bwd).
    rows = x.reshape(-1, x.shape[-1])
    hidden = matmul(rows, self.wi[...].astype(dt))  # [tokens, d_ff]
    gate = matmul(rows, self.wi_gate[...].astype(dt)) if self.wi_gate is not None else None  # [tokens, d_ff]
    hidden = apply_activation(self.activation, hidden, gate).reshape(x.shape[:-1] + (-1,))
    hidden = dropout(hidden, self.dropout_rate, ctx, salt=2)
    y = matmul(hidden.reshape(rows.shape[0], -1), self.wo[...].astype(dt))  # [tokens, d_model]
    return y.reshape(x.shape[:-1] + (y.shape[-1],)), None, {}

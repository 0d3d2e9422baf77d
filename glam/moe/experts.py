"""Stacked expert FFNs: weights [experts, d_model, d_ff], applied batched or to sorted rows."""
import functools

import gin
import jax
import jax.numpy as jnp
from flax import nnx

from glam.kernels import expert_ffn
from glam.kernels.matmul import matmul
from glam.layers.context import LayerContext, dropout
from glam.layers.feedforward import GATED, apply_activation, check_activation
from glam.moe.chunked_ffn import chunked_ffn, padded_ffn
from glam.moe.grouped_matmul import grouped_matmul, resolve_implementation
from glam.moe.row_maps import to_expert_rows

DROPOUT_SALT = 3  # FeedForward uses 2, attention 1: expert dropout draws its own mask


@gin.configurable
class Experts(nnx.Module):
  """E feed-forward networks with stacked weights, no biases.

  MoeLayer passes every argument, so errors name MoeLayer's bindings.

  Args:
    d_model, num_experts: given by the MoE layer.
    d_ff: each expert's hidden width (GLaM: the dense model's FFN width).
    activation: "gelu" (GLaM / Expert Choice experts: GeLU(x W1) W2), "relu", "silu", or gated
      "geglu", "swiglu", "reglu" (these add wi_gate).
    dropout_rate: dropout on the experts' hidden activations (Switch fine-tuning, Fedus et al.
      Table 4: 0.4 inside experts; pretraining: 0).
  """

  def __init__(self, d_model: int, num_experts: int, *, d_ff: int = 2048, activation: str = "gelu",
               dropout_rate: float = 0.0, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
    check_activation("MoeLayer.activation", activation)
    if num_experts < 1:
      raise ValueError(f"MoeLayer.num_experts={num_experts}: must be >= 1")
    if d_ff <= 0:
      raise ValueError(f"MoeLayer.d_ff={d_ff}: must be positive")
    if not 0.0 <= dropout_rate < 1.0:
      raise ValueError(f"MoeLayer.expert_dropout={dropout_rate}: must be in [0, 1)")
    self.num_experts, self.d_model, self.d_ff = num_experts, d_model, d_ff
    self.activation, self.dropout_rate, self.dtype = activation, dropout_rate, dtype
    # fan_in per expert: the expert axis is a batch axis of the initializer
    init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1,
                                             batch_axis=(0,))
    shape_in, axes_in = (num_experts, d_model, d_ff), ("expert", "embed", "mlp")
    self.wi = nnx.Param(init(rngs.params(), shape_in, param_dtype), logical_axes=axes_in)
    self.wi_gate = (nnx.Param(init(rngs.params(), shape_in, param_dtype), logical_axes=axes_in)
                    if activation in GATED else None)
    self.wo = nnx.Param(init(rngs.params(), (num_experts, d_ff, d_model), param_dtype),
                        logical_axes=("expert", "mlp", "embed"))

  def __call__(self, x: jax.Array, ctx: LayerContext) -> jax.Array:
    """x [experts, n, d_model] (n rows per expert) -> [experts, n, d_model]."""
    if x.ndim != 3 or x.shape[0] != self.num_experts:
      raise ValueError(f"Experts: expected x [{self.num_experts}, n, d_model], got {x.shape}")
    dt = self.dtype
    x = x.astype(dt)
    hidden = matmul(x, self.wi[...].astype(dt))  # [experts, n, d_ff]
    gate = matmul(x, self.wi_gate[...].astype(dt)) if self.wi_gate is not None else None  # [experts, n, d_ff]
    hidden = dropout(apply_activation(self.activation, hidden, gate), self.dropout_rate, ctx, DROPOUT_SALT)
    return matmul(hidden, self.wo[...].astype(dt))  # [experts, n, d_model]

  def grouped(self, rows: jax.Array, group_sizes: jax.Array, ctx: LayerContext, *,
              implementation: str = "auto", block_size: int = 256) -> jax.Array:
    """rows [N, d_model] sorted by expert, group_sizes [E] int32 (sum <= N) -> [N, d_model].

    Each row goes through its expert's FFN; rows after sum(group_sizes) give zeros. Where the
    grouped matmul runs on the CBLAS kernel the whole FFN is one custom call each way
    (glam/kernels/expert_ffn.py), except with expert dropout in training.
    """
    if self.runs_fused(rows, group_sizes, ctx, implementation):
      return self.fused_ffn(rows, jnp.arange(rows.shape[0], dtype=jnp.int32), group_sizes)
    rows = rows.astype(self.dtype)

    def per_expert(x, w):
      return grouped_matmul(x, w[...].astype(self.dtype), group_sizes, implementation=implementation,
                            block_size=block_size)

    hidden = per_expert(rows, self.wi)  # [N, d_ff]
    gate = per_expert(rows, self.wi_gate) if self.wi_gate is not None else None  # [N, d_ff]
    hidden = dropout(apply_activation(self.activation, hidden, gate), self.dropout_rate, ctx, DROPOUT_SALT)
    return per_expert(hidden, self.wo)  # [N, d_model]

  def grouped_tokens(self, x: jax.Array, row_assignment: jax.Array, assignment_row: jax.Array, k: int,
                     group_sizes: jax.Array, ctx: LayerContext, *, implementation: str = "auto",
                     block_size: int = 256) -> jax.Array:
    """`grouped` on the rows to_expert_rows(x, row_assignment, assignment_row, k) gathers from the
    tokens x [T, d_model] (glam/moe/row_maps.py): [rows, d_model]. On the fused kernel the gather
    and its gradient (each token's rows summed) happen inside the custom calls, so the gathered
    rows never become an XLA buffer."""
    if self.runs_fused(x, group_sizes, ctx, implementation, rows=row_assignment.shape[0]):
      row_token = jnp.where(row_assignment < assignment_row.shape[0], row_assignment // k, x.shape[0])
      return self.fused_ffn(x, row_token, group_sizes)
    rows = to_expert_rows(x, row_assignment, assignment_row, k)  # [rows, d_model]
    return self.grouped(rows, group_sizes, ctx, implementation=implementation, block_size=block_size)

  def _weights(self):
    dt = self.dtype
    return (self.wi[...].astype(dt), self.wi_gate[...].astype(dt) if self.wi_gate is not None else None,
            self.wo[...].astype(dt))

  def runs_fused(self, x, group_sizes, ctx, implementation: str = "auto", rows: int | None = None) -> bool:
    """Whether `fused_ffn` takes rows gathered from x [T, d_model] (rows of them, default T): where
    the grouped matmul `implementation` resolves to the CBLAS kernel, without expert dropout in
    training, for an FFN the kernel supports."""
    if group_sizes.shape != (self.num_experts,):
      raise ValueError(f"Experts: group_sizes has shape {group_sizes.shape}, "
                       f"expected ({self.num_experts},)")
    return (resolve_implementation(implementation, binding="Experts.grouped", dtype=self.dtype) == "cblas"
            and (self.dropout_rate == 0 or ctx.deterministic)
            and expert_ffn.supported(GATED.get(self.activation, self.activation), x.astype(self.dtype),
                                     *self._weights(), rows=rows))

  def fused_ffn(self, x, row_token, group_sizes):
    """The FFN of rows x[row_token] (sorted by expert, group_sizes [E]) in one custom call each way
    (glam/kernels/expert_ffn.py): [rows, d_model]. Only where runs_fused says so."""
    activation = GATED.get(self.activation, self.activation)
    return expert_ffn.expert_ffn(x.astype(self.dtype), row_token, *self._weights(), group_sizes, activation)

  def chunked(self, rows: jax.Array, group_sizes: jax.Array, ctx: LayerContext, *, chunk: int = 32) -> jax.Array:
    """Like `grouped`, but each chunk of rows goes through the whole FFN at once (see chunked_ffn.py):
    for few rows in a large buffer. With expert dropout in training it falls back to `grouped`."""
    if self.dropout_rate > 0 and not ctx.deterministic:
      return self.grouped(rows, group_sizes, ctx, implementation="blocked", block_size=8 * chunk)
    dt = self.dtype
    w_gate = self.wi_gate[...].astype(dt) if self.wi_gate is not None else None
    return chunked_ffn(rows.astype(dt), self.wi[...].astype(dt), w_gate, self.wo[...].astype(dt), group_sizes,
                       _activation_fn(self.activation), chunk=chunk)

  def padded(self, main: jax.Array, overflow: jax.Array, overflow_sizes: jax.Array, ctx: LayerContext, *,
             chunk: int = 32) -> tuple[jax.Array, jax.Array]:
    """main [E, C, d_model] (C rows per expert) and overflow rows [N, d_model] sorted by expert
    (overflow_sizes [E]) -> the same shapes, in one custom VJP (see chunked_ffn.padded_ffn)."""
    if self.dropout_rate > 0 and not ctx.deterministic:
      return self(main, ctx), self.chunked(overflow, overflow_sizes, ctx, chunk=chunk)
    dt = self.dtype
    w_gate = self.wi_gate[...].astype(dt) if self.wi_gate is not None else None
    return padded_ffn(main.astype(dt), overflow.astype(dt), self.wi[...].astype(dt), w_gate,
                      self.wo[...].astype(dt), overflow_sizes, _activation_fn(self.activation), chunk=chunk)

  def parameter_count(self) -> int:
    return sum(w[...].size for w in (self.wi, self.wi_gate, self.wo) if w is not None)

  def active_parameter_count(self, experts_per_token: float) -> int:
    """Expert parameters one token uses: experts_per_token / E of them (k, or EC's capacity factor)."""
    return round(self.parameter_count() * experts_per_token / self.num_experts)


@functools.cache
def _activation_fn(activation: str):
  """One function object per activation: chunked_ffn's custom VJP takes it as a static argument."""
  return functools.partial(apply_activation, activation)

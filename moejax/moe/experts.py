"""Expert FFNs: the routed experts (batched over E) and the shared experts (one dense FFN).

    gated (SwiGLU, Shazeer 2020; GeGLU):  y = (act(x @ w_gate) * (x @ w_up)) @ w_down
    plain (GELU / ReLU MLP):              y = act(x @ w_up) @ w_down

Routed experts store [E, D, F] / [E, F, D] weights and run either on tokens grouped by expert (a
grouped matmul, `moejax.kernels.gmm`) or on a dense [E, C, D] capacity buffer (a batched einsum).
Fine-grained experts (DeepSeekMoE, Dai et al. 2024) are just more, narrower experts. Shared experts
(DeepSeekMoE; Qwen2-MoE) are fused into one FFN of hidden width num_shared * F_shared, optionally
scaled per token by sigmoid(x @ gate) as in Qwen2-MoE.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.kernels import gmm, gmm_multi
from moejax.moe.config import MoEConfig

_ACTIVATIONS = {
  "swiglu": jax.nn.silu,
  "geglu": lambda x: jax.nn.gelu(x, approximate=False),
  "gelu": lambda x: jax.nn.gelu(x, approximate=False),
  "relu": jax.nn.relu,
}


def activate(activation: str, up: jax.Array, gate: jax.Array | None) -> jax.Array:
  """The FFN nonlinearity: act(gate) * up when gated, act(up) otherwise."""
  fn = _ACTIVATIONS[activation]
  return fn(up) if gate is None else fn(gate) * up


def grouped_ffn(
  x: jax.Array,
  group_sizes: jax.Array,
  w_gate: jax.Array | None,
  w_up: jax.Array,
  w_down: jax.Array,
  *,
  activation: str,
  backend: str = "auto",
) -> jax.Array:
  """Expert FFN on expert-sorted tokens x [M, D] with group_sizes [E]; returns [M, D].

  Rows past sum(group_sizes) come back as zeros. A gated FFN computes gate and up with one
  `gmm_multi`: the `blas` backend then reads each group's rows of x once for both, forward and
  backward, in one host call each way.
  """
  if w_gate is None:
    h = activate(activation, gmm(x, w_up, group_sizes, backend=backend), None)  # [M, F]
  else:
    gate, up = gmm_multi(x, (w_gate, w_up), group_sizes, backend=backend)  # [M, F] each
    h = activate(activation, up, gate)  # [M, F]
  return gmm(h, w_down, group_sizes, backend=backend)  # [M, D]


def batched_ffn(
  x: jax.Array,
  w_gate: jax.Array | None,
  w_up: jax.Array,
  w_down: jax.Array,
  *,
  activation: str,
) -> jax.Array:
  """Expert FFN on a capacity buffer x [E, C, D]; returns [E, C, D]."""
  up = jnp.einsum("ecd,edf->ecf", x, w_up)
  gate = None if w_gate is None else jnp.einsum("ecd,edf->ecf", x, w_gate)
  return jnp.einsum("ecf,efd->ecd", activate(activation, up, gate), w_down)


def dense_ffn(
  x: jax.Array, w_gate: jax.Array | None, w_up: jax.Array, w_down: jax.Array, *, activation: str
) -> jax.Array:
  """One dense FFN on x [..., D] with weights [D, F] / [F, D]."""
  up = x @ w_up
  gate = None if w_gate is None else x @ w_gate
  return activate(activation, up, gate) @ w_down


# Fan-in initialisers: [E, D, F] reads D as the input axis, E as a batch of independent matrices.
expert_init = nnx.initializers.variance_scaling(
  1.0, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1, batch_axis=(0,)
)
dense_init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")


def _param(init, key, shape, dtype, axes) -> nnx.Param:
  # `logical_axes` names each dimension with the logical axes of DESIGN.md; sharding.py maps them
  # to mesh axes. (Flax's own `out_sharding` metadata would shard eagerly and needs a mesh.)
  return nnx.Param(init(key, shape, dtype), logical_axes=axes)


class Experts(nnx.Module):
  """The E routed experts: `w_gate` (gated activations only), `w_up` [E, D, F], `w_down` [E, F, D]."""

  def __init__(self, config: MoEConfig, *, rngs: nnx.Rngs):
    c = config
    e, d, f = c.num_experts, c.d_model, c.expert_hidden_dim
    self.activation = c.activation
    self.backend = c.gmm_backend
    self.dtype = c.dtype
    up_axes, down_axes = ("expert", "embed", "mlp"), ("expert", "mlp", "embed")
    if c.gated:
      self.w_gate = _param(expert_init, rngs.params(), (e, d, f), c.param_dtype, up_axes)
    else:
      self.w_gate = None
    self.w_up = _param(expert_init, rngs.params(), (e, d, f), c.param_dtype, up_axes)
    self.w_down = _param(expert_init, rngs.params(), (e, f, d), c.param_dtype, down_axes)

  def weights(self):
    """(w_gate or None, w_up, w_down) in the compute dtype."""
    cast = lambda w: None if w is None else w[...].astype(self.dtype)
    return cast(self.w_gate), cast(self.w_up), cast(self.w_down)

  def grouped(self, x: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """Tokens sorted by expert x [M, D] -> [M, D] (dropless dispatch)."""
    return grouped_ffn(
      x, group_sizes, *self.weights(), activation=self.activation, backend=self.backend
    )

  def batched(self, x: jax.Array) -> jax.Array:
    """Capacity buffer x [E, C, D] -> [E, C, D] (capacity dispatch)."""
    return batched_ffn(x, *self.weights(), activation=self.activation)


class SharedExperts(nnx.Module):
  """Shared experts fused into one FFN: `w_gate`/`w_up` [D, Fs], `w_down` [Fs, D], and `gate` [D, 1]
  when `shared_expert_gate` (Qwen2-MoE's sigmoid gate)."""

  def __init__(self, config: MoEConfig, *, rngs: nnx.Rngs):
    c = config
    d, f = c.d_model, c.shared_hidden_dim
    self.activation = c.activation
    self.dtype = c.dtype
    if c.gated:
      self.w_gate = _param(dense_init, rngs.params(), (d, f), c.param_dtype, ("embed", "mlp"))
    else:
      self.w_gate = None
    self.w_up = _param(dense_init, rngs.params(), (d, f), c.param_dtype, ("embed", "mlp"))
    self.w_down = _param(dense_init, rngs.params(), (f, d), c.param_dtype, ("mlp", "embed"))
    if c.shared_expert_gate:
      self.gate = _param(dense_init, rngs.params(), (d, 1), c.param_dtype, ("embed", None))
    else:
      self.gate = None

  def __call__(self, x: jax.Array) -> jax.Array:
    """x [T, D] -> [T, D]."""
    cast = lambda w: None if w is None else w[...].astype(self.dtype)
    y = dense_ffn(
      x, cast(self.w_gate), cast(self.w_up), cast(self.w_down), activation=self.activation
    )
    if self.gate is not None:
      y = y * jax.nn.sigmoid(x @ cast(self.gate))  # [T, 1] per-token scalar
    return y

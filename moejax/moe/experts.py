"""Expert FFNs: the routed experts (batched over E) and the shared experts (one dense FFN).

    gated (SwiGLU, Shazeer 2020; GeGLU):  y = (act(x @ w_gate) * (x @ w_up)) @ w_down
    plain (GELU / ReLU MLP):              y = act(x @ w_up) @ w_down

Routed experts store [E, D, F] / [E, F, D] weights and run either on tokens grouped by expert (a
grouped matmul, `moejax.kernels.gmm`) or on a dense [E, C, D] capacity buffer (a batched einsum).
Fine-grained experts (DeepSeekMoE, Dai et al. 2024) are just more, narrower experts. Shared experts
(DeepSeekMoE; Qwen2-MoE) are fused into one FFN of hidden width num_shared * F_shared, optionally
scaled per token by sigmoid(x @ gate) as in Qwen2-MoE.

Expert kinds are a registry (`register_expert_kind`; `MoEConfig.expert_kind` picks one). A kind owns
its parameters (a pytree of `ParamSpec`s, every leaf with a leading E axis whose logical axis is
`expert`), a pure function applying them to expert-sorted tokens with group sizes, one for capacity
buffers, and its names in released checkpoints. The gated FFN (`glu`) and the plain MLP (`mlp`) are
the first two. Nothing else in moejax knows an expert's weights: expert parallelism derives its
shard_map specs from the leaves' logical axes and moves experts by mapping over the pytree.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.kernels import gmm, gmm_multi
from moejax.moe.activations import activate
from moejax.moe.config import MoEConfig
from moejax.moe.router import ParamSpec


def grouped_ffn(
  x: jax.Array,
  group_sizes: jax.Array,
  w_gate: jax.Array | None,
  w_up: jax.Array,
  w_down: jax.Array,
  *,
  activation: str,
  backend: str = "auto",
  options=None,
) -> jax.Array:
  """Expert FFN on expert-sorted tokens x [M, D] with group_sizes [E]; returns [M, D].

  Rows past sum(group_sizes) come back as zeros. A gated FFN computes gate and up with one
  `gmm_multi`: the `blas` backend then reads each group's rows of x once for both, forward and
  backward, in one host call each way.
  """
  if w_gate is None:
    up = gmm(x, w_up, group_sizes, backend=backend, options=options)  # [M, F]
    h = activate(activation, up, None)
  else:
    gate, up = gmm_multi(x, (w_gate, w_up), group_sizes, backend=backend, options=options)
    h = activate(activation, up, gate)  # [M, F]
  return gmm(h, w_down, group_sizes, backend=backend, options=options)  # [M, D]


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


# ----------------------------------------------------------------------------------------------------
# Expert kinds.


@dataclasses.dataclass(frozen=True)
class ExpertKind:
  """A registered kind of routed expert.

  Attributes:
    name: the registry name (`MoEConfig.expert_kind`).
    params: `config -> {name: ParamSpec}`; each leaf's first axis is E with logical axis `expert`.
      They become `experts.<name>`, created in this order.
    apply: `(params, x [M, D], group_sizes [E], config) -> [M, D]` on tokens sorted by expert;
      `params` holds arrays in the compute dtype. Rows past sum(group_sizes) must come out zero.
      Under expert parallelism `params` are the device's experts and `group_sizes` has one entry per
      local expert; leaves split over the `mlp` logical axis (expert tensor parallelism) must give
      partial outputs that sum over the shards, as an FFN's down projection does.
    apply_capacity: `(params, buffer [E, C, D], config) -> [E, C, D]` on a capacity buffer; None =
      `apply` on the flattened buffer with C rows per expert.
    checkpoint_names: each leaf's per-expert projection name in released checkpoints (Hugging Face
      `experts.{e}.<name>.weight`), for the importer.
    validate: `config -> None`, raising ValueError for settings the kind cannot honour.
    options: the kind's own settings with their defaults (set by `MoEConfig.expert_options`, read
      by `config.expert_option(name)`, e.g. a low-rank kind's rank).
  """

  name: str
  params: Callable[[MoEConfig], dict[str, ParamSpec]]
  apply: Callable[..., jax.Array]
  apply_capacity: Callable[..., jax.Array] | None = None
  checkpoint_names: tuple[tuple[str, str], ...] = ()
  validate: Callable[[MoEConfig], None] | None = None
  options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def capacity(self, params, buffer: jax.Array, config: MoEConfig) -> jax.Array:
    """The kind on a capacity buffer [E, C, D] -> [E, C, D]."""
    if self.apply_capacity is not None:
      return self.apply_capacity(params, buffer, config)
    e, c, d = buffer.shape
    sizes = jnp.full((e,), c, jnp.int32)
    return self.apply(params, buffer.reshape(e * c, d), sizes, config).reshape(e, c, -1)


EXPERT_KINDS: dict[str, ExpertKind] = {}


def register_expert_kind(
  name: str,
  params: Callable[[MoEConfig], dict[str, ParamSpec]],
  apply: Callable[..., jax.Array],
  *,
  apply_capacity: Callable[..., jax.Array] | None = None,
  checkpoint_names: dict[str, str] | None = None,
  validate: Callable[[MoEConfig], None] | None = None,
  options: Mapping[str, Any] | None = None,
) -> ExpertKind:
  """Registers an expert kind under `name` (`MoEConfig.expert_kind=name` picks it); returns it.

  See `ExpertKind` for the contract and docs/extending.md for a worked example. Registering an
  existing name replaces it.
  """
  names = tuple((checkpoint_names or {}).items())
  kind = ExpertKind(name, params, apply, apply_capacity, names, validate, dict(options or {}))
  EXPERT_KINDS[name] = kind
  return kind


def expert_kind(config: MoEConfig) -> ExpertKind:
  """The registered kind of `config.expert_kind` (`auto`: `glu` or `mlp` by the activation)."""
  return EXPERT_KINDS[config.resolved_expert_kind]


_UP_AXES, _DOWN_AXES = ("expert", "embed", "mlp"), ("expert", "mlp", "embed")


def _ffn_params(gated: bool):
  def params(c: MoEConfig) -> dict[str, ParamSpec]:
    up = ParamSpec((c.num_experts, c.d_model, c.expert_hidden_dim), _UP_AXES, expert_init)
    down = ParamSpec((c.num_experts, c.expert_hidden_dim, c.d_model), _DOWN_AXES, expert_init)
    return ({"w_gate": up} if gated else {}) | {"w_up": up, "w_down": down}

  return params


def _ffn_apply(p, x, group_sizes, c: MoEConfig) -> jax.Array:
  w_gate, w_up, w_down = p.get("w_gate"), p["w_up"], p["w_down"]
  kw = dict(activation=c.activation, backend=c.gmm_backend, options=c.gmm_options)
  return grouped_ffn(x, group_sizes, w_gate, w_up, w_down, **kw)


def _ffn_apply_capacity(p, x, c: MoEConfig) -> jax.Array:
  return batched_ffn(x, p.get("w_gate"), p["w_up"], p["w_down"], activation=c.activation)


def _needs(gated: bool, kind: str):
  def validate(c: MoEConfig) -> None:
    if c.gated != gated:
      want = "a gated activation (swiglu, geglu)" if gated else "a plain activation (gelu, relu)"
      raise ValueError(
        f"MoEConfig.activation={c.activation!r} is invalid with expert_kind={kind!r}: it needs {want}"
      )

  return validate


# The gated FFN of Mixtral, Qwen-MoE, OLMoE, DeepSeek (SwiGLU; GeGLU).
register_expert_kind(
  "glu",
  _ffn_params(True),
  _ffn_apply,
  apply_capacity=_ffn_apply_capacity,
  checkpoint_names={"w_gate": "gate_proj", "w_up": "up_proj", "w_down": "down_proj"},
  validate=_needs(True, "glu"),
)
# The plain two-matrix MLP of GShard and Switch (GELU / ReLU).
register_expert_kind(
  "mlp",
  _ffn_params(False),
  _ffn_apply,
  apply_capacity=_ffn_apply_capacity,
  checkpoint_names={"w_up": "up_proj", "w_down": "down_proj"},
  validate=_needs(False, "mlp"),
)


def make_param(spec: ParamSpec, rngs: nnx.Rngs, param_dtype) -> nnx.Param:
  """An `nnx.Param` from its spec; a spec without an initialiser is zeros and draws no key."""
  dtype = spec.dtype or param_dtype
  if spec.init is None:
    return nnx.Param(jnp.zeros(spec.shape, dtype), logical_axes=spec.axes)
  return _param(spec.init, rngs.params(), spec.shape, dtype, spec.axes)


@dataclasses.dataclass(frozen=True)
class BoundExperts:
  """An expert kind with its parameters (arrays, compute dtype): what a dispatch strategy calls."""

  kind: ExpertKind
  params: dict[str, jax.Array]
  config: MoEConfig

  def grouped(self, x: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """Tokens sorted by expert x [M, D] -> [M, D] (dropless dispatch)."""
    return self.kind.apply(self.params, x, group_sizes, self.config)

  def batched(self, x: jax.Array) -> jax.Array:
    """Capacity buffer x [E, C, D] -> [E, C, D] (capacity dispatch)."""
    return self.kind.capacity(self.params, x, self.config)


class Experts(nnx.Module):
  """The E routed experts of the configured kind: `experts.<leaf>` for each of its parameters.

  The `glu` kind (gated activations): `w_gate`, `w_up` [E, D, F], `w_down` [E, F, D]; `mlp`: `w_up`,
  `w_down`.
  """

  def __init__(self, config: MoEConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.names = tuple(expert_kind(config).params(config))
    for name, spec in expert_kind(config).params(config).items():
      setattr(self, name, make_param(spec, rngs, config.param_dtype))

  @property
  def kind(self) -> ExpertKind:
    return expert_kind(self.config)

  def params(self) -> dict[str, jax.Array]:
    """The kind's parameters in the compute dtype."""
    dtype = self.config.dtype
    return {name: getattr(self, name)[...].astype(dtype) for name in self.names}

  def axes(self) -> dict[str, tuple[str | None, ...]]:
    """Each parameter's logical axes."""
    return {name: tuple(getattr(self, name).get_metadata()["logical_axes"]) for name in self.names}

  def bound(self) -> BoundExperts:
    """The kind with this module's parameters, for `dispatch.DISPATCHES` strategies."""
    return BoundExperts(self.kind, self.params(), self.config)


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

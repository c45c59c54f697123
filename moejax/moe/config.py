"""`MoEConfig`: the frozen, self-validating description of one MoE layer.

A module takes this small dataclass, never the experiment ConfigDict. Every rule that can be checked
without data is checked in `__post_init__`, and each error names the field, the value given and what
is allowed, so a typo in an experiment config fails before anything is traced.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax.numpy as jnp

from moejax.kernels import backends, check_options
from moejax.moe.activations import ACTIVATIONS, GATED
from moejax.moe.router import POST_ROUTING, ROUTER_LOGITS, ROUTERS


def _fail(field: str, value: Any, allowed: str) -> None:
  raise ValueError(f"MoEConfig.{field}={value!r} is invalid: {allowed}")


def _pairs(field: str, value: Any) -> tuple[tuple[str, Any], ...]:
  """`value` (pairs or a dict; lists of lists from a JSON round trip) as sorted, hashable pairs."""
  items = value.items() if isinstance(value, dict) else value
  try:
    pairs = tuple(sorted((k, v) for k, v in (tuple(p) for p in items)))
    hash(pairs)
  except (TypeError, ValueError):
    _fail(field, value, "must be (name, value) pairs or a dict of hashable values")
  return pairs


def _options(field: str, value: Any, declared, owner: str) -> tuple[tuple[str, Any], ...]:
  """`value` as sorted pairs (`_pairs`) of the names `declared` by a registered entry."""
  pairs = _pairs(field, value)
  allowed = ", ".join(f"{k} (default {v!r})" for k, v in declared.items()) or "none"
  for name, _ in pairs:
    if name not in declared:
      _fail(field, value, f"{owner} has no option {name!r}; its options: {allowed}")
  if len({k for k, _ in pairs}) != len(pairs):
    _fail(field, value, "names an option twice")
  return pairs


@dataclasses.dataclass(frozen=True, kw_only=True)
class MoEConfig:
  """One MoE layer. Dimension names follow DESIGN.md (D model, E experts, K per token, F hidden).

  The defaults are a Mixtral-style layer: softmax over all experts, top-2, renormalised, SwiGLU,
  dropless dispatch, no shared experts.
  """

  # Model width D.
  d_model: int
  # Routed experts E.
  num_experts: int
  # Experts per token K (for `top_p`: the cap; for `expert_choice`: the mean experts per token that
  # sets each expert's capacity together with `capacity_factor`).
  top_k: int
  # Hidden width F of each routed expert. Fine-grained experts are simply more, narrower experts.
  expert_hidden_dim: int
  # Router selection rule, a name registered with `moejax.moe.register_router`: softmax_topk,
  # topk_softmax, sigmoid, expert_choice, top_p, or one of your own.
  router: str = "softmax_topk"
  # How router logits are computed from the layer input (`register_router_logits`): linear = x @ W.
  router_logits: str = "linear"
  # Post-routing transforms applied after the padding mask, in order (`register_post_routing`).
  post_routing: tuple[str, ...] = ()
  # Options of a registered router, as (name, value) pairs (a dict is accepted); the router declares
  # their names and defaults (`register_router(..., options=...)`).
  router_options: tuple[tuple[str, Any], ...] = ()
  # Renormalise the selected experts' weights to sum to one (Mixtral, DeepSeek-V3: yes; Qwen2-MoE,
  # OLMoE, Switch: no).
  norm_topk_prob: bool = True
  # Multiplies the combine weights after (optional) renormalisation (DeepSeek-V3: 2.5).
  routed_scaling_factor: float = 1.0
  # Group-limited routing: experts split into `num_groups` groups, tokens choose among the best
  # `topk_groups` groups only; a group scores the sum of its top-2 scores with the `sigmoid` router
  # (DeepSeek-V3), its top probability with `softmax_topk` (DeepSeek-V2). 1 = no grouping.
  num_groups: int = 1
  topk_groups: int = 1
  # `top_p` router: experts are added in descending probability until their sum reaches top_p.
  top_p: float = 1.0
  # Capacity per expert C = ceil(T * K / E * capacity_factor), used by `capacity` dispatch and by the
  # `expert_choice` router.
  capacity_factor: float = 1.0
  # Dispatch strategy: dropless (sort + grouped matmul, nothing dropped) | capacity (C buffer rows
  # per expert, overflow rides the residual).
  dispatch: str = "dropless"
  # Routed expert kind, a name registered with `moejax.moe.register_expert_kind`: glu (gated FFN),
  # mlp (plain FFN), or auto = glu for gated activations, mlp otherwise.
  expert_kind: str = "auto"
  # Options of the expert kind, as (name, value) pairs (a dict is accepted), e.g. a low-rank
  # kind's rank; the kind declares their names and defaults (`register_expert_kind(..., options=)`).
  expert_options: tuple[tuple[str, Any], ...] = ()
  # Expert FFN activation: swiglu | geglu (gated: the experts have `w_gate`) | gelu | relu.
  activation: str = "swiglu"
  # Shared experts that every token passes through (DeepSeekMoE, Qwen2-MoE); 0 = none.
  num_shared_experts: int = 0
  # Hidden width of *each* shared expert (they are fused into one FFN of num_shared * this width).
  # None = expert_hidden_dim.
  shared_expert_hidden_dim: int | None = None
  # Scale the shared experts' output by sigmoid(x @ gate) per token (Qwen2-MoE).
  shared_expert_gate: bool = False
  # Multiplicative router-input jitter x * U(1 - eps, 1 + eps) in training (Switch, Mixtral); 0 = off.
  jitter_noise: float = 0.0
  # Learned bias on the router logits (gpt-oss); most models have none.
  router_bias: bool = False
  # Auxiliary-loss-free balancing bias (DeepSeek-V3, Wang et al. 2024): a non-trained [E] vector added
  # to the scores for *selection only*; the train step moves it with `update_aux_free_bias`.
  aux_free_bias: bool = False
  # Step size gamma of the aux-loss-free bias update (DeepSeek-V3: 0.001).
  aux_free_bias_rate: float = 0.001
  # Grouped-matmul backend for dropless dispatch (see moejax.kernels.gmm): auto (blas when compiled
  # for CPU, xla's ragged_dot for GPU/TPU) | xla | blas | reference | pallas_tpu | pallas_gpu
  # (Pallas kernels; with gmm_options (("interpret", True),) they run on CPU; docs/kernels.md).
  gmm_backend: str = "auto"
  # Options of that backend, as (name, value) pairs (a dict is accepted), e.g. (("threads", 1),)
  # for blas; each backend lists its names in moejax.kernels.grouped_matmul.ops.
  gmm_options: tuple[tuple[str, Any], ...] = ()
  # Expert parallelism (moejax.moe.parallel), used when the layer runs under a mesh: the all_to_all
  # transport (auto: ragged on TPU/GPU, padded on CPU) ...
  ep_transport: str = "auto"
  # ... and Least-Loaded EP: spill load above llep_alpha x the mean device load to the least-loaded
  # devices (None: off), each hosting at most llep_slots foreign experts.
  llep_alpha: float | None = None
  llep_slots: int = 1
  # Activation (compute) dtype and parameter dtype. Router math is float32 regardless.
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    for name in (
      "d_model",
      "num_experts",
      "top_k",
      "expert_hidden_dim",
      "num_groups",
      "topk_groups",
      "llep_slots",
    ):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        _fail(name, value, "must be a positive integer")
    # Registries are read here, at construction, so entries registered after import count.
    from moejax.moe.dispatch import DISPATCHES
    from moejax.moe.ep_transport import EP_TRANSPORTS
    from moejax.moe.experts import EXPERT_KINDS

    if self.router not in ROUTERS:
      _fail("router", self.router, f"known routers are {', '.join(ROUTERS)}")
    if self.router_logits not in ROUTER_LOGITS:
      _fail("router_logits", self.router_logits, f"known are {', '.join(ROUTER_LOGITS)}")
    post = self.post_routing
    if isinstance(post, str) or not all(isinstance(p, str) for p in post):
      _fail("post_routing", post, "must be a tuple of transform names")
    object.__setattr__(self, "post_routing", tuple(post))
    for name in self.post_routing:
      if name not in POST_ROUTING or name == "padding_mask":
        known = ", ".join(p for p in POST_ROUTING if p != "padding_mask") or "none registered"
        _fail("post_routing", post, f"{name!r} is not a registered transform (known: {known})")
    if self.dispatch not in DISPATCHES:
      _fail("dispatch", self.dispatch, f"known dispatch strategies are {', '.join(DISPATCHES)}")
    if self.activation not in ACTIVATIONS:
      _fail("activation", self.activation, f"known activations are {', '.join(ACTIVATIONS)}")
    if self.expert_kind != "auto" and self.expert_kind not in EXPERT_KINDS:
      _fail("expert_kind", self.expert_kind, f"known kinds are auto, {', '.join(EXPERT_KINDS)}")
    if self.gmm_backend not in backends():
      _fail("gmm_backend", self.gmm_backend, f"known backends are {', '.join(backends())}")
    try:
      options = check_options(
        self.gmm_backend, _pairs("gmm_options", self.gmm_options), "MoEConfig.gmm_options"
      )
    except ValueError as e:
      _fail("gmm_options", self.gmm_options, str(e))
    object.__setattr__(self, "gmm_options", options)
    if self.ep_transport not in EP_TRANSPORTS:
      _fail("ep_transport", self.ep_transport, f"known transports are {', '.join(EP_TRANSPORTS)}")
    if self.llep_alpha is not None and not (
      math.isfinite(self.llep_alpha) and self.llep_alpha >= 1.0
    ):
      _fail("llep_alpha", self.llep_alpha, "must be None (off) or a finite number >= 1")
    if self.top_k > self.num_experts:
      _fail("top_k", self.top_k, f"must be <= num_experts={self.num_experts}")
    if not (self.capacity_factor > 0 and math.isfinite(self.capacity_factor)):
      _fail("capacity_factor", self.capacity_factor, "must be a finite number > 0")
    if not 0.0 < self.top_p <= 1.0:
      _fail("top_p", self.top_p, "must lie in (0, 1]")
    if self.num_experts % self.num_groups:
      _fail("num_groups", self.num_groups, f"must divide num_experts={self.num_experts}")
    router = ROUTERS[self.router]
    if self.num_groups > 1:
      if not router.grouped:
        grouped = " or ".join(f"router={n!r}" for n, r in ROUTERS.items() if r.grouped)
        _fail(
          "num_groups",
          self.num_groups,
          f"group-limited routing needs {grouped} (softmax_topk: DeepSeek-V2's group-limited "
          "greedy, sigmoid: DeepSeek-V3)",
        )
      if self.topk_groups > self.num_groups:
        _fail("topk_groups", self.topk_groups, f"must be <= num_groups={self.num_groups}")
      group_size = self.num_experts // self.num_groups
      if self.topk_groups * group_size < self.top_k:
        _fail(
          "topk_groups",
          self.topk_groups,
          f"the kept groups hold {self.topk_groups * group_size} experts, fewer than "
          f"top_k={self.top_k}",
        )
    if self.num_shared_experts < 0:
      _fail("num_shared_experts", self.num_shared_experts, "must be >= 0")
    if self.shared_expert_hidden_dim is not None and self.shared_expert_hidden_dim < 1:
      _fail("shared_expert_hidden_dim", self.shared_expert_hidden_dim, "must be >= 1 or None")
    if self.shared_expert_gate and self.num_shared_experts == 0:
      _fail("shared_expert_gate", True, "needs num_shared_experts >= 1")
    if not 0.0 <= self.jitter_noise < 1.0:
      _fail("jitter_noise", self.jitter_noise, "must lie in [0, 1)")
    if self.routed_scaling_factor <= 0:
      _fail("routed_scaling_factor", self.routed_scaling_factor, "must be > 0")
    if self.aux_free_bias and not router.biasable:
      biasable = ", ".join(n for n, r in ROUTERS.items() if r.biasable)
      _fail("aux_free_bias", True, f"is only defined for routers {biasable}")
    if self.aux_free_bias_rate < 0:
      _fail("aux_free_bias_rate", self.aux_free_bias_rate, "must be >= 0")
    kind = EXPERT_KINDS[self.resolved_expert_kind]
    for field, entry, name in (
      ("router_options", router, f"router={self.router!r}"),
      ("expert_options", kind, f"expert_kind={self.resolved_expert_kind!r}"),
    ):
      object.__setattr__(self, field, _options(field, getattr(self, field), entry.options, name))
    if router.validate is not None:
      router.validate(self)
    if kind.validate is not None:
      kind.validate(self)

  @property
  def gated(self) -> bool:
    """Whether the activation is gated (an FFN with a gate projection `w_gate`)."""
    return self.activation in GATED

  @property
  def resolved_expert_kind(self) -> str:
    """`expert_kind`, with `auto` read as `glu` for gated activations and `mlp` otherwise."""
    if self.expert_kind != "auto":
      return self.expert_kind
    return "glu" if self.gated else "mlp"

  @property
  def shared_hidden_dim(self) -> int:
    """Total hidden width of the fused shared-expert FFN."""
    per_expert = self.shared_expert_hidden_dim or self.expert_hidden_dim
    return self.num_shared_experts * per_expert

  def router_option(self, name: str) -> Any:
    """The router's option `name`: from `router_options`, else the router's declared default."""
    return dict(self.router_options).get(name, ROUTERS[self.router].options[name])

  def expert_option(self, name: str) -> Any:
    """The expert kind's option `name`: from `expert_options`, else the kind's declared default."""
    from moejax.moe.experts import EXPERT_KINDS

    kind = EXPERT_KINDS[self.resolved_expert_kind]
    return dict(self.expert_options).get(name, kind.options[name])

  def capacity(self, num_tokens: int) -> int:
    """Per-expert capacity C = ceil(T * K / E * capacity_factor), at most T (a token visits an expert
    at most once)."""
    c = math.ceil(num_tokens * self.top_k / self.num_experts * self.capacity_factor)
    return max(1, min(c, num_tokens))

  def replace(self, **changes) -> MoEConfig:
    return dataclasses.replace(self, **changes)

"""Routers: pure functions from router logits [T, E] to one `Routing` value.

Every router answers the same question -- which experts does each token visit, and with what combine
weight -- in the same shape, so dispatchers and losses never need to know which router ran:

    expert_ids [T, K]  the chosen experts, in descending score order
    weights    [T, K]  combine weights (0 where `mask` is False)
    mask       [T, K]  which of the K slots are used (top-p and expert choice use fewer than K)
    probs      [T, E]  unbiased router probabilities (softmax) or scores (sigmoid), for aux losses
    logits     [T, E]  raw router logits, for the z-loss

All math is float32 whatever the activation dtype. Implemented routers:

- `softmax_topk`: softmax over E, then top-k; `norm_topk_prob` renormalises the k weights
  (GShard, Lepikhin et al. 2020; Switch, Fedus et al. 2021; Mixtral, Jiang et al. 2024; Qwen2-MoE and
  OLMoE do not renormalise). With groups: DeepSeek-V2's group-limited greedy selection.
- `topk_softmax`: top-k of the logits, softmax over those k (mistral-inference, gpt-oss).
- `sigmoid_topk`: DeepSeek-V3 (DeepSeek-AI 2024, Sec. 2.1.2, eqs. 12-16): sigmoid scores; the
  auxiliary-loss-free bias and group-limited selection change only *which* experts are chosen; the
  weights are the unbiased scores, renormalised over the k, times `routed_scaling_factor`.
- `expert_choice`: each expert takes its top-C tokens (Zhou et al. 2022). NOT causal: whether a token
  is chosen depends on the other tokens in the batch, future ones included, so it is unfit for
  autoregressive decoding as is.
- `top_p`: dynamic routing (Huang et al. 2024, "Harder Tasks Need More Experts", eq. 4): experts are
  added in descending probability until their cumulative probability reaches `top_p`, capped at K.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Routing:
  """The output of every router. See the module docstring for the fields' meaning.

  A pytree: the arrays are its leaves and `capacity` is static metadata, so a `Routing` passes
  through `jax.jit`, `nnx.scan` and `jax.shard_map` whatever the router (expert choice included).
  """

  expert_ids: jax.Array  # [T, K] int32
  weights: jax.Array  # [T, K] float32
  mask: jax.Array  # [T, K] bool
  probs: jax.Array  # [T, E] float32
  logits: jax.Array  # [T, E] float32
  # Expert choice fixes each expert's capacity C itself; None for token-choice routers.
  capacity: int | None = dataclasses.field(default=None, metadata=dict(static=True))

  @property
  def num_experts(self) -> int:
    return self.probs.shape[-1]

  def replace(self, **changes) -> Routing:
    return dataclasses.replace(self, **changes)

  _replace = replace  # the NamedTuple spelling of earlier versions


def _finish(
  weights: jax.Array,
  norm_topk_prob: bool,
  routed_scaling_factor: float,
  mask: jax.Array | None = None,
) -> jax.Array:
  """Zero unused slots, optionally renormalise over the used ones, then scale."""
  if mask is not None:
    weights = jnp.where(mask, weights, 0.0)
  if norm_topk_prob:
    # The epsilon only guards all-zero rows (sigmoid scores can underflow); DeepSeek-V3 uses 1e-20.
    weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1e-20)
  return weights * routed_scaling_factor


def _select(scores: jax.Array, top_k: int, bias: jax.Array | None) -> jax.Array:
  """Expert ids [T, K] of the top-k `scores + bias`; the bias steers selection only."""
  if bias is not None:
    scores = scores + bias.astype(jnp.float32)
  _, ids = jax.lax.top_k(scores, top_k)  # [T, K]
  return ids.astype(jnp.int32)


def softmax_topk(
  logits: jax.Array,
  *,
  top_k: int,
  norm_topk_prob: bool = True,
  routed_scaling_factor: float = 1.0,
  bias: jax.Array | None = None,
  num_groups: int = 1,
  topk_groups: int = 1,
) -> Routing:
  """Softmax over all E experts, then the top-k probabilities are the combine weights.

  With `num_groups` > 1, DeepSeek-V2's `group_limited_greedy`: a token chooses only among the experts
  of its `topk_groups` groups with the highest maximum probability.
  """
  logits = logits.astype(jnp.float32)
  probs = jax.nn.softmax(logits, axis=-1)  # [T, E]
  choice = probs if bias is None else probs + bias.astype(jnp.float32)
  if num_groups > 1:
    keep = group_limited_mask(choice, num_groups, topk_groups, group_score="max")
    choice = jnp.where(keep, choice, -jnp.inf)
  ids = _select(choice, top_k, None)  # [T, K]
  weights = jnp.take_along_axis(probs, ids, axis=-1)  # [T, K]
  weights = _finish(weights, norm_topk_prob, routed_scaling_factor)
  return Routing(ids, weights, jnp.ones(ids.shape, bool), probs, logits)


def topk_softmax(
  logits: jax.Array,
  *,
  top_k: int,
  routed_scaling_factor: float = 1.0,
  bias: jax.Array | None = None,
) -> Routing:
  """Top-k of the logits, then a softmax over just those k (always sums to one).

  Mathematically equal to `softmax_topk(norm_topk_prob=True)`; it differs in float rounding and in
  never forming the full softmax for the weights. `probs` is still the full softmax, for the losses.
  """
  logits = logits.astype(jnp.float32)
  ids = _select(logits, top_k, bias)  # [T, K]
  top_logits = jnp.take_along_axis(logits, ids, axis=-1)  # [T, K]
  weights = jax.nn.softmax(top_logits, axis=-1) * routed_scaling_factor
  probs = jax.nn.softmax(logits, axis=-1)
  return Routing(ids, weights, jnp.ones(ids.shape, bool), probs, logits)


def group_limited_mask(
  scores: jax.Array, num_groups: int, topk_groups: int, *, group_score: str = "top2_sum"
) -> jax.Array:
  """Which experts [T, E] lie in each token's `topk_groups` best groups.

  A group's score is the sum of its two highest expert scores (DeepSeek-V3, `top2_sum`; its top-1 if
  a group has one expert) or its highest score (DeepSeek-V2's `group_limited_greedy`, `max`).
  """
  t, e = scores.shape
  grouped = scores.reshape(t, num_groups, e // num_groups)  # [T, G, E/G]
  if group_score == "max":
    group_scores = jnp.max(grouped, axis=-1)  # [T, G]
  else:
    top2, _ = jax.lax.top_k(grouped, min(2, e // num_groups))  # [T, G, 2]
    group_scores = jnp.sum(top2, axis=-1)  # [T, G]
  _, keep = jax.lax.top_k(group_scores, topk_groups)  # [T, topk_groups]
  group_mask = jnp.zeros((t, num_groups), bool).at[jnp.arange(t)[:, None], keep].set(True)
  return jnp.repeat(group_mask, e // num_groups, axis=-1)  # [T, E]


def sigmoid_topk(
  logits: jax.Array,
  *,
  top_k: int,
  norm_topk_prob: bool = True,
  routed_scaling_factor: float = 1.0,
  bias: jax.Array | None = None,
  num_groups: int = 1,
  topk_groups: int = 1,
) -> Routing:
  """DeepSeek-V3 routing: sigmoid scores, bias and groups for selection, unbiased weights."""
  logits = logits.astype(jnp.float32)
  scores = jax.nn.sigmoid(logits)  # [T, E]
  choice = scores if bias is None else scores + bias.astype(jnp.float32)  # [T, E]
  if num_groups > 1:
    # -inf, as DeepSeek's own inference code does; Hugging Face masks with 0.0, which differs only
    # when a biased score is negative.
    choice = jnp.where(group_limited_mask(choice, num_groups, topk_groups), choice, -jnp.inf)
  ids = _select(choice, top_k, None)  # [T, K]
  weights = jnp.take_along_axis(scores, ids, axis=-1)  # [T, K] unbiased
  weights = _finish(weights, norm_topk_prob, routed_scaling_factor)
  return Routing(ids, weights, jnp.ones(ids.shape, bool), scores, logits)


def expert_choice(logits: jax.Array, *, capacity: int) -> Routing:
  """Each expert picks its `capacity` highest-probability tokens (Zhou et al. 2022, eq. 1-2).

  The routing is expressed in the token-major form every dispatcher reads: K = E slots per token,
  slot e used when expert e chose the token, weight = softmax probability P[t, e]. A token may be
  chosen by no expert (it rides the residual) or by several. Non-causal: see the module docstring.
  """
  logits = logits.astype(jnp.float32)
  t, e = logits.shape
  probs = jax.nn.softmax(logits, axis=-1)  # [T, E]
  _, token_ids = jax.lax.top_k(probs.T, capacity)  # [E, C]
  chosen = jnp.zeros((e, t), bool).at[jnp.arange(e)[:, None], token_ids].set(True).T  # [T, E]
  ids = jnp.broadcast_to(jnp.arange(e, dtype=jnp.int32), (t, e))  # [T, E]
  weights = jnp.where(chosen, probs, 0.0)
  return Routing(ids, weights, chosen, probs, logits, capacity=capacity)


def top_p(
  logits: jax.Array,
  *,
  top_p: float,
  top_k: int,
  norm_topk_prob: bool = False,
  routed_scaling_factor: float = 1.0,
) -> Routing:
  """Dynamic top-p routing: the smallest prefix of experts (by probability) whose sum reaches p.

  Expert j (in descending order) is used when the probability mass before it is still below p, so
  the first expert is always used; at most K experts are. The weights are the raw probabilities as
  in the paper, unless `norm_topk_prob`.
  """
  logits = logits.astype(jnp.float32)
  probs = jax.nn.softmax(logits, axis=-1)  # [T, E]
  top_probs, ids = jax.lax.top_k(probs, top_k)  # [T, K]
  mass_before = jnp.cumsum(top_probs, axis=-1) - top_probs  # [T, K]
  mask = mass_before < top_p
  weights = _finish(top_probs, norm_topk_prob, routed_scaling_factor, mask)
  return Routing(ids.astype(jnp.int32), weights, mask, probs, logits)


# ----------------------------------------------------------------------------------------------------
# Registries. A router is a logits function (which parameters score tokens against experts) and a
# selection rule (which experts a token visits, with what weight), picked by `MoEConfig.router` and
# `MoEConfig.router_logits`; post-routing transforms edit the selection afterwards.


@dataclasses.dataclass(frozen=True)
class ParamSpec:
  """One parameter of a router or an expert kind, before it exists: the module shell creates it.

  `init(key, shape, dtype)` draws it; `init=None` makes zeros and draws no key (so adding an optional
  zero-initialised parameter does not shift the random stream of the parameters after it).
  `axes` are its logical axes (DESIGN.md); `dtype=None` means `MoEConfig.param_dtype`.
  """

  shape: tuple[int, ...]
  axes: tuple[str | None, ...]
  init: Callable[..., jax.Array] | None = None
  dtype: Any = None


@dataclasses.dataclass(frozen=True)
class RouterLogits:
  """How router logits [T, E] are computed from the router input x [T, D] (float32).

  `params(config) -> {name: ParamSpec}` declares the parameters (they become `router.<name>`);
  `apply(params, x, config) -> logits` computes the logits from them (arrays, float32).
  """

  params: Callable[[Any], dict[str, ParamSpec]]
  apply: Callable[[dict[str, jax.Array], jax.Array, Any], jax.Array]


@dataclasses.dataclass(frozen=True)
class RouterSpec:
  """A registered selection rule.

  `select(logits [T, E], config, *, bias) -> Routing`, where `bias` [E] is the aux-loss-free bias
  (None unless `MoEConfig.aux_free_bias`). `fields` names the `MoEConfig` fields it reads (shown in
  errors and docs); `biasable`: a bias can steer its selection (it picks a fixed K by score);
  `grouped`: it implements group-limited routing (`num_groups` > 1); `validate(config)`, if given,
  raises ValueError for settings it cannot honour; `options` declares its own settings with their
  defaults (set by `MoEConfig.router_options`, read by `config.router_option(name)`).
  """

  name: str
  select: Callable[..., Routing]
  fields: tuple[str, ...] = ()
  biasable: bool = False
  grouped: bool = False
  validate: Callable[[Any], None] | None = None
  options: Mapping[str, Any] = dataclasses.field(default_factory=dict)


ROUTERS: dict[str, RouterSpec] = {}
ROUTER_LOGITS: dict[str, RouterLogits] = {}


def register_router(
  name: str,
  select: Callable[..., Routing],
  *,
  fields: tuple[str, ...] = (),
  biasable: bool = False,
  grouped: bool = False,
  validate: Callable[[Any], None] | None = None,
  options: Mapping[str, Any] | None = None,
) -> RouterSpec:
  """Registers a selection rule under `name` (`MoEConfig.router=name` picks it); returns its spec.

      def top1(logits, config, *, bias=None):
        return softmax_topk(logits, top_k=1, norm_topk_prob=False)

      register_router("top1", top1)

  Registering an existing name replaces it (so a notebook cell can be rerun).
  """
  spec = RouterSpec(name, select, tuple(fields), biasable, grouped, validate, dict(options or {}))
  ROUTERS[name] = spec
  return spec


def register_router_logits(name: str, logits: RouterLogits) -> RouterLogits:
  """Registers a logits function under `name` (`MoEConfig.router_logits=name` picks it)."""
  ROUTER_LOGITS[name] = logits
  return logits


def _linear_params(config) -> dict[str, ParamSpec]:
  d, e = config.d_model, config.num_experts
  out = {"kernel": ParamSpec((d, e), ("embed", None), _fan_in_init)}
  if config.router_bias:
    out["bias"] = ParamSpec((e,), (None,))
  return out


def _linear_apply(params, x, config) -> jax.Array:
  logits = x @ params["kernel"].astype(jnp.float32)  # [T, E]
  if "bias" in params:
    logits = logits + params["bias"].astype(jnp.float32)
  return logits


def _fan_in_init(key, shape, dtype):
  # The router kernel's initialiser: fan-in truncated normal (as the dense layers).
  return jax.nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")(key, shape, dtype)


# The router of every released MoE model: a bias-free (gpt-oss: biased) linear map x @ W [D, E].
register_router_logits("linear", RouterLogits(_linear_params, _linear_apply))


def _topk_groups(fn):
  def select(logits, c, *, bias=None):
    return fn(
      logits,
      top_k=c.top_k,
      norm_topk_prob=c.norm_topk_prob,
      routed_scaling_factor=c.routed_scaling_factor,
      bias=bias,
      num_groups=c.num_groups,
      topk_groups=c.topk_groups,
    )

  return select


_TOPK_FIELDS = ("top_k", "norm_topk_prob", "routed_scaling_factor", "num_groups", "topk_groups")
register_router(
  "softmax_topk", _topk_groups(softmax_topk), fields=_TOPK_FIELDS, biasable=True, grouped=True
)
register_router(
  "topk_softmax",
  lambda logits, c, *, bias=None: topk_softmax(
    logits, top_k=c.top_k, routed_scaling_factor=c.routed_scaling_factor, bias=bias
  ),
  fields=("top_k", "routed_scaling_factor"),
  biasable=True,
)
register_router(
  "sigmoid", _topk_groups(sigmoid_topk), fields=_TOPK_FIELDS, biasable=True, grouped=True
)
register_router(
  "expert_choice",
  lambda logits, c, *, bias=None: expert_choice(logits, capacity=c.capacity(logits.shape[0])),
  fields=("top_k", "capacity_factor"),
)
register_router(
  "top_p",
  lambda logits, c, *, bias=None: top_p(
    logits,
    top_p=c.top_p,
    top_k=c.top_k,
    norm_topk_prob=c.norm_topk_prob,
    routed_scaling_factor=c.routed_scaling_factor,
  ),
  fields=("top_p", "top_k", "norm_topk_prob", "routed_scaling_factor"),
)


def route(logits: jax.Array, config, *, bias: jax.Array | None = None) -> Routing:
  """Apply the selection rule named by `config.router` (an `MoEConfig`) to logits [T, E]."""
  if config.router not in ROUTERS:
    raise ValueError(f"MoEConfig.router={config.router!r} is unknown; known: {sorted(ROUTERS)}")
  return ROUTERS[config.router].select(logits, config, bias=bias)


# ----------------------------------------------------------------------------------------------------
# Post-routing transforms: Routing -> Routing edits applied in one place (`post_route`), in order:
# the padding mask first, then `MoEConfig.post_routing`.


@dataclasses.dataclass(frozen=True)
class PostRoutingContext:
  """What a post-routing transform may read besides the routing."""

  config: Any  # the layer's MoEConfig
  token_mask: jax.Array | None  # [T], 1 = real token; None = all real


POST_ROUTING: dict[str, Callable[[Routing, PostRoutingContext], Routing]] = {}


def register_post_routing(name: str, fn: Callable[[Routing, PostRoutingContext], Routing]):
  """Registers a transform under `name`; `MoEConfig.post_routing=(..., name)` applies it."""
  POST_ROUTING[name] = fn
  return fn


def padding_mask(routing: Routing, ctx: PostRoutingContext) -> Routing:
  """Padding is never dispatched: it takes no capacity slot and no expert compute.

  Expert choice still lets experts pick padding (its capacity is per expert, fixed by the batch);
  mask its inputs out upstream if that matters.
  """
  if ctx.token_mask is None or routing.capacity is not None:
    return routing
  real = routing.mask & (ctx.token_mask[:, None] > 0)  # [T, K]
  return routing.replace(mask=real, weights=jnp.where(real, routing.weights, 0.0))


register_post_routing("padding_mask", padding_mask)


def post_route(routing: Routing, config, token_mask: jax.Array | None = None) -> Routing:
  """The padding mask, then each of `config.post_routing` in order."""
  ctx = PostRoutingContext(config, token_mask)
  for name in ("padding_mask", *config.post_routing):
    routing = POST_ROUTING[name](routing, ctx)
  return routing

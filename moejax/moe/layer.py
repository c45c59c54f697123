"""The MoE layer: route -> dispatch -> experts -> combine (+ shared experts, aux losses, metrics).

    moe = MoE(MoEConfig(d_model=512, num_experts=8, top_k=2, expert_hidden_dim=1024), rngs=nnx.Rngs(0))
    y, aux = moe(x)          # x, y [B, S, D]; aux: losses and metrics (see `MoE.__call__`)

Parameters (names are a contract that checkpoints and tools rely on):

    router.kernel [D, E]            router.bias [E] (router_bias only)
    router.aux_free_bias [E]        AuxFreeBias, not a Param: the optimizer never sees it
    experts.w_gate, experts.w_up [E, D, F]  (w_gate for gated activations only)
    experts.w_down [E, F, D]
    shared_experts.w_gate, .w_up [D, Fs], .w_down [Fs, D], .gate [D, 1] (shared_expert_gate only)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.moe import losses, parallel
from moejax.moe.config import MoEConfig
from moejax.moe.dispatch import DISPATCHES
from moejax.moe.experts import Experts, SharedExperts, make_param
from moejax.moe.router import ROUTER_LOGITS, Routing, post_route, route


class AuxFreeBias(nnx.Variable):
  """The auxiliary-loss-free routing bias: state updated by an explicit rule in the train step
  (`moejax.moe.losses.update_aux_free_bias`), never by the optimizer (it is not an `nnx.Param`)."""


class Router(nnx.Module):
  """Router logits in float32 (`MoEConfig.router_logits`) and the selection rule (`router`).

  The logits function's parameters are `router.<name>` (the linear router: `kernel` [D, E] and, with
  `router_bias`, `bias` [E]). Jitter noise (x * U(1 - eps, 1 + eps) on the router input) applies
  only when `deterministic` is False, i.e. after `model.train()`; `model.eval()` turns it off.
  """

  def __init__(self, config: MoEConfig, *, rngs: nnx.Rngs):
    self.config = config
    specs = ROUTER_LOGITS[config.router_logits].params(config)
    self.names = tuple(specs)
    for name, spec in specs.items():
      setattr(self, name, make_param(spec, rngs, config.param_dtype))
    self.aux_free_bias = (
      AuxFreeBias(jnp.zeros((config.num_experts,), jnp.float32), logical_axes=(None,))
      if config.aux_free_bias
      else None
    )
    self.deterministic = False
    self.rngs = rngs["jitter"].fork() if config.jitter_noise > 0 else None

  def logits(self, x: jax.Array) -> jax.Array:
    """x [T, D] -> router logits [T, E] in float32."""
    x = x.astype(jnp.float32)
    eps = self.config.jitter_noise
    if eps > 0 and not self.deterministic:
      x = x * jax.random.uniform(self.rngs(), x.shape, jnp.float32, 1.0 - eps, 1.0 + eps)
    params = {name: getattr(self, name)[...] for name in self.names}
    return ROUTER_LOGITS[self.config.router_logits].apply(params, x, self.config)

  def __call__(self, x: jax.Array) -> Routing:
    """x [T, D] -> Routing (before the post-routing transforms)."""
    bias = None if self.aux_free_bias is None else self.aux_free_bias[...]
    return route(self.logits(x), self.config, bias=bias)


class MoE(nnx.Module):
  """A Mixture-of-Experts FFN block configured by `MoEConfig`."""

  def __init__(self, config: MoEConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.router = Router(config, rngs=rngs)
    self.experts = Experts(config, rngs=rngs)
    self.shared_experts = SharedExperts(config, rngs=rngs) if config.num_shared_experts else None

  def __call__(
    self, x: jax.Array, *, token_mask: jax.Array | None = None, return_routing: bool = False
  ):
    """x [B, S, D] -> (y [B, S, D], aux), or (y, aux, routing) with `return_routing`.

    1. route:    router logits [T, E] (float32) -> Routing (ids, weights [T, K])
    2. dispatch: token copies grouped by expert (dropless sort, or capacity buffer rows)
    3. experts:  grouped matmul (dropless) or batched matmul over [E, C, D] (capacity)
    4. combine:  weighted sum of each token's expert outputs, plus the shared experts

    `token_mask` [B, S] (optional, 1 = real token) keeps padding out of dispatch (token-choice
    routers: padding gets no expert output, uses no capacity), the losses and the loads. The
    routing returned with `return_routing` is the one dispatched: after the post-routing
    transforms (padding mask, `MoEConfig.post_routing`), over the T = B * S tokens.
    `aux` holds scalars `load_balance_loss`, `seq_balance_loss`, `router_z_loss`,
    `dropped_fraction`, `router_entropy`, `experts_per_token`, and per-expert vectors
    `expert_counts` [E] (assignments, the input of the aux-free bias update) and `expert_load` [E]
    (the same as fractions of all assignments); each declared once in `moejax.moe.stats`.
    """
    c = self.config
    b, s, d = x.shape
    x = x.astype(c.dtype)
    xt = x.reshape(b * s, d)  # [T, D]
    tmask = None if token_mask is None else token_mask.reshape(b * s)

    with jax.named_scope("route"):
      routing = post_route(self.router(xt), c, tmask)
    # The used slots of real tokens: what the losses, loads and dropped fraction count.
    slots = routing.mask if tmask is None else routing.mask & (tmask[:, None] > 0)  # [T, K]
    dispatch = DISPATCHES[c.dispatch]
    cap = routing.capacity
    if dispatch.capacity and cap is None:
      cap = c.capacity(b * s)
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and mesh.size > 1:
      # Under a mesh (`jax.set_mesh`): tokens split over devices; experts too when the layout has
      # an expert axis larger than one (expert parallelism).
      y, stats = parallel.sharded_moe(
        xt,
        routing,
        self.experts.params(),
        self.experts.axes(),
        c,
        mesh,
        capacity=cap,
        token_mask=tmask,
      )
    else:
      y, stats = dispatch.run(
        xt, routing, self.experts.bound(), capacity=cap, token_mask=tmask, before=None
      )
    if "device_load" not in stats:  # one device computes every copy and moves nothing
      computed = jnp.round(jnp.sum(slots) * (1.0 - stats["dropped_fraction"]))
      stats |= {
        "device_load": computed.astype(jnp.float32)[None],
        "native_device_load": computed.astype(jnp.float32)[None],
        "a2a_bytes": jnp.zeros((), jnp.float32),
      }
    if self.shared_experts is not None:
      with jax.named_scope("shared_experts"):
        y = y + self.shared_experts(xt)

    counts = losses.expert_counts(routing, tmask)  # [E]
    n_tokens = b * s if tmask is None else jnp.maximum(jnp.sum(tmask), 1)
    aux = {
      "load_balance_loss": losses.load_balance_loss(routing, tmask),
      "seq_balance_loss": losses.sequence_balance_loss(routing, s, tmask),
      "router_z_loss": losses.router_z_loss(routing, tmask),
      "router_entropy": losses.router_entropy(routing),
      "experts_per_token": jnp.sum(slots) / n_tokens,
      "expert_counts": counts,
      "expert_load": counts / jnp.maximum(jnp.sum(counts), 1.0),
      **stats,
    }
    if return_routing:
      return y.reshape(b, s, d), aux, routing
    return y.reshape(b, s, d), aux

  def update_aux_free_bias(self, counts: jax.Array) -> None:
    """Apply one aux-loss-free bias step from this layer's `aux["expert_counts"]` (no-op without
    `aux_free_bias`)."""
    if self.router.aux_free_bias is not None:
      self.router.aux_free_bias[...] = losses.update_aux_free_bias(
        self.router.aux_free_bias[...], counts, self.config.aux_free_bias_rate
      )

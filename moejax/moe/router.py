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

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Routing(NamedTuple):
  """The output of every router. See the module docstring for the fields' meaning."""

  expert_ids: jax.Array  # [T, K] int32
  weights: jax.Array  # [T, K] float32
  mask: jax.Array  # [T, K] bool
  probs: jax.Array  # [T, E] float32
  logits: jax.Array  # [T, E] float32
  # Expert choice fixes each expert's capacity C itself; None for token-choice routers.
  capacity: int | None = None

  @property
  def num_experts(self) -> int:
    return self.probs.shape[-1]


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


def route(logits: jax.Array, config, *, bias: jax.Array | None = None) -> Routing:
  """Apply the router named by `config.router` (an `MoEConfig`) to logits [T, E]."""
  c = config
  if c.router == "softmax_topk":
    return softmax_topk(
      logits,
      top_k=c.top_k,
      norm_topk_prob=c.norm_topk_prob,
      routed_scaling_factor=c.routed_scaling_factor,
      bias=bias,
      num_groups=c.num_groups,
      topk_groups=c.topk_groups,
    )
  if c.router == "topk_softmax":
    return topk_softmax(
      logits, top_k=c.top_k, routed_scaling_factor=c.routed_scaling_factor, bias=bias
    )
  if c.router == "sigmoid":
    return sigmoid_topk(
      logits,
      top_k=c.top_k,
      norm_topk_prob=c.norm_topk_prob,
      routed_scaling_factor=c.routed_scaling_factor,
      bias=bias,
      num_groups=c.num_groups,
      topk_groups=c.topk_groups,
    )
  if c.router == "expert_choice":
    return expert_choice(logits, capacity=c.capacity(logits.shape[0]))
  if c.router == "top_p":
    return top_p(
      logits,
      top_p=c.top_p,
      top_k=c.top_k,
      norm_topk_prob=c.norm_topk_prob,
      routed_scaling_factor=c.routed_scaling_factor,
    )
  raise ValueError(f"MoEConfig.router={c.router!r} is unknown")

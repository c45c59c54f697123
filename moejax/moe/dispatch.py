"""Dispatch and combine: move token copies to their experts and the results back.

Two strategies, each a pair of pure functions around the expert computation:

- **dropless** (MegaBlocks, Gale et al. 2023): sort the T*K token copies by expert, run the experts as
  one grouped matmul over the ragged groups, unsort, and sum each token's K outputs with its combine
  weights. No token is ever dropped; memory is T*K*D, fixed, whatever the load balance.
- **capacity** (GShard, Lepikhin et al. 2020; Switch, Fedus et al. 2021): each expert has C slots.
  Slots are filled in priority order -- every token's first choice (in token order) before any
  second choice -- and copies that find their expert full are dropped: they get zero expert output
  and ride the residual. The expert computation is a dense batched matmul over [E, C, D].

Unused routing slots (`Routing.mask` False: top-p, expert choice) are never dispatched. Expert choice
fixes C itself (`Routing.capacity`), so capacity dispatch drops nothing for it, and dropless dispatch
bounds its buffer by E * C instead of T * K.

Causality: dropless dispatch with a token-choice router is causal (a token's output depends on no
other token). Capacity dispatch is not: whether a token's copy is dropped depends on which tokens
came before it in priority order, which includes later positions' first choices ahead of its second.
Expert choice is not causal either. Use dropless for autoregressive evaluation and decoding.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from moejax.moe.router import Routing


def _with_zero_row(a: jax.Array) -> jax.Array:
  """Append one zero row: the target of every index that points 'nowhere'."""
  return jnp.concatenate([a, jnp.zeros((1, *a.shape[1:]), a.dtype)], axis=0)


def rank_in_group(keys: jax.Array, num_groups: int) -> jax.Array:
  """Rank of each element among the elements with the same key, in order: keys [N] in [0, G)."""
  order = jnp.argsort(keys, stable=True)
  sizes = jnp.bincount(keys, length=num_groups)
  starts = jnp.cumsum(sizes) - sizes
  ranked = jnp.arange(keys.shape[0]) - starts[keys[order]]
  return jnp.zeros(keys.shape, jnp.int32).at[order].set(ranked.astype(jnp.int32))


def _combine(gathered: jax.Array, weights: jax.Array, dtype) -> jax.Array:
  """Weighted sum of each token's K expert outputs [T, K, D] -> [T, D], accumulated in float32."""
  y = jnp.einsum("tkd,tk->td", gathered.astype(jnp.float32), weights.astype(jnp.float32))
  return y.astype(dtype)


# ----------------------------------------------------------------------------------------------------
# Dropless: sort by expert + grouped matmul.


class SortPlan(NamedTuple):
  """How sorted rows map back to (token, slot) pairs."""

  token_idx: jax.Array  # [N] source token of each sorted row
  inverse: jax.Array  # [T*K] sorted row of each (token, slot); N (the zero row) if not dispatched
  group_sizes: jax.Array  # [E] rows per expert; sum <= N, trailing rows are unused slots


def sort_dispatch(x: jax.Array, routing: Routing) -> tuple[jax.Array, SortPlan]:
  """x [T, D] -> token copies sorted by expert [N, D] and the plan to undo it.

  N = T*K, or E*C when the router fixed a capacity C (expert choice) and that is smaller.
  """
  t, k = routing.expert_ids.shape
  e = routing.num_experts
  n = t * k if routing.capacity is None else min(t * k, e * routing.capacity)
  # Unused slots get the sentinel expert E: they sort last and fall outside every group.
  flat_ids = jnp.where(routing.mask, routing.expert_ids, e).reshape(-1)  # [T*K]
  order = jnp.argsort(flat_ids, stable=True)[:n]  # [N]
  group_sizes = jnp.bincount(flat_ids, length=e).astype(jnp.int32)  # [E] (sentinel not counted)
  token_idx = order // k  # [N]
  inverse = jnp.full((t * k,), n, jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
  return x[token_idx], SortPlan(token_idx, inverse, group_sizes)  # [N, D]


def sort_combine(out: jax.Array, plan: SortPlan, routing: Routing, dtype=None) -> jax.Array:
  """Expert outputs in sorted order [N, D] -> weighted per-token sum [T, D]."""
  t, k = routing.expert_ids.shape
  gathered = _with_zero_row(out)[plan.inverse].reshape(t, k, -1)  # [T, K, D]
  return _combine(gathered, routing.weights, dtype or out.dtype)


def dropless(
  x: jax.Array, routing: Routing, experts: Callable[[jax.Array, jax.Array], jax.Array]
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Dropless MoE over x [T, D]; `experts(x_sorted [N, D], group_sizes [E]) -> [N, D]`."""
  with jax.named_scope("permute"):
    x_sorted, plan = sort_dispatch(x, routing)  # [N, D]
  with jax.named_scope("experts"):
    out = experts(x_sorted, plan.group_sizes)  # [N, D]
  with jax.named_scope("combine"):
    y = sort_combine(out, plan, routing, x.dtype)  # [T, D]
  return y, {"dropped_fraction": jnp.zeros((), jnp.float32)}


# ----------------------------------------------------------------------------------------------------
# Capacity: GShard slot assignment into an [E, C, D] buffer.


class CapacityPlan(NamedTuple):
  slot: jax.Array  # [T, K] buffer row e*C + position of each (token, slot); E*C if not kept
  keep: jax.Array  # [T, K] the copy got a slot
  source: jax.Array  # [E*C] token in each buffer row; T (the zero row) if the row is empty


def capacity_dispatch(
  x: jax.Array, routing: Routing, capacity: int
) -> tuple[jax.Array, CapacityPlan]:
  """x [T, D] -> capacity buffer [E, C, D] and the plan to undo it."""
  t, k = routing.expert_ids.shape
  e, c = routing.num_experts, capacity
  # Priority order is k-major: all first choices, in token order, then all second choices, ...
  ids = jnp.where(routing.mask, routing.expert_ids, e).T.reshape(-1)  # [K*T]
  position = rank_in_group(ids, e + 1)  # [K*T] rank within its expert, in priority order
  keep = (ids < e) & (position < c)  # [K*T]
  slot = jnp.where(keep, ids * c + position, e * c)  # [K*T]
  token = jnp.tile(jnp.arange(t, dtype=jnp.int32), k)  # [K*T]
  # Every dropped copy writes to row E*C, which is cut off.
  source = jnp.full((e * c + 1,), t, jnp.int32).at[slot].set(token)[: e * c]  # [E*C]
  plan = CapacityPlan(slot.reshape(k, t).T, keep.reshape(k, t).T, source)
  buffer = _with_zero_row(x)[source].reshape(e, c, -1)  # [E, C, D]
  return buffer, plan


def capacity_combine(out: jax.Array, plan: CapacityPlan, routing: Routing, dtype=None) -> jax.Array:
  """Expert outputs [E, C, D] -> weighted per-token sum [T, D]; dropped copies contribute zero."""
  e, c, d = out.shape
  gathered = _with_zero_row(out.reshape(e * c, d))[plan.slot]  # [T, K, D]
  return _combine(gathered, jnp.where(plan.keep, routing.weights, 0.0), dtype or out.dtype)


def capacity(
  x: jax.Array,
  routing: Routing,
  experts: Callable[[jax.Array], jax.Array],
  capacity: int,
  token_mask: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Capacity-bounded MoE over x [T, D]; `experts(buffer [E, C, D]) -> [E, C, D]`.

  The reported `dropped_fraction` counts the copies of real tokens (`token_mask` [T], 1 = real).
  """
  with jax.named_scope("permute"):
    buffer, plan = capacity_dispatch(x, routing, capacity)  # [E, C, D]
  with jax.named_scope("experts"):
    out = experts(buffer)  # [E, C, D]
  with jax.named_scope("combine"):
    y = capacity_combine(out, plan, routing, x.dtype)  # [T, D]
  used = routing.mask if token_mask is None else routing.mask & (token_mask[:, None] > 0)  # [T, K]
  dropped = 1.0 - jnp.sum(plan.keep & used) / jnp.maximum(jnp.sum(used), 1)
  return y, {"dropped_fraction": dropped.astype(jnp.float32)}

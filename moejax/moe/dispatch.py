"""Dispatch and combine: move token copies to their experts and the results back.

Two strategies, each a pair of pure functions around the expert computation:

- **dropless** (MegaBlocks, Gale et al. 2023): sort the T*K token copies by expert, run the experts as
  one grouped matmul over the ragged groups, unsort, and sum each token's K outputs with its combine
  weights. No token is ever dropped; memory is T*K*D, fixed, whatever the load balance.
- **capacity** (GShard, Lepikhin et al. 2020; Switch, Fedus et al. 2021): each expert has C buffer rows.
  Rows are filled in priority order -- every token's first choice (in token order) before any
  second choice -- and copies that find their expert full are dropped: they get zero expert output
  and ride the residual. The expert computation is a dense batched matmul over [E, C, D].

Unused routing slots (`Routing.mask` False: top-p, expert choice) are never dispatched. Expert choice
fixes C itself (`Routing.capacity`), so capacity dispatch drops nothing for it, and dropless dispatch
bounds its buffer by E * C instead of T * K.

Both are entries of `DISPATCHES` (`MoEConfig.dispatch`), and this file is their only implementation:
expert parallelism (moe/parallel.py) reuses the keep rule (`queue_positions` with the copies that
other devices put ahead in the queue), `combine` and `dropped_fraction`, and adds only its planning
and transport. Vocabulary: a token's K routing *slots* (`Routing.mask` [T, K]); a *copy* is one
used slot sent to its expert; a capacity buffer has C *rows* per expert.

Causality: dropless dispatch with a token-choice router is causal (a token's output depends on no
other token). Capacity dispatch is not: whether a token's copy is dropped depends on which tokens
came before it in priority order, which includes later positions' first choices ahead of its second.
Expert choice is not causal either. Use dropless for autoregressive evaluation and decoding.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from moejax.moe.router import Routing


def with_zero_row(a: jax.Array) -> jax.Array:
  """Append one zero row: the target of every index that points 'nowhere'."""
  return jnp.concatenate([a, jnp.zeros((1, *a.shape[1:]), a.dtype)], axis=0)


def rank_in_group(keys: jax.Array, num_groups: int) -> jax.Array:
  """Rank of each element among the elements with the same key, in order: keys [N] in [0, G)."""
  order = jnp.argsort(keys, stable=True)
  sizes = jnp.bincount(keys, length=num_groups)
  starts = jnp.cumsum(sizes) - sizes
  ranked = jnp.arange(keys.shape[0]) - starts[keys[order]]
  return jnp.zeros(keys.shape, jnp.int32).at[order].set(ranked.astype(jnp.int32))


def combine(gathered: jax.Array, weights: jax.Array, dtype) -> jax.Array:
  """Weighted sum of each token's K expert outputs [T, K, D] -> [T, D], accumulated in float32."""
  y = jnp.einsum("tkd,tk->td", gathered.astype(jnp.float32), weights.astype(jnp.float32))
  return y.astype(dtype)


def queue_positions(
  expert_ids: jax.Array, mask: jax.Array, num_experts: int, before: jax.Array | None = None
) -> jax.Array:
  """Each copy's place [T, K] in its expert's queue, in GShard's priority order.

  The order is k-major: every token's first slot (in token order), then every second slot, ...
  Unused slots (mask False) get places past every real one. `before` [K, E], when given, counts
  the copies of expert e ahead of this batch's level-k copies in a queue longer than this batch
  (expert parallelism: every device's earlier levels, and the earlier devices' level k); None: the
  batch is the whole queue. A copy keeps a buffer row iff its place is below C.
  """
  t, k = expert_ids.shape
  e = num_experts
  keys = jnp.where(mask, expert_ids, e).T  # [K, T] in priority order
  place = rank_in_group(keys.reshape(-1), e + 1).reshape(k, t)  # among this batch's copies
  if before is not None:
    local = jax.vmap(lambda r: jnp.bincount(r, length=e + 1))(keys)[:, :e]  # [K, E]
    local_before = jnp.cumsum(local, axis=0) - local  # this batch's earlier levels
    safe, kk = jnp.minimum(keys, e - 1), jnp.arange(k)[:, None]
    place = place - local_before[kk, safe] + before[kk, safe]  # [K, T]
  return place.T  # [T, K]


def dropped_fraction(
  kept: jax.Array, mask: jax.Array, token_mask: jax.Array | None = None
) -> jax.Array:
  """The fraction of real tokens' used slots [T, K] that were not computed (kept False)."""
  used = mask if token_mask is None else mask & (token_mask[:, None] > 0)  # [T, K]
  return (1.0 - jnp.sum(kept & used) / jnp.maximum(jnp.sum(used), 1)).astype(jnp.float32)


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
  gathered = with_zero_row(out)[plan.inverse].reshape(t, k, -1)  # [T, K, D]
  return combine(gathered, routing.weights, dtype or out.dtype)


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
# Capacity: GShard's assignment of copies to the rows of an [E, C, D] buffer.


class CapacityPlan(NamedTuple):
  row: jax.Array  # [T, K] buffer row e*C + place of each (token, slot); E*C if not kept
  keep: jax.Array  # [T, K] the copy got a row
  source: jax.Array  # [E*C] token in each buffer row; T (the zero row) if the row is empty


def capacity_dispatch(
  x: jax.Array, routing: Routing, capacity: int, before: jax.Array | None = None
) -> tuple[jax.Array, CapacityPlan]:
  """x [T, D] -> capacity buffer [E, C, D] and the plan to undo it (`before`: `queue_positions`)."""
  t, k = routing.expert_ids.shape
  e, c = routing.num_experts, capacity
  ids = jnp.where(routing.mask, routing.expert_ids, e).T.reshape(-1)  # [K*T] k-major
  position = queue_positions(routing.expert_ids, routing.mask, e, before).T.reshape(-1)  # [K*T]
  keep = (ids < e) & (position < c)  # [K*T]
  row = jnp.where(keep, ids * c + position, e * c)  # [K*T]
  token = jnp.tile(jnp.arange(t, dtype=jnp.int32), k)  # [K*T]
  # Every dropped copy writes to row E*C, which is cut off.
  source = jnp.full((e * c + 1,), t, jnp.int32).at[row].set(token)[: e * c]  # [E*C]
  plan = CapacityPlan(row.reshape(k, t).T, keep.reshape(k, t).T, source)
  buffer = with_zero_row(x)[source].reshape(e, c, -1)  # [E, C, D]
  return buffer, plan


def capacity_combine(out: jax.Array, plan: CapacityPlan, routing: Routing, dtype=None) -> jax.Array:
  """Expert outputs [E, C, D] -> weighted per-token sum [T, D]; dropped copies contribute zero."""
  e, c, d = out.shape
  gathered = with_zero_row(out.reshape(e * c, d))[plan.row]  # [T, K, D]
  return combine(gathered, jnp.where(plan.keep, routing.weights, 0.0), dtype or out.dtype)


def capacity(
  x: jax.Array,
  routing: Routing,
  experts: Callable[[jax.Array], jax.Array],
  capacity: int,
  token_mask: jax.Array | None = None,
  before: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Capacity-bounded MoE over x [T, D]; `experts(buffer [E, C, D]) -> [E, C, D]`.

  The reported `dropped_fraction` counts the copies of real tokens (`token_mask` [T], 1 = real).
  `before` places this batch in a longer queue (see `queue_positions`).
  """
  with jax.named_scope("permute"):
    buffer, plan = capacity_dispatch(x, routing, capacity, before)  # [E, C, D]
  with jax.named_scope("experts"):
    out = experts(buffer)  # [E, C, D]
  with jax.named_scope("combine"):
    y = capacity_combine(out, plan, routing, x.dtype)  # [T, D]
  return y, {"dropped_fraction": dropped_fraction(plan.keep, routing.mask, token_mask)}


# ----------------------------------------------------------------------------------------------------
# The registry.


@dataclasses.dataclass(frozen=True)
class Dispatch:
  """A registered dispatch strategy.

  `run(x [T, D], routing, experts, *, capacity, token_mask, before) -> (y [T, D], stats)`, where
  `experts` has `grouped(x_sorted, group_sizes)` and `batched(buffer)` (`Experts.bound()`), and
  stats holds at least `dropped_fraction`. `capacity`: the strategy bounds each expert's copies by
  C (`MoEConfig.capacity`), and expert parallelism applies the same keep rule across devices.
  """

  run: Callable[..., tuple[jax.Array, dict[str, jax.Array]]]
  capacity: bool


def _run_dropless(x, routing, experts, *, capacity, token_mask, before):
  del capacity, token_mask, before  # nothing is dropped, so nothing to place
  return dropless(x, routing, experts.grouped)


_capacity_moe = capacity  # the parameter named `capacity` below shadows the function


def _run_capacity(x, routing, experts, *, capacity, token_mask, before):
  return _capacity_moe(x, routing, experts.batched, capacity, token_mask, before)


DISPATCHES: dict[str, Dispatch] = {
  "dropless": Dispatch(_run_dropless, capacity=False),
  "capacity": Dispatch(_run_capacity, capacity=True),
}

"""Expert parallelism's planning: which device computes which token copies.

Every device computes the same plan from the same gathered per-expert counts, so no plan is ever
communicated. n devices form the EP group; expert e's owner is device e // (E / n).

- `native_plan`: every expert computed by its owner.
- `llep_plan`: Least-Loaded Expert Parallelism (LLEP; Nguyen et al. 2026): when the busiest device's
  load exceeds alpha x the mean, the heaviest experts' excess copies, with those experts' weights,
  spill to the least-loaded devices, each hosting at most `guests` foreign experts (static shapes).
- `pair_counts`: from a plan, how many copies of each expert each source sends to each destination.
- `queue_before`: for capacity dispatch, the copies other devices put ahead of this device's in each
  expert's global priority queue (`moejax.moe.dispatch.queue_positions`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Plan(NamedTuple):
  share: jax.Array  # [E, n] copies of expert e computed on device d
  hosted: (
    jax.Array
  )  # [n, guests] foreign expert hosted in each guest position of each device; -1 = none


def native_plan(counts: jax.Array, n: int) -> Plan:
  """Every expert computed by its owner (device e // (E / n))."""
  e = counts.shape[0]
  owner = jnp.arange(e) // (e // n)
  share = jnp.where(owner[:, None] == jnp.arange(n), counts[:, None], 0).astype(jnp.int32)
  return Plan(share, jnp.full((n, 0), -1, jnp.int32))


def llep_plan(counts: jax.Array, n: int, alpha: float, guests: int) -> Plan:
  """The least-loaded assignment (LLA) of LLEP, with static shapes.

  counts [E] are the EP group's copies per expert. With m = alpha * sum(counts) / n, experts are
  visited heaviest first; the owner keeps what fits under m given its pending native load, and the
  rest goes to the other devices with the least effective load (assigned + pending), each up to m
  (or, when none has room, all of it to the least loaded one). A device hosts at most `guests`
  foreign experts (`guests`); when none can host more, the owner keeps the remainder. No spill at all unless the
  busiest device's native load exceeds m.
  """
  e = counts.shape[0]
  el = e // n
  counts = counts.astype(jnp.int32)
  native = counts.reshape(n, el).sum(1)  # [n]
  m = jnp.floor(alpha * jnp.sum(counts) / n).astype(jnp.int32)
  devices = jnp.arange(n)
  big = jnp.iinfo(jnp.int32).max

  def expert(i, state):
    assigned, pending, share, hosted, nhost = state
    ex = order[i]
    ne, o = counts[ex], ex // el
    pending = pending.at[o].add(-ne)
    take = jnp.clip(m - assigned[o] - pending[o], 0, ne)
    share = share.at[ex, o].set(take)
    assigned = assigned.at[o].add(take)

    def helper(_, st):
      assigned, share, hosted, nhost, left = st
      eff = assigned + pending
      room = m - eff
      ok = (devices != o) & (nhost < guests) & (share[ex] == 0)
      fits = ok & (room > 0)
      h = jnp.where(
        jnp.any(fits), jnp.argmin(jnp.where(fits, eff, big)), jnp.argmin(jnp.where(ok, eff, big))
      )
      chunk = jnp.where(jnp.any(fits), jnp.minimum(left, room[h]), left)
      chunk = jnp.where(jnp.any(ok), chunk, 0)
      used = chunk > 0
      share = share.at[ex, h].add(chunk)
      assigned = assigned.at[h].add(chunk)
      g = jnp.minimum(nhost[h], guests - 1)
      hosted = hosted.at[h, g].set(jnp.where(used, ex, hosted[h, g]))
      nhost = nhost.at[h].add(used.astype(jnp.int32))
      return assigned, share, hosted, nhost, left - chunk

    assigned, share, hosted, nhost, left = jax.lax.fori_loop(
      0, n - 1, helper, (assigned, share, hosted, nhost, ne - take)
    )
    share = share.at[ex, o].add(left)  # no helper could host it: the owner computes the rest
    return assigned.at[o].add(left), pending, share, hosted, nhost

  order = jnp.argsort(-counts, stable=True)
  # `zero` carries the counts' type: inside shard_map the loop state must vary over the same axes.
  zero = jnp.sum(counts) * 0
  init = (
    jnp.zeros((n,), jnp.int32) + zero,
    native,
    jnp.zeros((e, n), jnp.int32) + zero,
    jnp.full((n, guests), -1, jnp.int32) + zero,
    jnp.zeros((n,), jnp.int32) + zero,
  )
  _, _, share, hosted, _ = jax.lax.fori_loop(0, e, expert, init)
  spill = jnp.max(native) > m
  base = native_plan(counts, n)
  return Plan(jnp.where(spill, share, base.share), jnp.where(spill, hosted, -1))


def device_order(e: int, n: int) -> jax.Array:
  """[E, n]: the order in which devices take an expert's copies: owner first, then the others."""
  owner = jnp.arange(e) // (e // n)
  rest = jnp.arange(n)[None, :] + (jnp.arange(n)[None, :] >= owner[:, None])  # skip the owner
  return jnp.concatenate([owner[:, None], rest[:, : n - 1]], axis=1)


def pair_counts(cnt: jax.Array, plan: Plan) -> jax.Array:
  """[n_src, E, n_dst]: copies of expert e that source s sends to device d.

  An expert's copies are ranked source by source (and in each source's own order); the plan's shares
  take consecutive rank ranges in `_device_order`.
  """
  e, n = plan.share.shape
  order = device_order(e, n)  # [E, n]
  share_ordered = jnp.take_along_axis(plan.share, order, axis=1)
  hi_ordered = jnp.cumsum(share_ordered, axis=1)
  lo = (
    jnp.zeros((e, n), jnp.int32).at[jnp.arange(e)[:, None], order].set(hi_ordered - share_ordered)
  )
  hi = lo + plan.share  # [E, n] rank range of each device
  start = jnp.cumsum(cnt, axis=0) - cnt  # [n_src, E]
  end = start + cnt
  return jnp.clip(
    jnp.minimum(end[:, :, None], hi[None]) - jnp.maximum(start[:, :, None], lo[None]), 0, None
  ).astype(jnp.int32)


def queue_before(local: jax.Array, token_axes) -> jax.Array:
  """[K, E]: the copies of expert e ahead of this device's level-k copies in the global queue.

  `local` [K, E] counts this device's copies per choice level and expert. In GShard's k-major order
  a level-k copy waits behind every device's copies of levels < k and behind the level-k copies of
  the devices before it along `token_axes` (`moejax.moe.dispatch.queue_positions`' `before`).
  """
  every = jax.lax.all_gather(local, token_axes)  # [S, K, E]
  me = jax.lax.axis_index(token_axes)
  total = every.sum(0)  # [K, E]
  earlier_levels = jnp.cumsum(total, axis=0) - total
  earlier_devices = jnp.sum(
    jnp.where((jnp.arange(every.shape[0]) < me)[:, None, None], every, 0), 0
  )  # [K, E]
  return earlier_levels + earlier_devices

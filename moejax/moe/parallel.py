"""Expert parallelism (EP): the MoE layer's dispatch and combine across a device mesh.

The experts are split over the mesh axes that the logical axis `expert` maps to (the *EP group*;
`sharding.logical_rules`), the tokens over every mesh axis except those that split the experts'
hidden dimension (expert tensor parallelism). Inside one `jax.shard_map` each device

    1. takes its tokens' routing (computed outside, so every router keeps its global semantics),
    2. for capacity dispatch, decides which copies keep a slot *in the global priority order*
       (all first choices in token order, then all second choices, ...) from per-device counts
       gathered over the token axes, so it drops exactly the copies one device would drop,
    3. sends each token copy to the device that computes its expert (`all_to_all`),
    4. runs its experts on what it received with `moejax.kernels.gmm` (psum over the tensor axes when
       the experts' hidden dimension is split),
    5. sends the results back, and sums each token's K outputs with its combine weights.

Outputs and gradients equal the single-device layer's (tests/moe/test_parallel.py).

Transports (`MoEConfig.ep_transport`):

- `padded`: `all_to_all` of fixed-size buffers [n, P, D] (n devices in the EP group). Dropless stays
  dropless because P is the worst case one device can send to one other: each token sends at most
  one copy per expert, so P = T_local * min(K, experts hosted per device), and with a capacity C
  (capacity dispatch, expert choice) at most C per expert: P <= experts_per_device * C. The buffers
  therefore hold n * P rows where a balanced routing needs T_local * K: up to n times the memory of
  the tokens actually moved, both ways and kept for the backward pass. It runs everywhere, and it is
  the only transport XLA:CPU compiles.
- `ragged`: `ragged_all_to_all` sends exactly the routed rows (TPU/GPU). The receive buffer still has
  the static worst case n * P rows; only the bytes on the wire shrink.
- `auto`: `ragged` on accelerators, `padded` on CPU; the choice is logged once.

Least-Loaded Expert Parallelism (LLEP; Nguyen et al. 2026) is on when `MoEConfig.llep_alpha` is set:
when the busiest device's load exceeds alpha x the mean, the least-loaded assignment (`llep_plan`)
spills the excess copies of the heaviest experts, with those experts' weights, to the devices with the
least effective load. Each device hosts at most `llep_slots` foreign experts (static shapes). Results
are exact: the same rows meet the same weights, only on another device. The weights travel by
`all_to_all` of [n, slots, D, F] buffers per matrix, and their gradients travel back the same way.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from absl import logging
from jax.sharding import PartitionSpec as P

from moejax import sharding
from moejax.moe.config import MoEConfig
from moejax.moe.dispatch import _combine, _with_zero_row, rank_in_group
from moejax.moe.experts import grouped_ffn
from moejax.moe.router import Routing

TRANSPORTS = ("auto", "padded", "ragged")

# The collective the ragged transport calls; tests swap in `emulated_ragged_all_to_all` to run the
# ragged index arithmetic on CPU, where XLA cannot compile the real one.
ragged_all_to_all = jax.lax.ragged_all_to_all

_logged: set[tuple[str, str]] = set()


@dataclasses.dataclass(frozen=True)
class EPLayout:
  """How the MoE layer maps onto a mesh."""

  mesh: jax.sharding.AbstractMesh | jax.sharding.Mesh
  token_axes: tuple[str, ...]  # split the tokens inside the MoE layer
  expert_axes: tuple[str, ...]  # split the experts: the EP group
  tensor_axes: tuple[str, ...]  # split each expert's hidden dimension F

  def size(self, axes: tuple[str, ...]) -> int:
    return math.prod(self.mesh.shape[a] for a in axes)

  @property
  def ep_size(self) -> int:
    return self.size(self.expert_axes)

  @property
  def token_shards(self) -> int:
    return self.size(self.token_axes)


def layout(mesh, config: MoEConfig, num_tokens: int, rules=None) -> EPLayout:
  """The EP layout of `mesh` under the logical rules (default: `sharding.current_rules()`)."""
  names = tuple(mesh.axis_names)
  expert_axes = tuple(a for a in sharding.mesh_axes_of("expert", rules) if a in names)
  tensor_axes = tuple(
    a for a in sharding.mesh_axes_of("mlp", rules) if a in names and a not in expert_axes
  )
  token_axes = tuple(a for a in names if a not in tensor_axes)
  out = EPLayout(mesh, token_axes, expert_axes, tensor_axes)
  e, f = config.num_experts, config.expert_hidden_dim
  if e % out.ep_size:
    raise ValueError(
      f"MoEConfig.num_experts={e} is not divisible by the expert-parallel size {out.ep_size} "
      f"(mesh axes {expert_axes}); use a multiple of it or a smaller mesh.expert"
    )
  if f % out.size(tensor_axes):
    raise ValueError(
      f"MoEConfig.expert_hidden_dim={f} is not divisible by the tensor-parallel size "
      f"{out.size(tensor_axes)} (mesh axes {tensor_axes})"
    )
  if num_tokens % out.token_shards:
    raise ValueError(
      f"the MoE layer got {num_tokens} tokens, which the {out.token_shards} token shards "
      f"(mesh axes {token_axes}) do not divide; make batch_size * seq_len a multiple of it"
    )
  return out


def choose_transport(requested: str, platform: str) -> str:
  """`auto` -> `ragged` on accelerators, `padded` on CPU (whose XLA cannot compile ragged)."""
  if requested not in TRANSPORTS:
    raise ValueError(f"MoEConfig.ep_transport={requested!r} is invalid: one of {TRANSPORTS}")
  chosen = requested if requested != "auto" else ("padded" if platform == "cpu" else "ragged")
  if (requested, chosen) not in _logged:
    _logged.add((requested, chosen))
    logging.info(
      "expert parallelism: %s transport on %s (requested %s)", chosen, platform, requested
    )
  return chosen


# ----------------------------------------------------------------------------------------------------
# Planning: which device computes which copies. Every device computes the same plan from the same
# gathered counts, so no plan is ever communicated.


class Plan(NamedTuple):
  share: jax.Array  # [E, n] copies of expert e computed on device d
  hosted: jax.Array  # [n, S] foreign expert in each spill slot of each device; -1 = empty


def native_plan(counts: jax.Array, n: int) -> Plan:
  """Every expert computed by its owner (device e // (E / n))."""
  e = counts.shape[0]
  owner = jnp.arange(e) // (e // n)
  share = jnp.where(owner[:, None] == jnp.arange(n), counts[:, None], 0).astype(jnp.int32)
  return Plan(share, jnp.full((n, 0), -1, jnp.int32))


def llep_plan(counts: jax.Array, n: int, alpha: float, slots: int) -> Plan:
  """The least-loaded assignment (LLA) of LLEP, with static shapes.

  counts [E] are the EP group's copies per expert. With m = alpha * sum(counts) / n, experts are
  visited heaviest first; the owner keeps what fits under m given its pending native load, and the
  rest goes to the other devices with the least effective load (assigned + pending), each up to m
  (or, when none has room, all of it to the least loaded one). A device hosts at most `slots`
  foreign experts; when none can host more, the owner keeps the remainder. No spill at all unless the
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
      ok = (devices != o) & (nhost < slots) & (share[ex] == 0)
      fits = ok & (room > 0)
      h = jnp.where(
        jnp.any(fits), jnp.argmin(jnp.where(fits, eff, big)), jnp.argmin(jnp.where(ok, eff, big))
      )
      chunk = jnp.where(jnp.any(fits), jnp.minimum(left, room[h]), left)
      chunk = jnp.where(jnp.any(ok), chunk, 0)
      used = chunk > 0
      share = share.at[ex, h].add(chunk)
      assigned = assigned.at[h].add(chunk)
      slot = jnp.minimum(nhost[h], slots - 1)
      hosted = hosted.at[h, slot].set(jnp.where(used, ex, hosted[h, slot]))
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
    jnp.full((n, slots), -1, jnp.int32) + zero,
    jnp.zeros((n,), jnp.int32) + zero,
  )
  _, _, share, hosted, _ = jax.lax.fori_loop(0, e, expert, init)
  spill = jnp.max(native) > m
  base = native_plan(counts, n)
  return Plan(jnp.where(spill, share, base.share), jnp.where(spill, hosted, -1))


def _device_order(e: int, n: int) -> jax.Array:
  """[E, n]: the order in which devices take an expert's copies: owner first, then the others."""
  owner = jnp.arange(e) // (e // n)
  rest = jnp.arange(n)[None, :] + (jnp.arange(n)[None, :] >= owner[:, None])  # skip the owner
  return jnp.concatenate([owner[:, None], rest[:, : n - 1]], axis=1)


def _pair_counts(cnt: jax.Array, plan: Plan) -> jax.Array:
  """[n_src, E, n_dst]: copies of expert e that source s sends to device d.

  An expert's copies are ranked source by source (and in each source's own order); the plan's shares
  take consecutive rank ranges in `_device_order`.
  """
  e, n = plan.share.shape
  order = _device_order(e, n)  # [E, n]
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


# ----------------------------------------------------------------------------------------------------
# The per-device body.


def _global_keep(ids, mask, num_experts: int, capacity: int, token_axes) -> jax.Array:
  """[T_l, K] copies that get one of their expert's `capacity` slots in the global priority order."""
  t, k = ids.shape
  e = num_experts
  keys = jnp.where(mask, ids, e).T  # [K, T_l] k-major
  local = jax.vmap(lambda r: jnp.bincount(r, length=e + 1))(keys)[:, :e]  # [K, E]
  every = jax.lax.all_gather(local, token_axes)  # [S, K, E]
  me = jax.lax.axis_index(token_axes)
  before_k = jnp.cumsum(every.sum(0), axis=0) - every.sum(0)  # earlier choice levels, all devices
  before_s = jnp.sum(jnp.where((jnp.arange(every.shape[0]) < me)[:, None, None], every, 0), 0)
  rank = rank_in_group(keys.reshape(-1), e + 1).reshape(k, t)  # within expert, k-major, local
  local_before_k = jnp.cumsum(local, axis=0) - local  # [K, E]
  safe = jnp.minimum(keys, e - 1)
  kk = jnp.arange(k)[:, None]
  position = before_k[kk, safe] + before_s[kk, safe] + rank - local_before_k[kk, safe]
  return (mask.T & (position < capacity)).T


def emulated_ragged_all_to_all(
  operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *, axis_name, max_rows
):
  """`jax.lax.ragged_all_to_all`'s semantics from a padded `all_to_all` (for CPU tests)."""
  i = jnp.arange(max_rows)
  rows = jnp.clip(input_offsets[:, None] + i, 0, operand.shape[0] - 1)  # [n, P]
  chunks = jnp.where((i < send_sizes[:, None])[..., None], operand[rows], 0)
  received = jax.lax.all_to_all(chunks, axis_name, 0, 0)  # [n, P, D]: row s from source s
  where = jax.lax.all_to_all(output_offsets, axis_name, 0, 0)  # [n]: sender s's offset for me
  dest = jnp.where(i < recv_sizes[:, None], where[:, None] + i, output.shape[0])
  return output.at[dest.reshape(-1)].set(received.reshape(-1, operand.shape[-1]), mode="drop")


def _receive_slots(src, pos, slot_cnt, sentinel):
  """Slot (local expert) of each received row, from its source and position in that source's chunk."""
  cum = jnp.cumsum(slot_cnt, axis=1)  # [n, slots]
  valid = (src < slot_cnt.shape[0]) & (pos < cum[jnp.minimum(src, slot_cnt.shape[0] - 1), -1])
  slot = jnp.sum(pos[:, None] >= cum[jnp.minimum(src, slot_cnt.shape[0] - 1)], axis=1)
  return jnp.where(valid, slot, sentinel)


def _body(
  x, ids, weights, mask, w_gate, w_up, w_down, *, config, lay, capacity, bound, transport, slots
):
  """One device: x [T_l, D], routing [T_l, K], its experts' weights [El, D, F_l] / [El, F_l, D]."""
  c = config
  t, k = ids.shape
  d = x.shape[-1]
  e = c.num_experts
  n = lay.ep_size
  el = e // n
  ns = el + slots  # local expert slots: own experts, then hosted foreign ones
  me = jax.lax.axis_index(lay.expert_axes) if lay.expert_axes else 0
  ep = lay.expert_axes

  if capacity is not None and c.dispatch == "capacity":
    mask = _global_keep(ids, mask, e, capacity, lay.token_axes)
  kept = mask
  flat_ids = jnp.where(mask, ids, e).reshape(-1)  # [T_l*K], sentinel E when not dispatched
  local = jnp.bincount(flat_ids, length=e + 1)[:e].astype(jnp.int32)  # [E]
  cnt = jax.lax.all_gather(local, ep) if ep else local[None]  # [n, E]
  total = cnt.sum(0)
  plan = native_plan(total, n) if slots == 0 else llep_plan(total, n, c.llep_alpha, slots)
  pair = _pair_counts(cnt, plan)  # [n_src, E, n_dst]

  # Destination device and slot of each of my copies.
  safe = jnp.minimum(flat_ids, e - 1)
  rank = (jnp.cumsum(cnt, axis=0) - cnt)[me, safe] + rank_in_group(flat_ids, e + 1)  # group rank
  order_e = _device_order(e, n)
  hi = jnp.cumsum(jnp.take_along_axis(plan.share, order_e, axis=1), axis=1)  # [E, n]
  dest = order_e[safe, jnp.sum(rank[:, None] >= hi[safe], axis=1).clip(0, n - 1)]
  foreign = jnp.argmax(plan.hosted[dest] == safe[:, None], axis=1) if slots else 0
  slot = jnp.where(dest == safe // el, safe % el, el + foreign)
  used = flat_ids < e
  key = jnp.where(used, dest * ns + slot, n * ns)
  order = jnp.argsort(key, stable=True)  # my copies grouped by destination, then slot
  position = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
  sent = pair[me].sum(0)  # [n_dst]
  start = jnp.cumsum(sent) - sent
  copies_x = _with_zero_row(x)[jnp.where(used[order], order // k, t)]  # [T_l*K, D] sorted

  # What I receive: per source and slot, from the shared plan.
  own = pair[:, me * el + jnp.arange(el), me]  # [n_src, El]
  hosted = plan.hosted[me]  # [S]
  guest = jnp.where(hosted >= 0, pair[:, jnp.maximum(hosted, 0), me], 0)  # [n_src, S]
  slot_cnt = jnp.concatenate([own, guest], axis=1)  # [n_src, El+S]
  recv = slot_cnt.sum(1)  # [n_src]
  m = pair.sum(1)  # [n_src, n_dst] rows from s to d
  rows = n * bound

  if transport == "padded":
    q = start[:, None] + jnp.arange(bound)  # [n, P]
    valid = jnp.arange(bound) < sent[:, None]
    buf = jnp.where(valid[..., None], copies_x[jnp.clip(q, 0, t * k - 1)], 0)
    got = _a2a(buf, ep).reshape(rows, d)
    src, pos = jnp.arange(rows) // bound, jnp.arange(rows) % bound
  else:
    recv_start = jnp.cumsum(recv) - recv
    out_off = (jnp.cumsum(m, axis=0) - m)[me]  # where my chunk lands on each destination
    got = _ragged(copies_x, jnp.zeros((rows, d), x.dtype), start, sent, out_off, recv, ep, bound)
    src = jnp.sum(jnp.arange(rows)[:, None] >= jnp.cumsum(recv)[None], axis=1)
    pos = jnp.arange(rows) - jnp.concatenate([recv_start, jnp.zeros((1,), recv.dtype)])[src]

  # Compute: group the received rows by slot and run the grouped FFN.
  row_slot = _receive_slots(src, pos, slot_cnt, ns)
  by_slot = jnp.argsort(row_slot, stable=True)
  group_sizes = slot_cnt.sum(0).astype(jnp.int32)  # [El+S]
  ws = [w_gate, w_up, w_down]
  if slots:
    ws = [
      None if w is None else jnp.concatenate([w, _fetch(w, plan.hosted, me, el, ep)]) for w in ws
    ]
  out = grouped_ffn(
    got[by_slot], group_sizes, *ws, activation=c.activation, backend=c.gmm_backend
  )  # [rows, D]
  if lay.tensor_axes:
    out = jax.lax.psum(out, lay.tensor_axes)
  out = jnp.zeros_like(out).at[by_slot].set(out)  # back to arrival order

  # Return the results and combine.
  if transport == "padded":
    back = _a2a(out.reshape(n, bound, d), ep).reshape(rows, d)
    row = dest * bound + position - start[dest]
  else:
    out_off_back = (jnp.cumsum(m, axis=1) - m)[:, me]  # where my results land on each source
    back = _ragged(
      out, jnp.zeros((t * k, d), out.dtype), recv_start, recv, out_off_back, sent, ep, bound
    )
    row = position
  row = jnp.where(used, row, back.shape[0])
  gathered = _with_zero_row(back)[row].reshape(t, k, d)
  y = _combine(gathered, jnp.where(kept, weights, 0.0), x.dtype)

  # Metrics of this device: copies computed (with and without LLEP), bytes it sends.
  load = plan.share.sum(0)[me].astype(jnp.float32)
  native = total.reshape(n, el).sum(1)[me].astype(jnp.float32)
  item = jnp.dtype(x.dtype).itemsize
  if transport == "padded":
    moved = jnp.full((), 2 * (n - 1) * bound * d * item, jnp.float32)  # self-sends excluded
  else:
    moved = 2.0 * (sent.sum() - sent[me]).astype(jnp.float32) * d * item
  if slots:
    per_expert = sum(w[0].size for w in (w_gate, w_up, w_down) if w is not None)
    moved = moved + jnp.float32(slots * (n - 1) * per_expert * item)
  return y, kept, load[None], native[None], moved[None]


def _a2a(x, ep):
  """Non-tiled all_to_all over the EP axes: row d of x goes to device d; row s of the result came
  from device s. The identity when the mesh has no expert axes."""
  return jax.lax.all_to_all(x, ep, 0, 0) if ep else x


def _ragged(operand, output, in_off, send, out_off, recv, ep, bound):
  if ragged_all_to_all is emulated_ragged_all_to_all:
    return emulated_ragged_all_to_all(
      operand, output, in_off, send, out_off, recv, axis_name=ep, max_rows=bound
    )
  return ragged_all_to_all(operand, output, in_off, send, out_off, recv, axis_name=ep)


def _fetch(w, hosted, me, el, ep):
  """The weights of the foreign experts I host [S, ...], sent by their owners (LLEP)."""
  n, slots = hosted.shape
  owner = jnp.where(hosted >= 0, hosted // el, -1)  # [n, S]
  mine = owner == me  # slots I must fill on each device
  send = jnp.where(mine[..., None, None], w[jnp.maximum(hosted, 0) % el], 0)  # [n, S, ...]
  got = _a2a(send, ep)  # [n_owner, S, ...]
  return got.sum(0)  # only the true owner sent non-zeros


def llep_slots(config: MoEConfig, lay: EPLayout) -> int:
  """Spill slots per device: 0 when LLEP is off or there is no other device to spill to."""
  return config.llep_slots if config.llep_alpha is not None and lay.ep_size > 1 else 0


def pair_bound(config: MoEConfig, t_local: int, k: int, lay: EPLayout, capacity) -> int:
  """P: the most rows one device can send to one other (see the module docstring)."""
  el = config.num_experts // lay.ep_size
  slots = llep_slots(config, lay)
  bound = t_local * min(k, el + slots)
  if capacity is not None:
    bound = min(bound, (el + slots) * capacity)
  return max(int(bound), 1)


def expert_parallel(
  x: jax.Array,
  routing: Routing,
  weights: tuple[jax.Array | None, jax.Array, jax.Array],
  config: MoEConfig,
  mesh,
  *,
  capacity: int | None = None,
  token_mask: jax.Array | None = None,
  rules=None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The MoE layer's dispatch -> experts -> combine over `mesh` (an abstract or concrete mesh).

  x [T, D]; routing over all T tokens; weights (w_gate or None, w_up [E, D, F], w_down [E, F, D]);
  `capacity` C for capacity dispatch (and expert choice); `token_mask` [T] (1 = real) only scopes
  `dropped_fraction` to real tokens, as in `dispatch.capacity`. Returns y [T, D] and stats:
  `dropped_fraction`; `device_load` [devices] token copies computed by each device (devices in the
  order of the token axes; devices that differ only in tensor axes compute the same copies and
  appear once); `native_device_load` [devices] the same without LLEP; `a2a_bytes` the bytes a device
  sends per forward pass through the all_to_alls (mean over devices).
  """
  c = config
  t, d = x.shape
  lay = layout(mesh, c, t, rules)
  # Without expert axes nothing travels: the padded path's all_to_alls are then identities.
  transport = choose_transport(c.ep_transport, _platform(mesh)) if lay.expert_axes else "padded"
  t_local = t // lay.token_shards
  k = routing.expert_ids.shape[1]
  bound = pair_bound(c, t_local, k, lay, capacity)
  slots = llep_slots(c, lay)
  tok = P(lay.token_axes)
  w_spec = lambda w: None if w is None else P(lay.expert_axes, None, lay.tensor_axes)
  w_down_spec = P(lay.expert_axes, lay.tensor_axes, None)
  w_gate, w_up, w_down = weights

  body = functools.partial(
    _body, config=c, lay=lay, capacity=capacity, bound=bound, transport=transport, slots=slots
  )
  specs = (tok, tok, tok, tok, w_spec(w_gate), w_spec(w_up), w_down_spec)
  fn = jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=(tok,) * 5)
  args = (x, routing.expert_ids, routing.weights, routing.mask, w_gate, w_up, w_down)
  y, kept, load, native, moved = fn(*args)
  used = routing.mask if token_mask is None else routing.mask & (token_mask[:, None] > 0)
  dropped = 1.0 - jnp.sum(kept & used) / jnp.maximum(jnp.sum(used), 1)
  stats = {
    "dropped_fraction": dropped.astype(jnp.float32),
    "device_load": load,
    "native_device_load": native,
    "a2a_bytes": jnp.mean(moved),
  }
  return y, stats


def _platform(mesh) -> str:
  """The platform a mesh (concrete or abstract) targets."""
  abstract = getattr(mesh, "abstract_mesh", mesh)
  device = getattr(abstract, "abstract_device", None)
  return device.platform if device is not None else jax.default_backend()

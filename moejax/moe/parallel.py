"""The MoE layer on a device mesh: expert parallelism (EP), or plain data parallelism.

The experts are split over the mesh axes that the logical axis `expert` maps to (the *EP group*;
`sharding.logical_rules`), each expert's `mlp`-axis leaves over the axes `mlp` maps to (expert tensor
parallelism), the tokens over every other mesh axis. Which parameter goes where is read from the
expert kind's logical axes (`moejax.moe.experts`); nothing here knows an expert's weights.

When the EP group has more than one device, inside one `jax.shard_map` each device

    1. takes its tokens' routing (computed outside, so every router keeps its global semantics),
    2. for a capacity dispatch, keeps the copies that get one of their expert's C rows *in the global
       priority order* (`dispatch.queue_positions`, with the copies other devices put ahead of its
       own: `ep_plan.queue_before`), so it drops exactly the copies one device would drop,
    3. plans which device computes which copies (`ep_plan`: native, or Least-Loaded EP),
    4. sends each copy to the device that computes it (`ep_transport`: padded or ragged all_to_all),
    5. runs the expert kind on what it received (psum over the tensor axes when leaves are split),
    6. sends the results back, and combines each token's K outputs (`dispatch.combine`).

Without an EP group (a data-parallel or tensor-parallel mesh), each device runs the single-device
dispatch (`dispatch.DISPATCHES`) on its own tokens, with the same global keep rule. Outputs and
gradients equal the single-device layer's (tests/moe/test_parallel.py).

Least-Loaded Expert Parallelism (LLEP; Nguyen et al. 2026) is on when `MoEConfig.llep_alpha` is set:
overloaded experts' excess copies travel with those experts' parameters to the least-loaded devices
(`ep_plan.llep_plan`), each hosting at most `llep_slots` foreign ("guest") experts. Results are
exact: the same rows meet the same parameters, only on another device. Every leaf of the expert
kind's pytree travels by `all_to_all` of [n, guests, ...] buffers, and its gradient travels back.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from moejax import sharding
from moejax.moe import ep_plan, ep_transport
from moejax.moe.config import MoEConfig
from moejax.moe.dispatch import (
  DISPATCHES,
  combine,
  dropped_fraction,
  queue_positions,
  rank_in_group,
  with_zero_row,
)
from moejax.moe.ep_plan import llep_plan, native_plan  # noqa: F401  (public re-exports)
from moejax.moe.ep_transport import (  # noqa: F401  (public re-exports)
  EP_TRANSPORTS,
  Traffic,
  a2a,
  choose_transport,
  emulated_ragged_all_to_all,
)
from moejax.moe.experts import BoundExperts, expert_kind
from moejax.moe.router import Routing


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


def param_spec(axes: tuple[str | None, ...], lay: EPLayout) -> P:
  """The shard_map spec of an expert leaf from its logical axes: `expert` over the EP group, `mlp`
  over the tensor axes, everything else whole."""
  to_mesh = {"expert": lay.expert_axes, "mlp": lay.tensor_axes}
  return P(*[to_mesh.get(a) for a in axes])


def _splits_mlp(param_axes: dict[str, tuple]) -> bool:
  return any("mlp" in axes for axes in param_axes.values())


def num_guests(config: MoEConfig, lay: EPLayout) -> int:
  """Guest experts per device: 0 when LLEP is off or there is no other device to spill to."""
  return config.llep_slots if config.llep_alpha is not None and lay.ep_size > 1 else 0


llep_slots = num_guests  # the name of earlier versions


def pair_bound(config: MoEConfig, t_local: int, k: int, lay: EPLayout, capacity) -> int:
  """P: the most rows one device can send to one other.

  Each token sends at most one copy per expert, so P = T_local * min(K, experts a device computes),
  and with a capacity C (capacity dispatch, expert choice) at most C per expert.
  """
  el = config.num_experts // lay.ep_size
  guests = num_guests(config, lay)
  bound = t_local * min(k, el + guests)
  if capacity is not None:
    bound = min(bound, (el + guests) * capacity)
  return max(int(bound), 1)


def _keep(routing: Routing, config: MoEConfig, capacity, token_axes):
  """(kept [T_l, K], before [K, E] or None): the used slots that get computed, all of them or
  those within the capacity in the global queue, and the copies other devices put ahead."""
  if capacity is None or not DISPATCHES[config.dispatch].capacity:
    return routing.mask, None
  e = config.num_experts
  keys = jnp.where(routing.mask, routing.expert_ids, e).T  # [K, T_l]
  local = jax.vmap(lambda r: jnp.bincount(r, length=e + 1))(keys)[:, :e]  # [K, E]
  before = ep_plan.queue_before(local, token_axes)
  place = queue_positions(routing.expert_ids, routing.mask, e, before)
  return routing.mask & (place < capacity), before


# ----------------------------------------------------------------------------------------------------
# Per-device bodies.


def _local_body(routing, x, params, *, config, lay, capacity, splits_mlp):
  """No EP group: the single-device dispatch on this device's tokens, keeping copies globally."""
  c = config
  kept, before = _keep(routing, c, capacity, lay.token_axes)
  experts = BoundExperts(expert_kind(c), params, c)
  y, _ = DISPATCHES[c.dispatch].run(
    x, routing, experts, capacity=capacity, token_mask=None, before=before
  )
  if splits_mlp and lay.tensor_axes:
    y = jax.lax.psum(y, lay.tensor_axes)
  load = jnp.sum(kept).astype(jnp.float32)
  return y, kept, load[None], load[None], jnp.zeros((1,), jnp.float32)


def _ep_body(routing, x, params, *, config, lay, capacity, bound, transport, guests, splits_mlp):
  """One device of the EP group: x [T_l, D], routing [T_l, K], its experts' leaves [El, ...]."""
  c = config
  ids, weights = routing.expert_ids, routing.weights
  t, k = ids.shape
  d = x.shape[-1]
  e = c.num_experts
  n = lay.ep_size
  el = e // n
  ns = el + guests  # the experts this device computes: its own, then its guests
  me = jax.lax.axis_index(lay.expert_axes)
  ep = lay.expert_axes
  move = ep_transport.EP_TRANSPORTS[transport]

  kept, _ = _keep(routing, c, capacity, lay.token_axes)  # [T_l, K]
  flat_ids = jnp.where(kept, ids, e).reshape(-1)  # [T_l*K], E where not computed
  local = jnp.bincount(flat_ids, length=e + 1)[:e].astype(jnp.int32)  # [E]
  cnt = jax.lax.all_gather(local, ep)  # [n, E]
  total = cnt.sum(0)
  plan = native_plan(total, n) if not guests else llep_plan(total, n, c.llep_alpha, guests)
  pair = ep_plan.pair_counts(cnt, plan)  # [n_src, E, n_dst]

  # The device and local expert (own, or guest position) that computes each of my copies.
  safe = jnp.minimum(flat_ids, e - 1)
  rank = (jnp.cumsum(cnt, axis=0) - cnt)[me, safe] + rank_in_group(flat_ids, e + 1)  # in expert
  order_e = ep_plan.device_order(e, n)
  hi = jnp.cumsum(jnp.take_along_axis(plan.share, order_e, axis=1), axis=1)  # [E, n]
  dest = order_e[safe, jnp.sum(rank[:, None] >= hi[safe], axis=1).clip(0, n - 1)]
  guest = jnp.argmax(plan.hosted[dest] == safe[:, None], axis=1) if guests else 0
  local_expert = jnp.where(dest == safe // el, safe % el, el + guest)
  used = flat_ids < e
  key = jnp.where(used, dest * ns + local_expert, n * ns)
  order = jnp.argsort(key, stable=True)  # my copies grouped by destination, then local expert
  place = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
  sent = pair[me].sum(0)  # [n_dst]
  copies = with_zero_row(x)[jnp.where(used[order], order // k, t)]  # [T_l*K, D] grouped

  # What I receive, per source and local expert, from the shared plan.
  own = pair[:, me * el + jnp.arange(el), me]  # [n_src, El]
  hosted = plan.hosted[me]  # [guests]
  guest_cnt = jnp.where(hosted >= 0, pair[:, jnp.maximum(hosted, 0), me], 0)  # [n_src, guests]
  per_expert = jnp.concatenate([own, guest_cnt], axis=1)  # [n_src, El+guests]
  traffic = Traffic(
    axes=ep,
    me=me,
    bound=bound,
    sent=sent,
    start=jnp.cumsum(sent) - sent,
    recv=per_expert.sum(1),
    pairs=pair.sum(1),
  )
  got, src, src_place = move.send(copies, traffic)  # [n*P, D]

  # Compute: group the received rows by local expert and run the expert kind.
  row_expert = _local_experts(src, src_place, per_expert, ns)
  by_expert = jnp.argsort(row_expert, stable=True)
  group_sizes = per_expert.sum(0).astype(jnp.int32)  # [El+guests]
  if guests:
    params = jax.tree.map(
      lambda w: jnp.concatenate([w, _fetch(w, plan.hosted, me, el, ep)]), params
    )
  out = expert_kind(c).apply(params, got[by_expert], group_sizes, c)  # [n*P, D]
  if splits_mlp and lay.tensor_axes:
    out = jax.lax.psum(out, lay.tensor_axes)
  out = jnp.zeros_like(out).at[by_expert].set(out)  # back to arrival order

  # Return the results and combine.
  back, row = move.back(out, traffic, t * k, dest, place)
  row = jnp.where(used, row, back.shape[0])
  y = combine(with_zero_row(back)[row].reshape(t, k, d), jnp.where(kept, weights, 0.0), x.dtype)

  # Metrics of this device: copies computed (with and without LLEP), bytes it sends.
  load = plan.share.sum(0)[me].astype(jnp.float32)
  native = total.reshape(n, el).sum(1)[me].astype(jnp.float32)
  item = jnp.dtype(x.dtype).itemsize
  moved = move.bytes(traffic, d * item)
  if guests:
    per_guest = sum(w[0].size * jnp.dtype(w.dtype).itemsize for w in jax.tree.leaves(params))
    moved = moved + jnp.float32(guests * (n - 1) * per_guest)
  return y, kept, load[None], native[None], moved[None]


def _local_experts(src, place, per_expert, sentinel):
  """The local expert of each received row, from its source and place in that source's chunk."""
  cum = jnp.cumsum(per_expert, axis=1)  # [n, El+guests]
  s = jnp.minimum(src, per_expert.shape[0] - 1)
  valid = (src < per_expert.shape[0]) & (place < cum[s, -1])
  expert = jnp.sum(place[:, None] >= cum[s], axis=1)
  return jnp.where(valid, expert, sentinel)


def _fetch(w, hosted, me, el, ep):
  """The leaf `w` of the guest experts I host [guests, ...], sent by their owners (LLEP)."""
  owner = jnp.where(hosted >= 0, hosted // el, -1)  # [n, guests]
  mine = owner == me  # guest positions I must fill on each device
  index = jnp.maximum(hosted, 0) % el
  send = jnp.where(mine.reshape(*mine.shape, *([1] * (w.ndim - 1))), w[index], 0)  # [n, g, ...]
  got = a2a(send, ep)  # [n_owner, guests, ...]
  return got.sum(0)  # only the true owner sent non-zeros


# ----------------------------------------------------------------------------------------------------
# Entry point.


def sharded_moe(
  x: jax.Array,
  routing: Routing,
  params: dict[str, jax.Array],
  param_axes: dict[str, tuple[str | None, ...]],
  config: MoEConfig,
  mesh,
  *,
  capacity: int | None = None,
  token_mask: jax.Array | None = None,
  rules=None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The MoE layer's dispatch -> experts -> combine over `mesh` (an abstract or concrete mesh).

  x [T, D]; routing over all T tokens; `params` the expert kind's leaves [E, ...] in the compute
  dtype, `param_axes` their logical axes; `capacity` C for capacity dispatch (and expert choice);
  `token_mask` [T] (1 = real) only scopes `dropped_fraction` to real tokens, as in
  `dispatch.capacity`. Returns y [T, D] and stats: `dropped_fraction`; `device_load` [devices]
  token copies computed by each device (devices in the order of the token axes; devices that differ
  only in tensor axes compute the same copies and appear once); `native_device_load` [devices] the
  same without LLEP; `a2a_bytes` the bytes a device sends per forward pass through the all_to_alls
  (mean over devices).
  """
  c = config
  t, _ = x.shape
  lay = layout(mesh, c, t, rules)
  t_local = t // lay.token_shards
  k = routing.expert_ids.shape[1]
  splits_mlp = _splits_mlp(param_axes)
  tok = P(lay.token_axes)
  if lay.ep_size > 1:
    transport = choose_transport(c.ep_transport, _platform(mesh))
    body = functools.partial(
      _ep_body,
      config=c,
      lay=lay,
      capacity=capacity,
      bound=pair_bound(c, t_local, k, lay, capacity),
      transport=transport,
      guests=num_guests(c, lay),
      splits_mlp=splits_mlp,
    )
  else:
    body = functools.partial(
      _local_body, config=c, lay=lay, capacity=capacity, splits_mlp=splits_mlp
    )
  # The routing travels without its logits (no step reads them); probs give dispatch E.
  local = routing.replace(logits=routing.probs)
  specs = (
    jax.tree.map(lambda _: tok, local),
    tok,
    {name: param_spec(param_axes[name], lay) for name in params},
  )
  fn = jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=(tok,) * 5)
  y, kept, load, native, moved = fn(local, x, params)
  stats = {
    "dropped_fraction": dropped_fraction(kept, routing.mask, token_mask),
    "device_load": load,
    "native_device_load": native,
    "a2a_bytes": jnp.mean(moved),
  }
  return y, stats


def expert_parallel(
  x: jax.Array,
  routing: Routing,
  weights: tuple[jax.Array | None, jax.Array, jax.Array],
  config: MoEConfig,
  mesh,
  **kwargs,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """`sharded_moe` for the FFN kinds, with weights (w_gate or None, w_up [E, D, F], w_down)."""
  names = ("w_gate", "w_up", "w_down")
  params = {n: w for n, w in zip(names, weights, strict=True) if w is not None}
  axes = {
    n: ("expert", "mlp", "embed") if n == "w_down" else ("expert", "embed", "mlp") for n in params
  }
  return sharded_moe(x, routing, params, axes, config, mesh, **kwargs)


def _platform(mesh) -> str:
  """The platform a mesh (concrete or abstract) targets."""
  abstract = getattr(mesh, "abstract_mesh", mesh)
  device = getattr(abstract, "abstract_device", None)
  return device.platform if device is not None else jax.default_backend()

"""Expert parallelism's transports: how token copies reach the devices that compute them, and back.

A transport is an entry of `EP_TRANSPORTS` (`MoEConfig.ep_transport`):

- `padded`: `all_to_all` of fixed-size buffers [n, P, D] (n devices in the EP group). Dropless stays
  dropless because P is the worst case one device can send to one other (moe/parallel.py's
  `pair_bound`). The buffers hold n * P rows where a balanced routing needs T_local * K: up to n
  times the memory of the copies actually moved, both ways and kept for the backward pass. It runs
  everywhere, and it is the only transport XLA:CPU compiles.
- `ragged`: `ragged_all_to_all` sends exactly the routed rows (TPU/GPU). The receive buffer still has
  the static worst case n * P rows; only the bytes on the wire shrink.
- `auto`: `ragged` on accelerators, `padded` on CPU (decided by the mesh's platform); logged once.

Each transport has `send` (my copies, grouped by destination, to their devices: the received rows
[n * P, D] with each row's source device and place in that source's chunk), `back` (the results to
the devices their copies came from: an array and, for each of my copies, its row in it) and `bytes`
(what one device sends in a forward pass).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from absl import logging

# The collective the ragged transport calls; tests swap in `emulated_ragged_all_to_all` to run the
# ragged index arithmetic on CPU, where XLA cannot compile the real one.
ragged_all_to_all = jax.lax.ragged_all_to_all

_logged: set[tuple[str, str]] = set()


class Traffic(NamedTuple):
  """Who sends how many rows to whom, as seen by one device (`me`) of the EP group `axes`."""

  axes: tuple[str, ...]  # the EP group's mesh axes
  me: jax.Array  # [] my index in the group
  bound: int  # P: the most rows one device sends to one other
  sent: jax.Array  # [n] rows I send to each device
  start: jax.Array  # [n] where my rows for each device start among my copies grouped by destination
  recv: jax.Array  # [n] rows I receive from each device
  pairs: jax.Array  # [n_src, n_dst] rows every device sends to every other


def a2a(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
  """Non-tiled all_to_all over the EP axes: row d of x goes to device d; row s of the result came
  from device s. The identity when the group has no axes."""
  return jax.lax.all_to_all(x, axes, 0, 0) if axes else x


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


def _ragged(operand, output, in_off, send, out_off, recv, axes, bound):
  if ragged_all_to_all is emulated_ragged_all_to_all:
    return emulated_ragged_all_to_all(
      operand, output, in_off, send, out_off, recv, axis_name=axes, max_rows=bound
    )
  return ragged_all_to_all(operand, output, in_off, send, out_off, recv, axis_name=axes)


# ----------------------------------------------------------------------------------------------------
# padded


def _padded_send(copies, tr: Traffic):
  n, p = tr.sent.shape[0], tr.bound
  q = tr.start[:, None] + jnp.arange(p)  # [n, P]
  valid = jnp.arange(p) < tr.sent[:, None]
  buf = jnp.where(valid[..., None], copies[jnp.clip(q, 0, copies.shape[0] - 1)], 0)  # [n, P, D]
  got = a2a(buf, tr.axes).reshape(n * p, -1)  # [n*P, D]
  rows = jnp.arange(n * p)
  return got, rows // p, rows % p


def _padded_back(out, tr: Traffic, num_copies, dest, place):
  n, p = tr.sent.shape[0], tr.bound
  back = a2a(out.reshape(n, p, -1), tr.axes).reshape(n * p, -1)
  return back, dest * p + place - tr.start[dest]


def _padded_bytes(tr: Traffic, width_bytes: int) -> jax.Array:
  n = tr.sent.shape[0]
  return jnp.full((), 2 * (n - 1) * tr.bound * width_bytes, jnp.float32)  # self-sends excluded


# ----------------------------------------------------------------------------------------------------
# ragged


def _ragged_send(copies, tr: Traffic):
  n, p = tr.sent.shape[0], tr.bound
  recv_start = jnp.cumsum(tr.recv) - tr.recv
  out_off = (jnp.cumsum(tr.pairs, axis=0) - tr.pairs)[tr.me]  # where my chunk lands on each device
  empty = jnp.zeros((n * p, copies.shape[-1]), copies.dtype)
  got = _ragged(copies, empty, tr.start, tr.sent, out_off, tr.recv, tr.axes, p)
  rows = jnp.arange(n * p)
  src = jnp.sum(rows[:, None] >= jnp.cumsum(tr.recv)[None], axis=1)
  place = rows - jnp.concatenate([recv_start, jnp.zeros((1,), tr.recv.dtype)])[src]
  return got, src, place


def _ragged_back(out, tr: Traffic, num_copies, dest, place):
  del dest  # the results land where the copies left: in my grouped order
  recv_start = jnp.cumsum(tr.recv) - tr.recv
  out_off = (jnp.cumsum(tr.pairs, axis=1) - tr.pairs)[:, tr.me]  # where my results land on each
  empty = jnp.zeros((num_copies, out.shape[-1]), out.dtype)
  back = _ragged(out, empty, recv_start, tr.recv, out_off, tr.sent, tr.axes, tr.bound)
  return back, place


def _ragged_bytes(tr: Traffic, width_bytes: int) -> jax.Array:
  return 2.0 * (tr.sent.sum() - tr.sent[tr.me]).astype(jnp.float32) * width_bytes


@dataclasses.dataclass(frozen=True)
class Transport:
  """A registered transport; see the module docstring.

  send(copies [N, D] grouped by destination, traffic) -> (received [n*P, D], source [n*P],
    place [n*P]) where place is the row's index within its source's chunk;
  back(out [n*P, D] in arrival order, traffic, N, dest [N], place [N]) -> (returned [R, D],
    row [N]): where each of my copies' results arrived (place: the copy's index among my copies
    grouped by destination);
  bytes(traffic, bytes per row) -> what one device sends in a forward pass.
  """

  send: Callable
  back: Callable
  bytes: Callable
  cpu: bool  # XLA:CPU compiles it


EP_TRANSPORTS: dict[str, Transport | None] = {
  "auto": None,  # resolved by `choose_transport`
  "padded": Transport(_padded_send, _padded_back, _padded_bytes, cpu=True),
  "ragged": Transport(_ragged_send, _ragged_back, _ragged_bytes, cpu=False),
}


def choose_transport(requested: str, platform: str) -> str:
  """`auto` -> `ragged` on accelerators, `padded` on CPU (whose XLA cannot compile ragged)."""
  if requested not in EP_TRANSPORTS:
    raise ValueError(
      f"MoEConfig.ep_transport={requested!r} is invalid: one of {tuple(EP_TRANSPORTS)}"
    )
  chosen = requested if requested != "auto" else ("padded" if platform == "cpu" else "ragged")
  if (requested, chosen) not in _logged:
    _logged.add((requested, chosen))
    logging.info(
      "expert parallelism: %s transport on %s (requested %s)", chosen, platform, requested
    )
  return chosen

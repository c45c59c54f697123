"""Helpers that several grouped-matmul backends and `ops.py` share.

Shape and group-size checks of the public entry points, the `shard_map` typing helpers that a
custom VJP and a host callback need, and the group bounds a host kernel walks. Backends import
from here, never from one another.
"""

import jax
import jax.numpy as jnp
import numpy as np


def varying_axes(*arrays) -> tuple[str, ...]:
  """The `shard_map` mesh axes over which any of `arrays` varies; () outside `shard_map`.

  Inside `shard_map`, JAX types every value with the manual axes it varies over. A custom VJP's
  cotangents and a host callback's results must keep the type their inputs started with.
  """
  axes = set()
  for x in arrays:
    aval = jax.typeof(x)
    manual = getattr(aval, "manual_axis_type", None)  # jax 0.10; earlier versions call it `vma`
    axes |= set(manual.varying if manual is not None else getattr(aval, "vma", ()))
  return tuple(sorted(axes))


def to_common_varying_axes(*arrays) -> list[jax.Array]:
  """Inside `shard_map`, casts the arrays to vary over the union of their manual axes.

  A custom VJP must return cotangents typed like its inputs. If rhs is replicated over an axis
  that lhs varies over, d rhs computed per shard varies too; casting rhs to varying *before* the
  op makes JAX transpose that cast into the psum that d rhs needs. No-op outside `shard_map`.
  """
  axes = set(varying_axes(*arrays))
  return [
    jax.lax.pcast(x, tuple(sorted(axes - set(varying_axes(x)))), to="varying") for x in arrays
  ]


def check_group_sizes(fn: str, group_sizes, num_groups: int | None) -> jax.Array:
  """Checks group_sizes is `[E]` integers (E = num_groups when given); returns it as int32."""
  group_sizes = jnp.asarray(group_sizes)
  if group_sizes.ndim != 1 or (num_groups is not None and group_sizes.shape[0] != num_groups):
    expected = "[E]" if num_groups is None else f"[E]=({num_groups},)"
    raise ValueError(f"{fn}: group_sizes must have shape {expected}, got {group_sizes.shape}.")
  if not jnp.issubdtype(group_sizes.dtype, jnp.integer):
    raise ValueError(f"{fn}: group_sizes must be integers, got dtype {group_sizes.dtype}.")
  return group_sizes.astype(jnp.int32)


def check_lhs(fn: str, lhs: jax.Array) -> None:
  """Checks lhs is `[M, D]`."""
  if lhs.ndim != 2:
    raise ValueError(f"{fn}: lhs must be [M, D], got shape {lhs.shape}.")


def check_rhss(fn: str, lhs: jax.Array, rhss: tuple[jax.Array, ...]) -> None:
  """Checks every rhs is `[E, D, F_i]` with lhs's D and the first rhs's E."""
  if len(rhss) == 1:
    (rhs,) = rhss
    if rhs.ndim != 3:
      raise ValueError(f"{fn}: rhs must be [E, D, F], got shape {rhs.shape}.")
    if lhs.shape[1] != rhs.shape[1]:
      raise ValueError(f"{fn}: lhs [M, D]={lhs.shape} and rhs [E, D, F]={rhs.shape} disagree on D.")
    return
  for i, w in enumerate(rhss):
    if w.ndim != 3 or w.shape[:2] != (rhss[0].shape[0], lhs.shape[1]):
      raise ValueError(
        f"{fn}: rhss[{i}] must be [E, D, F] with E={rhss[0].shape[0]} and lhs's "
        f"D={lhs.shape[1]}, got shape {w.shape}."
      )


def group_bounds(group_sizes, num_rows: int) -> tuple[np.ndarray, np.ndarray, int]:
  """On the host: ([E] first row, [E] one-past-last row, rows routed) of the groups, clipped to
  `num_rows`; a group has rows where end > start."""
  ends = np.minimum(np.cumsum(np.asarray(group_sizes), dtype=np.int64), num_rows)
  return np.concatenate([[0], ends[:-1]]), ends, int(ends[-1]) if ends.size else 0

"""Grouped matmul for XLA:CPU in XLA's own ops, proportional to the rows routed.

`auto` on CPU picks the `blas` backend (the same per-group loop handed to the host's BLAS through a
buffer callback), which is faster; this one stays for programs that must not call back into Python
(e.g. an exported or serialised computation) and as a second implementation to test against.

XLA:CPU lowers `ragged_dot` to a dense dot over all E groups (E times the FLOPs), and a loop over a
static worst-case number of row blocks pays for blocks that are empty. This backend loops only over
work that exists, with trip counts computed from `group_sizes` at run time:

    for each group e that has rows (a `fori_loop` over the ids of the non-empty groups):
      w = rhs[e]                                        # [D, F], sliced once per group
      for each tile of the group's rows (`fori_loop`s with traced trip counts):
        x = lhs[at : at + block]                        # [block, D], one dynamic_slice
        out[rows of the tile] = (x @ w)[rows of the tile]

Tiles. A group's first tile is the smallest of `head_m` (16, 24, 32, 48, ..., 512 rows, steps of a
quarter to a third) that holds the group; a group larger than that continues with `block_m` tiles
(256, 128, 64, 32, 16), split greedily so that fewer than 16 rows are padding. So most groups are
one dot with little padding: one dot per group matters for tgmm (below), and for gmm one tile of 80
rows is faster than 64 + 16 (a 16-row dot runs at a fraction of the speed of a large one). gmm
runs each head size as a `fori_loop` with a traced trip count of 0 or 1, tgmm picks it with one
`lax.switch` (see `_head_tile`); each `block_m` size is a `fori_loop`.

Tiles are aligned to their group, not to a global grid. A tile near the end of the array is shifted
back to stay inside it (`dynamic_slice` would clamp it anyway), and a row mask keeps exactly the
rows the tile is responsible for; the update is a select, not an add, so rows of other groups
inside the window keep their values. Every row of a group is written exactly once; rows at or past
sum(group_sizes) are never written and stay zero.

tgmm (the weight gradient) uses the same tiles and sums `x^T @ grad_tile` (rows outside the tile
zeroed) into one `[D, F]` float32 buffer per group, written once into `[E, D, F]`. The first tile
sets the buffer (no zero fill, no add) and the buffer is reused from group to group. No full-size
weight gradient is materialised per tile, which is what plain autodiff through a loop that indexes
`rhs[e]` would do; `ops.py` instead wraps these kernels in a custom VJP:

    d lhs = gmm(d out, rhs, transpose_rhs=True)      d rhs = tgmm(lhs, d out)

Measured on 2 cores (M=8192, D=512, F=1024, ms): at E=128, gmm 99 and tgmm 195 against 114 and
244 with the earlier tiling (one tile of the smallest size at or above the remainder, sizes
256..16, and a zero-filled accumulator per group); a dense matmul of the same FLOPs takes 75.
What is left at large E is mostly writing the [E, D, F] gradient: its zero fill (empty groups must
read as zero) and one [D, F] store per group.

The loops are sequential; each matmul is an ordinary XLA dot that uses the host's threads. Nothing
depends on the device count, so the kernels run unchanged inside `shard_map`.
"""

import jax
import jax.numpy as jnp
from jax import lax

# Tile sizes in rows (see the module docstring). A group's first tile is the smallest head size
# that holds it (up to 512 rows); the rest of a larger group is split greedily into `block_m`
# tiles, largest first. Chosen by timing M=8192, D=512, F=1024, top-2 routing with E = 8 to 256 on
# a 2-core machine: every tgmm tile after a group's first re-reads and re-writes its [D, F] sum
# (2 MB here), and small dots run slowly, so one tile per group matters more than padding; head
# sizes a quarter to a third apart keep the padding under a third.
DEFAULT_BLOCK_M = (256, 128, 64, 32, 16)
DEFAULT_HEAD_M = (16, 24, 32, 48, 64, 80, 96, 128, 160, 192, 256, 320, 384, 512)


def _block_sizes(block_m: int | tuple[int, ...], num_rows: int) -> tuple[int, ...]:
  """The tile sizes to use for `num_rows` rows: distinct, largest first, none above M.

  A size equal to M is dropped when a smaller one exists. Its window would always be the whole
  array, so its dot would not depend on the tile index, and XLA hoists such loop-invariant work
  out of the tile loop, where it then runs once per group even though that loop almost never
  runs (measured: 7x slower at M=256, E=128).
  """
  sizes = (block_m,) if isinstance(block_m, int) else tuple(block_m)
  if not sizes or any(not isinstance(b, int) or b < 1 for b in sizes):
    raise ValueError(f"block_m must be a positive int or a tuple of them, got {block_m!r}.")
  sizes = sorted({min(b, num_rows) for b in sizes}, reverse=True)
  if len(sizes) > 1 and sizes[0] == num_rows:
    sizes = sizes[1:]
  return tuple(sizes)


def varying_axes(*arrays) -> tuple[str, ...]:
  """The `shard_map` mesh axes over which any of `arrays` varies; () outside `shard_map`.

  Inside `shard_map`, JAX types every value with the manual axes it varies over. A loop's carry
  and a custom VJP's cotangents must keep the type they started with.
  """
  axes = set()
  for x in arrays:
    aval = jax.typeof(x)
    manual = getattr(aval, "manual_axis_type", None)  # jax 0.10; earlier versions call it `vma`
    axes |= set(manual.varying if manual is not None else getattr(aval, "vma", ()))
  return tuple(sorted(axes))


def _zeros(shape, dtype, *like) -> jax.Array:
  """Zeros typed to vary over the `shard_map` axes of `like` (a loop carry must match the body).

  A fresh `jnp.zeros` varies over nothing, while the loop body's result varies with its inputs;
  `pcast` changes only the type (no data moves) and is a no-op outside `shard_map`.
  """
  return lax.pcast(jnp.zeros(shape, dtype), varying_axes(*like), to="varying")


def _for_each_group(group_sizes, body, carry):
  """Runs `carry = body(e, start, end, carry)` for each group e that has rows, in order.

  The loop runs over the ids of the non-empty groups (a traced trip count), so an empty group
  costs nothing: not even the slice of its weight matrix.
  """
  sizes = group_sizes.astype(jnp.int32)  # [E]
  ends = jnp.cumsum(sizes)  # [E]
  starts = ends - sizes  # [E]
  has_rows = sizes > 0  # [E]
  (ids,) = jnp.nonzero(has_rows, size=sizes.shape[0], fill_value=0)  # [E], non-empty groups first

  def one_group(i, carry):
    e = ids[i]
    return body(e, starts[e], ends[e], carry)

  return lax.fori_loop(0, jnp.sum(has_rows), one_group, carry)


def _window(lo, block, end, num_rows):
  """(at, keep) of the tile covering rows [lo, min(lo + block, end)): its `[block, ...]` window
  starts at `at`, shifted back to `min(lo, num_rows - block)` so that it lies inside the array
  (`dynamic_slice` would clamp it the same way, silently), and `keep` [block] marks the window rows
  the tile is responsible for."""
  at = jnp.minimum(lo, num_rows - block)
  rows = at + jnp.arange(block, dtype=at.dtype)  # [block]
  return at, (rows >= lo) & (rows < jnp.minimum(lo + block, end))


def _for_each_tile(start, end, block_sizes, num_rows, body, carry):
  """Runs `carry = body(at, keep, block, carry)` for the tiles covering rows [start, end).

  The group's row count, rounded up to a multiple of the smallest size, is split greedily into
  tiles, largest size first: as many tiles of each size as fit in what is left, and the smallest
  size covers the rest. With the default sizes (256, 128, 64, 32, 16) a group of 600 rows gets
  tiles of 256 + 256 + 64 + 32 rows (8 of them padding): fewer than 16 padded rows per group,
  whatever its size. Each size gets its own `fori_loop` with a traced trip count.

  `at` and `keep` are the tile's window start and row mask (see `_window`).
  """
  smallest = block_sizes[-1]
  left = (jnp.maximum(end - start, 0) + smallest - 1) // smallest * smallest  # rows, padded
  lo = start
  for block in block_sizes:
    # The smallest size takes what is left (the sizes need not divide each other).
    num_tiles = left // block if block != smallest else (left + block - 1) // block
    left = left - num_tiles * block

    def one_tile(tile, carry, base=lo, block=block):
      return body(*_window(base + tile * block, block, end, num_rows), block, carry)

    carry = lax.fori_loop(0, num_tiles, one_tile, carry)
    lo = lo + num_tiles * block
  return carry


def _head_tile(start, end, head_sizes, num_rows, body, carry, *, switch: bool):
  """Runs `carry = body(at, keep, block, carry)` once, for the group's first tile: the smallest
  of `head_sizes` (ascending) that holds the group's rows [start, end), or the largest if none
  does. Returns (carry, first row after the tile's share).

  `switch=True` picks the size with one `lax.switch`; otherwise each size is a `fori_loop` with a
  trip count of 0 or 1. A conditional passes its carry in and out by copy, so it suits a small
  carry (tgmm's [D, F] sum: 10% faster at E=128, saving the per-size scalar ops and loop
  launches), while a loop updates a large carry (gmm's [M, F] output) in place; switching that
  one measured 7x slower.
  """
  n = end - start
  covered = jnp.minimum(n, head_sizes[-1])

  def tile(lo, block, carry):
    return body(*_window(lo, block, end, num_rows), block, carry)

  if switch:
    level = sum((covered > size).astype(jnp.int32) for size in head_sizes[:-1])
    branches = [lambda carry, block=block: tile(start, block, carry) for block in head_sizes]
    return lax.switch(level, branches, carry), start + covered
  smaller = 0
  for block in head_sizes:
    runs = ((covered > smaller) & (covered <= block)).astype(n.dtype)
    # i is always 0, but the window must depend on it: work that does not depend on the loop
    # index is hoisted out of the loop by XLA and then runs even when the loop does not.
    carry = lax.fori_loop(
      0, runs, lambda i, c, block=block: tile(start + i * block, block, c), carry
    )
    smaller = block
  return carry, start + covered


def gmm(
  lhs: jax.Array,
  rhs: jax.Array,
  group_sizes: jax.Array,
  *,
  transpose_rhs: bool = False,
  preferred_element_type=None,
  interpret: bool = False,
  block_m: int | tuple[int, ...] = DEFAULT_BLOCK_M,
  head_m: tuple[int, ...] = DEFAULT_HEAD_M,
) -> jax.Array:
  """Grouped matmul `[M, D] x [E, D, F] -> [M, F]` looping over the row tiles that exist.

  Not differentiable by itself (`fori_loop` with a traced trip count); `ops.gmm` adds the VJP.

  Args:
    lhs: `[M, D]` rows sorted by group.
    rhs: `[E, D, F]` (or `[E, F, D]` with `transpose_rhs`, then each group uses `rhs[e].T`).
    group_sizes: `[E]` integer group sizes, sum <= M.
    transpose_rhs: contract with `rhs[e].T` (the lhs gradient needs this; no transposed copy of rhs
      is made).
    preferred_element_type: output dtype (default: lhs dtype); accumulation is in at least float32.
    interpret: ignored (no Pallas kernel here); accepted for a uniform backend signature.
    block_m: tile sizes in rows for the rows past a group's first tile (an int for one size).
    head_m: sizes for a group's first tile; see the module docstring.

  Returns:
    `[M, F]`; rows at or past sum(group_sizes) are zero.
  """
  del interpret
  num_rows = lhs.shape[0]
  out_dim = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  out_dtype = preferred_element_type or lhs.dtype
  out = _zeros((num_rows, out_dim), out_dtype, lhs, rhs, group_sizes)  # [M, F]
  if num_rows == 0:
    return out
  block_sizes = _block_sizes(block_m, num_rows)
  head_sizes = _block_sizes(head_m, num_rows)[::-1]  # ascending
  dtype = jnp.result_type(lhs, rhs)
  acc_dtype = jnp.promote_types(out_dtype, jnp.float32)
  lhs, rhs = lhs.astype(dtype), rhs.astype(dtype)
  # Contract lhs's D with w's D: axis 0 of [D, F], or axis 1 of [F, D] when transposed.
  dims = (((1,), (1 if transpose_rhs else 0,)), ((), ()))

  def one_group(e, start, end, out):
    w = lax.dynamic_index_in_dim(rhs, e, keepdims=False)  # [D, F] (or [F, D])

    def one_tile(at, keep, block, out):
      x = lax.dynamic_slice_in_dim(lhs, at, block)  # [block, D]
      y = lax.dot_general(x, w, dims, preferred_element_type=acc_dtype)  # [block, F]
      old = lax.dynamic_slice_in_dim(out, at, block)  # [block, F]
      new = jnp.where(keep[:, None], y.astype(out_dtype), old)
      return lax.dynamic_update_slice_in_dim(out, new, at, axis=0)

    out, rest = _head_tile(start, end, head_sizes, num_rows, one_tile, out, switch=False)
    return _for_each_tile(rest, end, block_sizes, num_rows, one_tile, out)

  return _for_each_group(group_sizes, one_group, out)


def tgmm(
  lhs: jax.Array,
  grad: jax.Array,
  group_sizes: jax.Array,
  *,
  preferred_element_type=None,
  interpret: bool = False,
  block_m: int | tuple[int, ...] = DEFAULT_BLOCK_M,
  head_m: tuple[int, ...] = DEFAULT_HEAD_M,
) -> jax.Array:
  """Per-group `lhs_e^T @ grad_e -> [E, D, F]`, looping over the row tiles that exist.

  Not differentiable by itself; `ops.tgmm` adds the VJP.

  Args:
    lhs: `[M, D]` rows sorted by group.
    grad: `[M, F]` rows in the same order.
    group_sizes: `[E]` integer group sizes, sum <= M. Rows past the total are ignored.
    preferred_element_type: output dtype (default: the promoted input dtype); accumulation is in at
      least float32.
    interpret: ignored; accepted for a uniform backend signature.
    block_m: tile sizes in rows for the rows past a group's first tile (an int for one size).
    head_m: sizes for a group's first tile; see the module docstring.

  Returns:
    `[E, D, F]`; a group with no rows gets zeros.
  """
  del interpret
  num_rows, lhs_dim = lhs.shape
  out_dim = grad.shape[1]
  num_groups = group_sizes.shape[0]
  dtype = jnp.result_type(lhs, grad)
  out_dtype = preferred_element_type or dtype
  if num_rows == 0:
    return jnp.zeros((num_groups, lhs_dim, out_dim), out_dtype)
  block_sizes = _block_sizes(block_m, num_rows)
  head_sizes = _block_sizes(head_m, num_rows)[::-1]  # ascending
  acc_dtype = jnp.promote_types(out_dtype, jnp.float32)
  lhs, grad = lhs.astype(dtype), grad.astype(dtype)
  zero = jnp.zeros((), dtype)

  def tile_product(at, keep, block):
    # Rows of other groups must contribute exactly 0. Masking both operands (not one) keeps a
    # non-finite value in a row past the groups (0 * inf = nan) out of the sum.
    x = jnp.where(keep[:, None], lax.dynamic_slice_in_dim(lhs, at, block), zero)  # [block, D]
    g = jnp.where(keep[:, None], lax.dynamic_slice_in_dim(grad, at, block), zero)  # [block, F]
    # Contract over the tile's rows: [block, D]^T @ [block, F].
    return lax.dot_general(x, g, (((0,), (0,)), ((), ())), preferred_element_type=acc_dtype)

  def one_group(e, start, end, carry):
    # The tiles carry the group's [D, F] float32 sum, not the [E, D, F] output (the head's
    # conditional would copy a large carry). The first tile sets the sum, later tiles
    # (groups past the largest head size) add to it, and out[e] is written once. The sum's buffer
    # is reused from group to group (the first tile overwrites it), so it is never zero-filled.
    out, acc = carry

    def head(at, keep, block, acc):
      del acc
      return tile_product(at, keep, block)

    def tail(at, keep, block, acc):
      return acc + tile_product(at, keep, block)

    acc, rest = _head_tile(start, end, head_sizes, num_rows, head, acc, switch=True)
    acc = _for_each_tile(rest, end, block_sizes, num_rows, tail, acc)
    return lax.dynamic_update_index_in_dim(out, acc.astype(out_dtype), e, axis=0), acc

  out = _zeros((num_groups, lhs_dim, out_dim), out_dtype, lhs, grad, group_sizes)  # [E, D, F]
  acc = _zeros((lhs_dim, out_dim), acc_dtype, lhs, grad, group_sizes)  # [D, F]
  return _for_each_group(group_sizes, one_group, (out, acc))[0]

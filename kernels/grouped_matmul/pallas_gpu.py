"""Grouped matmul on GPU in Pallas (Triton flavour): `gmm` and its weight gradient `tgmm`.

Targets any CUDA GPU that Triton compiles for (Ampere and Hopper in practice): the kernels are
`pallas_call`s with `jax.experimental.pallas.triton.CompilerParams`, so they lower through Triton,
which wants power-of-two blocks (each at least 16 for `tl.dot`) and a static grid. Verified on a
CPU host only: exact in interpret mode (`interpret=True`) and lowering for `cuda`; not compiled or
timed on a GPU.

gmm, `[M, K] x [E, K, N] -> [M, N]` (K = D, N = F in `ops`' names; with `transpose_rhs` rhs is
`[E, N, K]`). The grid is static, `(M / bm, N / bn)` after padding: one program per output tile.
Group metadata is computed outside the kernel with jnp: every row's local group id (`-1` for rows
at or past sum(group_sizes) and rows of groups outside this shard's) and, per row tile, the first
and last group it holds. A tile loops over its groups (one for most tiles; a tile straddling a
boundary runs once per group, as megablox visits it once per group) and per group over K in `bk`
chunks with a float32 accumulator, then keeps that group's rows with a select. Each program owns
its tile and writes all of it (no read-modify-write of a tile other programs touch, no masked
store), so tiles never race and rows in no group come out exactly zero even when `lhs` holds NaN
there. Work is at most `M / bm + E - 1` tile products per column tile, as in megablox.

tgmm, `[M, K], [M, N] -> [E, K, N]` (the weight gradient). The grid is `(E, K / bk, N / bn)`: one
program per group and output tile, looping over the row tiles that hold the group's rows
(`[start, end)` from the cumulative sizes, clipped to M) and masking, with a select on both
operands, the rows of other groups. An empty group loops zero times and writes zeros; no program
indexes a row outside `[0, M)` (tokamax's Triton tgmm reads the 32 rows before an empty group).

M, K and N are padded with zeros to the blocks inside the op (never truncated); the padding costs
one copy of an operand when a dimension is not a multiple of its block and nothing otherwise.

`group_offset` (expert parallelism): `group_sizes` holds the sizes of all groups and `rhs` the
weights of `rhs.shape[0]` consecutive groups starting at `group_offset` (an int or a traced
scalar); rows of the other groups are zero in gmm's output, and tgmm returns the local groups'
gradients. `ops` calls the kernels with `group_offset=0`.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from moejax.kernels.grouped_matmul import ops
from moejax.kernels.grouped_matmul.common import to_common_varying_axes

# Defaults for a Hopper/Ampere-class GPU and the Mixtral-like shapes of the lowering test (not
# tuned on hardware: nothing here measures speed). bm/bn are the output tile, bk the K chunk.
OPTIONS = {"bm": 128, "bk": 64, "bn": 128, "num_warps": 4, "num_stages": 3, "interpret": False}


def _check_options(fn: str, bm, bk, bn, num_warps, num_stages, interpret) -> None:
  """ValueError naming the option, its value and what is allowed."""
  where = f"pallas_gpu {fn}: option"
  for name, value in (("bm", bm), ("bk", bk), ("bn", bn)):
    if not isinstance(value, int) or value < 16 or value & (value - 1):
      raise ValueError(f"{where} {name}={value!r}; allowed: a power of two >= 16 (Triton blocks).")
  for name, value in (("num_warps", num_warps), ("num_stages", num_stages)):
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"{where} {name}={value!r}; allowed: an int >= 1.")
  if not isinstance(interpret, bool):
    raise ValueError(f"{where} interpret={interpret!r}; allowed: True or False.")


def _check_group_offset(fn: str, group_offset, num_local: int, num_groups: int) -> None:
  """A static offset must leave room for the local groups; a traced one is the caller's duty
  (local groups past the last global one are then treated as empty)."""
  if isinstance(group_offset, int) and not 0 <= group_offset <= num_groups - num_local:
    raise ValueError(
      f"pallas_gpu {fn}: group_offset={group_offset} with {num_local} local groups of "
      f"{num_groups}; allowed: 0 <= group_offset <= {num_groups - num_local}."
    )


def _round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


def _pad_to(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """x padded with zeros at the end of each axis to `shape` (no copy when already that shape)."""
  if x.shape == tuple(shape):
    return x
  return jnp.pad(x, [(0, s - d) for d, s in zip(x.shape, shape, strict=True)])


def _group_bounds(group_sizes, group_offset, num_local: int, num_rows: int):
  """([E_local] first row, [E_local] one-past-last row) of the local groups, clipped to M."""
  ends = jnp.minimum(jnp.cumsum(group_sizes.astype(jnp.int32)), num_rows)  # [E]
  starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])  # [E]
  local = jnp.asarray(group_offset, jnp.int32) + jnp.arange(num_local, dtype=jnp.int32)
  # Local groups outside the global ones (a bad traced offset) are empty, never out of bounds.
  valid = (local >= 0) & (local < group_sizes.shape[0])
  local = jnp.clip(local, 0, group_sizes.shape[0] - 1)
  return (
    jnp.where(valid, starts[local], 0),
    jnp.where(valid, ends[local], 0),
  )  # [E_local] each


def _out_shape(shape, dtype, operands) -> jax.ShapeDtypeStruct:
  """Inside `shard_map(check_vma=True)` a pallas_call's output must say which manual axes it
  varies over: those of its operands (cast to a common set first; no-op outside `shard_map`)."""
  manual = getattr(jax.typeof(operands[-1]), "manual_axis_type", None)
  return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=manual)


def _compiler_params(num_warps: int, num_stages: int):
  return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _dot(x, y, contract, acc_dtype=jnp.float32):
  """`x @ y` contracting dims `contract` = (x's, y's), accumulated in float32."""
  return jax.lax.dot_general(
    x, y, ((contract[:1], contract[1:]), ((), ())), preferred_element_type=acc_dtype
  )


def _gmm_kernel(
  row_group_ref,  # [bm] int32 local group of each row, -1 for none
  first_ref,  # [num_row_tiles] int32 first local group of each row tile
  last_ref,  # [num_row_tiles] int32 last local group (-1, so no iteration, when it has none)
  lhs_ref,  # [bm, Kp] this row tile
  rhs_ref,  # [E_local, Kp, Np] or [E_local, Np, Kp] (transpose_rhs): the whole array
  out_ref,  # [bm, bn]
  *,
  bk: int,
  bn: int,
  num_k: int,
  transpose_rhs: bool,
):
  i, j = pl.program_id(0), pl.program_id(1)
  row_group = row_group_ref[...]  # [bm]
  cols = pl.ds(pl.multiple_of(j * bn, bn), bn)

  def group_product(g, acc):
    def k_step(k, acc_g):
      ks = pl.ds(pl.multiple_of(k * bk, bk), bk)
      x = lhs_ref[:, ks]  # [bm, bk]
      if transpose_rhs:
        return acc_g + _dot(x, rhs_ref[g, cols, ks], (1, 1))  # [bn, bk] -> [bm, bn]
      return acc_g + _dot(x, rhs_ref[g, ks, cols], (1, 0))  # [bk, bn] -> [bm, bn]

    acc_g = jax.lax.fori_loop(0, num_k, k_step, jnp.zeros_like(acc))  # [bm, bn] f32
    # Select, never multiply: a NaN row of another group (or of none) must not leak in.
    return jnp.where((row_group == g)[:, None], acc_g, acc)

  acc = jnp.zeros(out_ref.shape, jnp.float32)
  acc = jax.lax.fori_loop(first_ref[i], last_ref[i] + 1, group_product, acc)
  out_ref[...] = acc.astype(out_ref.dtype)


def gmm(
  lhs: jax.Array,
  rhs: jax.Array,
  group_sizes: jax.Array,
  *,
  transpose_rhs: bool = False,
  preferred_element_type=None,
  group_offset=0,
  bm: int = OPTIONS["bm"],
  bk: int = OPTIONS["bk"],
  bn: int = OPTIONS["bn"],
  num_warps: int = OPTIONS["num_warps"],
  num_stages: int = OPTIONS["num_stages"],
  interpret: bool = OPTIONS["interpret"],
) -> jax.Array:
  """`[M, K] x [E, K, N] -> [M, N]`, rows of group e times `rhs[e]`; see `reference.gmm`.

  Args:
    lhs: `[M, K]` rows sorted by group.
    rhs: `[E_local, K, N]` (or `[E_local, N, K]` with `transpose_rhs`, group e then uses
      `rhs[e].T`): the weights of groups `group_offset .. group_offset + E_local - 1`.
    group_sizes: `[E]` int32 sizes of all groups, sum <= M.
    transpose_rhs: rhs is `[E_local, N, K]`.
    preferred_element_type: output dtype (default lhs's); accumulation is float32.
    group_offset: the global id of rhs's first group (int or traced int32 scalar).
    bm, bk, bn: row, contraction and column blocks (powers of two >= 16).
    num_warps, num_stages: Triton launch parameters.
    interpret: run the Pallas interpreter (exact, on any host) instead of Triton.

  Returns:
    `[M, N]`; rows at or past sum(group_sizes), and rows of groups outside the local ones, are
    exactly zero.
  """
  _check_options("gmm", bm, bk, bn, num_warps, num_stages, interpret)
  _check_group_offset("gmm", group_offset, rhs.shape[0], group_sizes.shape[0])
  out_dtype = jnp.dtype(preferred_element_type or lhs.dtype)
  dtype = jnp.result_type(lhs, rhs)  # Triton's dot takes one element type
  lhs, rhs = lhs.astype(dtype), rhs.astype(dtype)
  m, k = lhs.shape
  num_local = rhs.shape[0]
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  mp, kp, np_ = _round_up(max(m, 1), bm), _round_up(max(k, 1), bk), _round_up(max(n, 1), bn)
  lhs = _pad_to(lhs, (mp, kp))
  rhs = _pad_to(rhs, (num_local, np_, kp) if transpose_rhs else (num_local, kp, np_))

  # Group metadata (jnp, outside the kernel): local group of every row, -1 for none.
  # A row's global group is the number of group ends at or before it (E past the clipped total).
  ends = jnp.minimum(jnp.cumsum(group_sizes.astype(jnp.int32)), m)  # [E]
  rows = jnp.arange(mp, dtype=jnp.int32)  # [Mp]
  local = jnp.searchsorted(ends, rows, side="right").astype(jnp.int32) - group_offset  # [Mp]
  row_group = jnp.where((local >= 0) & (local < num_local), local, -1)  # [Mp]
  tiles = row_group.reshape(mp // bm, bm)  # [num_row_tiles, bm]
  first = jnp.min(jnp.where(tiles >= 0, tiles, num_local), axis=1).astype(jnp.int32)
  last = jnp.max(tiles, axis=1).astype(jnp.int32)  # -1 (no iteration) when the tile has none

  num_row_tiles = mp // bm
  kernel = functools.partial(_gmm_kernel, bk=bk, bn=bn, num_k=kp // bk, transpose_rhs=transpose_rhs)
  operands = to_common_varying_axes(row_group, first, last, lhs, rhs)
  out = pl.pallas_call(
    kernel,
    out_shape=_out_shape((mp, np_), out_dtype, operands),
    grid=(num_row_tiles, np_ // bn),
    in_specs=[
      pl.BlockSpec((bm,), lambda i, j: (i,)),
      pl.BlockSpec((num_row_tiles,), lambda i, j: (0,)),
      pl.BlockSpec((num_row_tiles,), lambda i, j: (0,)),
      pl.BlockSpec((bm, kp), lambda i, j: (i, 0)),
      pl.BlockSpec(rhs.shape, lambda i, j: (0, 0, 0)),
    ],
    out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
    compiler_params=_compiler_params(num_warps, num_stages),
    interpret=interpret,
    name="gmm_pallas_gpu",
  )(*operands)
  return out[:m, :n]


def _tgmm_kernel(
  starts_ref,  # [E_local] int32 first row of each local group
  ends_ref,  # [E_local] int32 one past its last row (<= M)
  lhs_ref,  # [Mp, bk] this column block of lhs, all rows
  grad_ref,  # [Mp, bn] this column block of grad, all rows
  out_ref,  # [bk, bn] the (k, n) tile of group g's gradient
  *,
  bm: int,
):
  g = pl.program_id(0)
  start, end = starts_ref[g], ends_ref[g]
  first_tile = start // bm
  # Zero iterations for an empty group: nothing is read, the tile is written as zeros.
  num_tiles = jnp.where(end > start, (end + bm - 1) // bm - first_tile, 0)

  def row_tile(t, acc):
    r0 = pl.multiple_of((first_tile + t) * bm, bm)
    rows = r0 + jax.lax.broadcasted_iota(jnp.int32, (bm, 1), 0)  # [bm, 1]
    in_group = (rows >= start) & (rows < end)
    x = lhs_ref[pl.ds(r0, bm), :]  # [bm, bk]
    y = grad_ref[pl.ds(r0, bm), :]  # [bm, bn]
    # Select on both operands: a NaN/Inf row of another group must not reach this group.
    x = jnp.where(in_group, x, jnp.zeros((), x.dtype))
    y = jnp.where(in_group, y, jnp.zeros((), y.dtype))
    return acc + _dot(x, y, (0, 0))  # [bk, bn]

  acc = jax.lax.fori_loop(0, num_tiles, row_tile, jnp.zeros(out_ref.shape, jnp.float32))
  out_ref[...] = acc.astype(out_ref.dtype)


def tgmm(
  lhs: jax.Array,
  grad: jax.Array,
  group_sizes: jax.Array,
  *,
  preferred_element_type=None,
  group_offset=0,
  num_groups: int | None = None,
  bm: int = OPTIONS["bm"],
  bk: int = OPTIONS["bk"],
  bn: int = OPTIONS["bn"],
  num_warps: int = OPTIONS["num_warps"],
  num_stages: int = OPTIONS["num_stages"],
  interpret: bool = OPTIONS["interpret"],
) -> jax.Array:
  """Per-group `lhs_e^T @ grad_e`: `[M, K], [M, N] -> [E_local, K, N]`; see `reference.tgmm`.

  Args:
    lhs: `[M, K]` rows sorted by group.
    grad: `[M, N]` rows in the same order.
    group_sizes: `[E]` int32 sizes of all groups, sum <= M; rows past the sum are ignored.
    preferred_element_type: output dtype (default the promoted input dtype).
    group_offset: the global id of the first group to return (int or traced int32 scalar).
    num_groups: E_local, how many groups to return from `group_offset` (default E).
    bm, bk, bn: row chunk, and the K and N blocks of the output tile (powers of two >= 16).
    num_warps, num_stages, interpret: as for `gmm`.

  Returns:
    `[E_local, K, N]`; a group with no rows gets exact zeros.
  """
  _check_options("tgmm", bm, bk, bn, num_warps, num_stages, interpret)
  dtype = jnp.result_type(lhs, grad)
  out_dtype = jnp.dtype(preferred_element_type or dtype)
  lhs, grad = lhs.astype(dtype), grad.astype(dtype)
  m, k = lhs.shape
  n = grad.shape[1]
  num_local = group_sizes.shape[0] if num_groups is None else num_groups
  _check_group_offset("tgmm", group_offset, num_local, group_sizes.shape[0])
  mp, kp, np_ = _round_up(max(m, 1), bm), _round_up(max(k, 1), bk), _round_up(max(n, 1), bn)
  lhs, grad = _pad_to(lhs, (mp, kp)), _pad_to(grad, (mp, np_))
  starts, ends = _group_bounds(group_sizes, group_offset, num_local, m)  # [E_local] each

  operands = to_common_varying_axes(starts, ends, lhs, grad)
  out = pl.pallas_call(
    functools.partial(_tgmm_kernel, bm=bm),
    out_shape=_out_shape((num_local, kp, np_), out_dtype, operands),
    grid=(num_local, kp // bk, np_ // bn),
    in_specs=[
      pl.BlockSpec((num_local,), lambda g, i, j: (0,)),
      pl.BlockSpec((num_local,), lambda g, i, j: (0,)),
      pl.BlockSpec((mp, bk), lambda g, i, j: (0, i)),
      pl.BlockSpec((mp, bn), lambda g, i, j: (0, j)),
    ],
    out_specs=pl.BlockSpec((None, bk, bn), lambda g, i, j: (g, i, j)),
    compiler_params=_compiler_params(num_warps, num_stages),
    interpret=interpret,
    name="tgmm_pallas_gpu",
  )(*operands)
  return out[:, :k, :n]


ops.register_backend("pallas_gpu", ops.Backend(gmm, tgmm, autodiff=False, options=OPTIONS))

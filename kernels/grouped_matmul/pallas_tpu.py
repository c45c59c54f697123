"""Grouped matmul as Mosaic-TPU Pallas kernels, on the megablox design (Gale et al. 2023,
"MegaBlocks: Efficient Sparse Training with Mixture-of-Experts"; jax's `pallas/ops/tpu/megablox`).

    gmm:   out[rows of group e] = lhs[rows of group e] @ rhs[e]       [M, K] x [E, K, N] -> [M, N]
    tgmm:  out[e] = lhs_e^T @ grad_e                                   [M, K], [M, N] -> [E, K, N]

Design. Rows are cut into tiles of `tm`. A tile that straddles a group boundary is visited once per
group it holds rows of, and each visit stores only its own group's rows (a select, never a multiply
by a 0/1 mask, so a NaN in another group's row cannot leak). The visits form a 1-D list computed
from group_sizes before the kernel (`_Visits`): for grid step i, the group, the row tile and the
group's row range. The list is prefetched into SMEM (`PrefetchScalarGridSpec`) and read by the
BlockSpec index maps, so each step DMAs exactly the lhs tile and the expert's weight tile it needs;
the number of visits (a traced value) is the grid's size. Each group's visits are consecutive and
in row order, so an output tile's revisits are consecutive too, as Mosaic's pipelining requires.

    gmm  grid (N tiles, visits, K tiles): float32 accumulator [tm, tn], stored at the last K tile.
    tgmm grid (N tiles, K tiles, visits): float32 accumulator [tk, tn], zeroed at a group's first
         visit, stored at its last. An empty group is visited once, with no matmul, so its
         gradient is stored as exact zeros.

Shapes. Callers pass any M, K, N: M is zero-padded to a multiple of `tm` and K, N to multiples of
`tk`, `tn` inside the op (padding, never truncation; the padded rows are past every group and the
padded K columns are zeros in both operands). Tiles larger than a dimension shrink to it, rounded up
to the TPU block rule (multiples of 8 rows and 128 lanes). gmm never writes rows that no visited
group owns (rows at or past sum(group_sizes), and with `group_offset` the other shards' rows); they
are zeroed with `jnp.where` after the call (interpret mode leaves NaN or stale data there).

Expert parallelism. `group_offset` (an int or a traced int32 scalar) says that this device holds
groups [group_offset, group_offset + E_local) of the `group_sizes` list, which describes the whole
[M] row list; rhs (gmm) and the output (tgmm) hold only the local E_local groups.

Options (`Backend.options`): `tm`, `tk`, `tn`, the tile sizes (defaults 512, 1024, 1024, as
MaxText's megablox fork; not tuned on hardware here); `interpret` (False: Mosaic; True, or a
`pltpu.InterpretParams`, runs the kernels in Pallas's interpreter, on CPU too); `vmem_limit_bytes`,
Mosaic's scoped VMEM limit (None: the compiler's default). With the default tiles the TPU compiler
(libtpu, run from a CPU host) fits bfloat16 in the default limit on v5e, v6e and v5p; float32 needs
18-20 MiB, over v5e's and v5p's 16 MiB default: pass smaller tiles or `vmem_limit_bytes=32 << 20`.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from moejax.kernels.grouped_matmul import ops
from moejax.kernels.grouped_matmul.common import to_common_varying_axes

OPTIONS: dict[str, Any] = {
  "tm": 512,
  "tk": 1024,
  "tn": 1024,
  "interpret": False,
  "vmem_limit_bytes": None,
}

# The TPU block rule: a block's last two dims are multiples of (8, 128) (or the full dimension).
_SUBLANES, _LANES = 8, 128


def _round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


def _tile(fn: str, name: str, value: int, dim: int, align: int) -> int:
  """The tile actually used: `value`, shrunk to `dim` rounded up to `align` when larger."""
  if not isinstance(value, int) or value <= 0 or value % align:
    raise ValueError(
      f"pallas_tpu {fn}: option {name}={value!r}; allowed: a positive multiple of {align}."
    )
  return min(value, _round_up(max(dim, 1), align))


def _pad_to(x: jax.Array, axis: int, size: int) -> jax.Array:
  if x.shape[axis] == size:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths)


class _Visits(NamedTuple):
  """The grid's visit list, `[max_visits]` int32 each, prefetched into SMEM.

  Step i works on local group `group[i]` (an index into rhs / the tgmm output), row tile
  `tile[i]`, and stores rows [`start[i]`, `end[i]`), the group's rows. Steps at or past `count`
  are never run (their entries are clamped in range all the same).
  """

  group: jax.Array
  tile: jax.Array
  start: jax.Array
  end: jax.Array
  count: jax.Array  # () int32: the grid size.
  rows: tuple[jax.Array, jax.Array]  # () int32 each: the local groups' first and end row.


def _visits(
  group_sizes: jax.Array,
  group_offset,
  num_local: int,
  num_rows: int,
  tm: int,
  visit_empty: bool,
) -> _Visits:
  """Visits of the local groups' row tiles, in group order, each group's tiles in row order.

  Group e owns rows [starts[e], ends[e]) (ends clipped to num_rows: nothing checks sum <= M) and
  so row tiles starts[e] // tm to (ends[e] - 1) // tm. With `visit_empty` (tgmm) an empty group
  gets one visit, which only zeroes its output.
  """
  num_tiles = num_rows // tm
  num_groups = group_sizes.shape[0]
  ends = jnp.minimum(jnp.cumsum(group_sizes), num_rows).astype(jnp.int32)  # [E]
  starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])  # [E]
  first_tile = starts // tm  # [E]
  last_tile = (ends + tm - 1) // tm  # [E] one past
  groups = jnp.arange(num_groups, dtype=jnp.int32)
  offset = jnp.asarray(group_offset, jnp.int32)
  local = (groups >= offset) & (groups < offset + num_local)  # [E]
  per_group = jnp.where(ends > starts, last_tile - first_tile, 1 if visit_empty else 0)
  per_group = jnp.where(local, per_group, 0).astype(jnp.int32)  # [E]
  # Every row tile is visited once by the group owning its first row, plus once for each further
  # group starting inside it; empty groups add at most one visit each.
  max_visits = num_tiles + num_local
  group = jnp.repeat(groups, per_group, total_repeat_length=max_visits)  # [max_visits]
  first_visit = jnp.cumsum(per_group) - per_group  # [E]
  step = jnp.arange(max_visits, dtype=jnp.int32)
  tile = first_tile[group] + step - first_visit[group]
  local_start = jnp.where(offset > 0, ends[jnp.maximum(offset - 1, 0)], 0)
  local_end = ends[jnp.minimum(offset + num_local, num_groups) - 1]
  return _Visits(
    group=jnp.clip(group - offset, 0, num_local - 1),
    tile=jnp.clip(tile, 0, num_tiles - 1),
    start=starts[group],
    end=ends[group],
    count=jnp.sum(per_group),
    rows=(local_start, local_end),
  )


def _row_mask(visits, i, tm: int, width: int) -> jax.Array:
  """`[tm, width]` bool: the rows of step i's tile that belong to step i's group."""
  rows = lax.broadcasted_iota(jnp.int32, (tm, width), 0) + visits[1][i] * tm
  return (rows >= visits[2][i]) & (rows < visits[3][i])


def _common_operands(visits: _Visits, *arrays) -> list[jax.Array]:
  """The pallas_call's operands (the visit list, then the matrices), cast to vary over the same
  `shard_map` axes (no-op outside `shard_map`), so that the output's type can be theirs."""
  return to_common_varying_axes(visits.group, visits.tile, visits.start, visits.end, *arrays)


def _out_shape(shape, dtype, operands) -> jax.ShapeDtypeStruct:
  """Inside `shard_map(check_vma=True)` a pallas_call's output must say which manual axes it
  varies over: those of its operands."""
  manual = getattr(jax.typeof(operands[-1]), "manual_axis_type", None)
  return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=manual)


def _precision(dtype) -> lax.Precision | None:
  """float32 operands multiply in full float32 (Mosaic's `contract_precision<fp32>`), as the
  reference does; narrower ones take the MXU's native precision."""
  return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _interpret(value):
  if value is True or value is False or isinstance(value, pltpu.InterpretParams):
    return value
  raise ValueError(
    f"pallas_tpu: option interpret={value!r}; allowed: False, True or a pltpu.InterpretParams."
  )


def gmm(
  lhs: jax.Array,
  rhs: jax.Array,
  group_sizes: jax.Array,
  *,
  transpose_rhs: bool = False,
  preferred_element_type=None,
  group_offset: int | jax.Array = 0,
  tm: int = OPTIONS["tm"],
  tk: int = OPTIONS["tk"],
  tn: int = OPTIONS["tn"],
  interpret: bool | pltpu.InterpretParams = OPTIONS["interpret"],
  vmem_limit_bytes: int | None = OPTIONS["vmem_limit_bytes"],
) -> jax.Array:
  """`[M, K] x [E_local, K, N] -> [M, N]`, rows of group e times rhs[e - group_offset].

  Args:
    lhs: `[M, K]` rows sorted by group.
    rhs: `[E_local, K, N]`, or `[E_local, N, K]` with `transpose_rhs` (group e uses its transpose).
    group_sizes: `[E]` int32 rows per group (E >= E_local + group_offset), sum <= M.
    transpose_rhs: use `rhs[e].T` (the lhs gradient of gmm).
    preferred_element_type: output dtype (default lhs's); accumulation is float32.
    group_offset: the first of this device's groups in `group_sizes`.
    tm, tk, tn: tile sizes (multiples of 8, 128, 128).
    interpret: run in Pallas's interpreter (CPU).
    vmem_limit_bytes: Mosaic's scoped VMEM limit (None: the compiler's default, 16 MiB on v5e).

  Returns:
    `[M, N]`; rows outside the local groups (at or past sum(group_sizes) included) are zero.
  """
  out_dtype = jnp.dtype(preferred_element_type or lhs.dtype)
  m, k = lhs.shape
  num_local = rhs.shape[0]
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  interpret = _interpret(interpret)
  tm = _tile("gmm", "tm", tm, m, _SUBLANES)
  tk = _tile("gmm", "tk", tk, k, _LANES)
  tn = _tile("gmm", "tn", tn, n, _LANES)
  m_pad, k_pad, n_pad = _round_up(max(m, 1), tm), _round_up(k, tk), _round_up(n, tn)
  lhs = _pad_to(_pad_to(lhs, 0, m_pad), 1, k_pad)  # [M_pad, K_pad]
  k_axis, n_axis = (2, 1) if transpose_rhs else (1, 2)
  rhs = _pad_to(_pad_to(rhs, k_axis, k_pad), n_axis, n_pad)
  tiles_k = k_pad // tk
  visits = _visits(group_sizes.astype(jnp.int32), group_offset, num_local, m_pad, tm, False)

  def kernel(group, tile, start, end, lhs_ref, rhs_ref, out_ref, acc_ref):
    i, k_i = pl.program_id(1), pl.program_id(2)

    @pl.when(k_i == 0)
    def _():
      acc_ref[...] = jnp.zeros_like(acc_ref)

    contract = 1 if transpose_rhs else 0
    acc_ref[...] += lax.dot_general(
      lhs_ref[...],
      rhs_ref[...],
      (((1,), (contract,)), ((), ())),
      precision=_precision(lhs.dtype),
      preferred_element_type=jnp.float32,
    )

    @pl.when(k_i == tiles_k - 1)
    def _():
      # Only this group's rows: the tile's other rows keep what an earlier visit stored.
      mask = _row_mask((group, tile, start, end), i, tm, tn)
      out_ref[...] = lax.select(mask, acc_ref[...], out_ref[...].astype(jnp.float32)).astype(
        out_ref.dtype
      )

  def lhs_index(n_i, i, k_i, group, tile, start, end):
    return tile[i], k_i

  def rhs_index(n_i, i, k_i, group, tile, start, end):
    return (group[i], n_i, k_i) if transpose_rhs else (group[i], k_i, n_i)

  def out_index(n_i, i, k_i, group, tile, start, end):
    return tile[i], n_i

  rhs_block = (None, tn, tk) if transpose_rhs else (None, tk, tn)
  operands = _common_operands(visits, lhs, rhs)
  out = pl.pallas_call(
    kernel,
    out_shape=_out_shape((m_pad, n_pad), out_dtype, operands),
    grid_spec=pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=4,
      grid=(n_pad // tn, visits.count, tiles_k),
      in_specs=[pl.BlockSpec((tm, tk), lhs_index), pl.BlockSpec(rhs_block, rhs_index)],
      out_specs=pl.BlockSpec((tm, tn), out_index),
      scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)],
    ),
    compiler_params=pltpu.CompilerParams(
      dimension_semantics=("parallel", "arbitrary", "arbitrary"),
      vmem_limit_bytes=vmem_limit_bytes,
    ),
    interpret=interpret,
    cost_estimate=pl.CostEstimate(
      flops=2 * m * k * n,
      bytes_accessed=lhs.size * lhs.itemsize * (n_pad // tn)
      + rhs.size * rhs.itemsize
      + m_pad * n_pad * out_dtype.itemsize,
      transcendentals=0,
    ),
  )(*operands)
  out = out[:m, :n]
  rows = jnp.arange(m, dtype=jnp.int32)[:, None]  # [M, 1]
  owned = (rows >= visits.rows[0]) & (rows < visits.rows[1])
  return jnp.where(owned, out, jnp.zeros((), out_dtype))


def tgmm(
  lhs: jax.Array,
  grad: jax.Array,
  group_sizes: jax.Array,
  *,
  preferred_element_type=None,
  group_offset: int | jax.Array = 0,
  num_local_groups: int | None = None,
  tm: int = OPTIONS["tm"],
  tk: int = OPTIONS["tk"],
  tn: int = OPTIONS["tn"],
  interpret: bool | pltpu.InterpretParams = OPTIONS["interpret"],
  vmem_limit_bytes: int | None = OPTIONS["vmem_limit_bytes"],
) -> jax.Array:
  """`[M, K], [M, N] -> [E_local, K, N]`: out[e - group_offset] = lhs_e^T @ grad_e.

  Args:
    lhs: `[M, K]` rows sorted by group.
    grad: `[M, N]` rows in the same order.
    group_sizes: `[E]` int32 rows per group, sum <= M.
    preferred_element_type: output dtype (default the promoted input dtype); accumulation is
      float32.
    group_offset: the first of this device's groups in `group_sizes`.
    num_local_groups: E_local, the groups computed (default E - group_offset when group_offset is
      a Python int, else E).
    tm, tk, tn: tile sizes (multiples of 8, 128, 128); tk tiles K and tn tiles N.
    interpret: run in Pallas's interpreter (CPU).
    vmem_limit_bytes: Mosaic's scoped VMEM limit (None: the compiler's default, 16 MiB on v5e).

  Returns:
    `[E_local, K, N]`; a group with no rows gets exact zeros.
  """
  dtype = jnp.result_type(lhs, grad)
  out_dtype = jnp.dtype(preferred_element_type or dtype)
  lhs, grad = lhs.astype(dtype), grad.astype(dtype)
  m, k = lhs.shape
  n = grad.shape[1]
  if num_local_groups is None:
    num_local_groups = group_sizes.shape[0] - (group_offset if isinstance(group_offset, int) else 0)
  interpret = _interpret(interpret)
  tm = _tile("tgmm", "tm", tm, m, _SUBLANES)
  tk = _tile("tgmm", "tk", tk, k, _LANES)
  tn = _tile("tgmm", "tn", tn, n, _LANES)
  m_pad, k_pad, n_pad = _round_up(max(m, 1), tm), _round_up(k, tk), _round_up(n, tn)
  lhs = _pad_to(_pad_to(lhs, 0, m_pad), 1, k_pad)  # [M_pad, K_pad]
  grad = _pad_to(_pad_to(grad, 0, m_pad), 1, n_pad)  # [M_pad, N_pad]
  visits = _visits(group_sizes.astype(jnp.int32), group_offset, num_local_groups, m_pad, tm, True)

  def kernel(group, tile, start, end, lhs_ref, grad_ref, out_ref, acc_ref):
    i = pl.program_id(2)
    last = pl.num_programs(2) - 1

    @pl.when((i == 0) | (group[jnp.maximum(i - 1, 0)] != group[i]))
    def _():
      acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(end[i] > start[i])
    def _():
      # Select this group's rows (in float32: not every TPU selects bf16), then contract M.
      zero = jnp.zeros((), jnp.float32)
      x = lhs_ref[...].astype(jnp.float32)
      g = grad_ref[...].astype(jnp.float32)
      x = jnp.where(_row_mask((group, tile, start, end), i, tm, tk), x, zero)
      g = jnp.where(_row_mask((group, tile, start, end), i, tm, tn), g, zero)
      acc_ref[...] += lax.dot(
        x.astype(dtype).swapaxes(0, 1),
        g.astype(dtype),
        precision=_precision(dtype),
        preferred_element_type=jnp.float32,
      )

    @pl.when((i == last) | (group[jnp.minimum(i + 1, last)] != group[i]))
    def _():
      out_ref[...] = acc_ref[...].astype(out_ref.dtype)

  def lhs_index(n_i, k_i, i, group, tile, start, end):
    return tile[i], k_i

  def grad_index(n_i, k_i, i, group, tile, start, end):
    return tile[i], n_i

  def out_index(n_i, k_i, i, group, tile, start, end):
    return group[i], k_i, n_i

  operands = _common_operands(visits, lhs, grad)
  out = pl.pallas_call(
    kernel,
    out_shape=_out_shape((num_local_groups, k_pad, n_pad), out_dtype, operands),
    grid_spec=pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=4,
      grid=(n_pad // tn, k_pad // tk, visits.count),
      in_specs=[pl.BlockSpec((tm, tk), lhs_index), pl.BlockSpec((tm, tn), grad_index)],
      out_specs=pl.BlockSpec((None, tk, tn), out_index),
      scratch_shapes=[pltpu.VMEM((tk, tn), jnp.float32)],
    ),
    compiler_params=pltpu.CompilerParams(
      dimension_semantics=("parallel", "arbitrary", "arbitrary"),
      vmem_limit_bytes=vmem_limit_bytes,
    ),
    interpret=interpret,
    cost_estimate=pl.CostEstimate(
      flops=2 * m * k * n,
      bytes_accessed=lhs.size * lhs.itemsize * (n_pad // tn)
      + grad.size * grad.itemsize * (k_pad // tk)
      + num_local_groups * k_pad * n_pad * out_dtype.itemsize,
      transcendentals=0,
    ),
  )(*operands)
  return out[:, :k, :n]


ops.register_backend(
  "pallas_tpu",
  ops.Backend(gmm, tgmm, autodiff=False, options=OPTIONS),
)

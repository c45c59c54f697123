"""Grouped matmul on the host's BLAS: one GEMM per non-empty group, on XLA's own buffers.

XLA:CPU compiles each group's dot of the `cpu` backend into a small fused kernel; for the shapes a
mixture of experts makes (tens to hundreds of rows per group, D and F in the hundreds or more)
those run well below what a BLAS GEMM reaches on the same core, and the weight gradient (a dot
that contracts the group's few rows) is the worst of them. This backend hands the whole grouped
matmul to the host instead, through `jax.experimental.buffer_callback`, which passes XLA's input
and output buffers to Python as zero-copy arrays:

    for each group e with rows [start, end):                      (numpy.matmul -> BLAS GEMM)
      gmm:   out[start:end] = lhs[start:end] @ rhs[e]             (rhs[e].T with transpose_rhs)
      tgmm:  out[e]         = lhs[start:end].T @ grad[start:end]  (zeros for an empty group)

The GEMM is numpy's BLAS (OpenBLAS in numpy's wheels), threaded over the host's cores; numpy
passes transposed views to it as transposed operands, so no operand is copied. Rows at or past
sum(group_sizes) are zeroed, as every backend does. Measured on 2 cores with M=8192, D=512,
F=1024 and E=128 groups of 64 rows (float32, ms): gmm 72 and tgmm 78 here, against 80 and 111 for
the `cpu` backend's loops of XLA dots, and 53 for one dense [8192, 512] x [512, 1024] GEMM.

Dtypes. float32 and float64 go to BLAS as they are. Other inputs (bfloat16, float16) are cast to
float32 by XLA before the call and the float32 result is cast to the output dtype after it: numpy
has no BLAS for them, and the products then accumulate in float32 as the op's contract requires.

Where it runs. CPU only (the callback reads host memory). The callback runs where XLA places it:
once per device inside `shard_map` (each on its own shard), or once on the whole array under plain
`jit`. It holds the Python GIL while it loops over the groups, releasing it inside each GEMM; a
program that keeps the GIL busy on another thread while a step runs will wait for it. A host
callback cannot be serialised: `jax.export` of a computation that contains this backend fails
("serialization of host_callbacks is not yet implemented"); `gmm_backend="cpu"` is pure XLA.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.buffer_callback import buffer_callback

from moejax.kernels.grouped_matmul.cpu import varying_axes

# The dtypes numpy's matmul hands to BLAS; anything else computes in float32.
_BLAS_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _compute_dtype(*arrays) -> np.dtype:
  dtype = np.dtype(jnp.result_type(*arrays))
  return dtype if dtype in _BLAS_DTYPES else np.dtype(np.float32)


def _group_bounds(group_sizes, num_rows: int) -> tuple[np.ndarray, np.ndarray]:
  """[E] first and one-past-last row of every group, clipped to `num_rows`; a group has rows where
  end > start."""
  ends = np.minimum(np.cumsum(np.asarray(group_sizes), dtype=np.int64), num_rows)
  return np.concatenate([[0], ends[:-1]]), ends


def _host_gmm(ctx, out, lhs, rhs, group_sizes, *, transpose_rhs: bool) -> None:
  del ctx
  out, lhs, rhs = np.asarray(out), np.asarray(lhs), np.asarray(rhs)
  starts, ends = _group_bounds(group_sizes, lhs.shape[0])
  for e in np.flatnonzero(ends > starts).tolist():
    w = rhs[e].T if transpose_rhs else rhs[e]  # [D, F], a view
    np.matmul(lhs[starts[e] : ends[e]], w, out=out[starts[e] : ends[e]])
  out[ends[-1] if ends.size else 0 :] = 0  # the rows past the groups


def _host_tgmm(ctx, out, lhs, grad, group_sizes) -> None:
  del ctx
  out, lhs, grad = np.asarray(out), np.asarray(lhs), np.asarray(grad)
  starts, ends = _group_bounds(group_sizes, lhs.shape[0])
  has_rows = ends > starts
  for e in np.flatnonzero(has_rows).tolist():
    rows = slice(starts[e], ends[e])
    np.matmul(lhs[rows].T, grad[rows], out=out[e])  # [D, rows] @ [rows, F]
  out[~has_rows] = 0


def _call(kernel, shape, dtype, out_dtype, *operands):
  """Runs `kernel` on the operands in `dtype` into a fresh `shape` buffer; casts to `out_dtype`."""
  *arrays, group_sizes = operands
  arrays = [x.astype(dtype) for x in arrays]
  out = buffer_callback(kernel, jax.ShapeDtypeStruct(shape, dtype))(*arrays, group_sizes)
  # The callback's result is typed as varying over no `shard_map` axis; it varies as its inputs do.
  out = jax.lax.pcast(out, varying_axes(*operands), to="varying")
  return out.astype(out_dtype)


def gmm(
  lhs: jax.Array,
  rhs: jax.Array,
  group_sizes: jax.Array,
  *,
  transpose_rhs: bool = False,
  preferred_element_type=None,
  interpret: bool = False,
) -> jax.Array:
  """Grouped matmul `[M, D] x [E, D, F] -> [M, F]` with one BLAS GEMM per non-empty group.

  Not differentiable by itself (a host callback); `ops.gmm` adds the VJP. Arguments as for
  `cpu.gmm`: `transpose_rhs` takes rhs as `[E, F, D]` and uses `rhs[e].T`; `interpret` is ignored.
  Rows at or past sum(group_sizes) are zero.
  """
  del interpret
  out_dim = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  kernel = lambda ctx, out, *args: _host_gmm(ctx, out, *args, transpose_rhs=transpose_rhs)
  out_dtype = preferred_element_type or lhs.dtype
  dtype = _compute_dtype(lhs, rhs)
  return _call(kernel, (lhs.shape[0], out_dim), dtype, out_dtype, lhs, rhs, group_sizes)


def tgmm(
  lhs: jax.Array,
  grad: jax.Array,
  group_sizes: jax.Array,
  *,
  preferred_element_type=None,
  interpret: bool = False,
) -> jax.Array:
  """Per-group `lhs_e^T @ grad_e -> [E, D, F]` with one BLAS GEMM per non-empty group.

  Not differentiable by itself; `ops.tgmm` adds the VJP. A group with no rows gets zeros; rows past
  sum(group_sizes) are ignored. `interpret` is ignored.
  """
  del interpret
  dtype = _compute_dtype(lhs, grad)
  out_dtype = preferred_element_type or jnp.result_type(lhs, grad)
  shape = (group_sizes.shape[0], lhs.shape[1], grad.shape[1])
  return _call(_host_tgmm, shape, dtype, out_dtype, lhs, grad, group_sizes)

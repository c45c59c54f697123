"""Grouped matmul through XLA's `ragged_dot`: the default on TPU and GPU.

`jax.lax.ragged_dot` is one HLO op that each compiler lowers natively (a grouped kernel on TPU and
GPU) and that JAX knows how to differentiate, so this backend uses plain autodiff for gmm. On CPU,
XLA lowers it to a masked dense dot over all E groups, i.e. E times the useful FLOPs: `auto` runs
the `blas` backend there.

tgmm is `ragged_dot_general` with the ragged dimension contracted (JAX's "ragged contracting" mode),
which computes `[E, D, F]` directly. JAX cannot differentiate that mode, so `ops.tgmm` gives it a
custom VJP built from gmm.
"""

import jax
import jax.numpy as jnp
from jax import lax

# tgmm: lhs [M, D] and grad [M, F] contract over M, which is ragged (split into the groups); the
# result gains a leading group axis: [E, D, F].
_TGMM_DIMENSION_NUMBERS = lax.RaggedDotDimensionNumbers(
  dot_dimension_numbers=(((0,), (0,)), ((), ())),
  lhs_ragged_dimensions=(0,),
  rhs_group_dimensions=(),
)


def _zero_rows_past_groups(x: jax.Array, group_sizes: jax.Array) -> jax.Array:
  """Zeros the rows at or past sum(group_sizes).

  ragged_dot on CPU already returns zeros there, but the op's contract does not promise it on every
  platform and kernel (megablox leaves those rows uninitialised); one select makes it certain.
  """
  total = jnp.sum(group_sizes)
  rows = jnp.arange(x.shape[0], dtype=group_sizes.dtype)  # [M]
  return jnp.where((rows < total)[:, None], x, jnp.zeros((), x.dtype))


def gmm(
  lhs: jax.Array,
  rhs: jax.Array,
  group_sizes: jax.Array,
  *,
  transpose_rhs: bool = False,
  preferred_element_type=None,
) -> jax.Array:
  """`[M, D] x [E, D, F] -> [M, F]` with `jax.lax.ragged_dot`; see `reference.gmm` for the contract.

  Args:
    lhs: `[M, D]` rows sorted by group.
    rhs: `[E, D, F]` (or `[E, F, D]` with `transpose_rhs`).
    group_sizes: `[E]` int32 group sizes, sum <= M.
    transpose_rhs: use `rhs[e].T` for group e.
    preferred_element_type: output dtype (default: lhs dtype).
  """
  out_dtype = preferred_element_type or lhs.dtype
  if transpose_rhs:
    rhs = jnp.swapaxes(rhs, 1, 2)  # [E, D, F]
  # Accumulate low-precision inputs in float32, then round once.
  acc_dtype = jnp.promote_types(out_dtype, jnp.float32)
  out = lax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=acc_dtype)  # [M, F]
  return _zero_rows_past_groups(out, group_sizes).astype(out_dtype)


def tgmm(
  lhs: jax.Array,
  grad: jax.Array,
  group_sizes: jax.Array,
  *,
  preferred_element_type=None,
) -> jax.Array:
  """Per-group `lhs_e^T @ grad_e -> [E, D, F]` with `jax.lax.ragged_dot_general` (not differentiable).

  Args:
    lhs: `[M, D]` rows sorted by group.
    grad: `[M, F]` rows in the same order.
    group_sizes: `[E]` int32 group sizes, sum <= M. Rows past the total are ignored.
    preferred_element_type: output dtype (default: the promoted input dtype).
  """
  out_dtype = preferred_element_type or jnp.result_type(lhs, grad)
  acc_dtype = jnp.promote_types(out_dtype, jnp.float32)
  dtype = jnp.result_type(lhs, grad)
  out = lax.ragged_dot_general(
    lhs.astype(dtype),
    grad.astype(dtype),
    group_sizes,
    _TGMM_DIMENSION_NUMBERS,
    preferred_element_type=acc_dtype,
  )  # [E, D, F]
  return out.astype(out_dtype)

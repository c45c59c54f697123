"""Plain-jnp oracle for the grouped matmul: obviously correct, E times the FLOPs.

Every other backend is tested against this file. It states the contract as directly as it can:

    row m of lhs belongs to group g(m), where groups own consecutive row ranges of the sizes in
    `group_sizes` (rows at or past sum(group_sizes) belong to no group);
    gmm:   out[m]  = lhs[m] @ rhs[g(m)]                    (zero for rows in no group)
    tgmm:  out[e]  = sum over rows m of group e of outer(lhs[m], grad[m])

It computes every row against every expert and masks, so it costs E dense matmuls: fine for an
oracle, never for training. Its gradient (plain autodiff) is the reference gradient.
"""

import jax
import jax.numpy as jnp

# The oracle should not inherit a platform's fast-and-loose default matmul precision (bf16 passes on
# TPU); on CPU this changes nothing.
_PRECISION = jax.lax.Precision.HIGHEST


def group_ids(group_sizes: jax.Array, num_rows: int) -> jax.Array:
  """Returns the group of every row: `[num_rows]` int32, `E` for rows past sum(group_sizes).

  Row m belongs to the first group whose end (cumulative size) is greater than m, i.e. its group
  id is the number of group ends at or before m. Empty groups have end == start and so are skipped.

  Args:
    group_sizes: `[E]` integer sizes of consecutive row groups.
    num_rows: M, the number of rows.
  """
  ends = jnp.cumsum(group_sizes.astype(jnp.int32))  # [E]
  rows = jnp.arange(num_rows, dtype=jnp.int32)  # [M]
  return jnp.sum(rows[:, None] >= ends[None, :], axis=1, dtype=jnp.int32)  # [M]


def _mask_per_group(x: jax.Array, group_sizes: jax.Array) -> jax.Array:
  """`[M, E, D]`: slice `[:, e]` is x with every row outside group e set to zero.

  A select, not a multiply by a 0/1 mask, so a non-finite value in a row outside the group (or past
  all groups) cannot leak in through 0 * inf = nan.
  """
  num_groups = group_sizes.shape[0]
  ids = group_ids(group_sizes, x.shape[0])  # [M]
  member = ids[:, None] == jnp.arange(num_groups)[None, :]  # [M, E]
  return jnp.where(member[:, :, None], x[:, None, :], jnp.zeros((), x.dtype))  # [M, E, D]


def gmm(
  lhs: jax.Array,
  rhs: jax.Array,
  group_sizes: jax.Array,
  *,
  transpose_rhs: bool = False,
  preferred_element_type=None,
) -> jax.Array:
  """Grouped matmul by masking: `out[m] = sum_e [m in group e] * (lhs[m] @ rhs[e])`.

  Args:
    lhs: `[M, D]` rows sorted by group.
    rhs: `[E, D, F]` (or `[E, F, D]` with `transpose_rhs`, then each group uses `rhs[e].T`).
    group_sizes: `[E]` integer group sizes, sum <= M.
    transpose_rhs: use `rhs[e].T` for group e (the backward pass of gmm needs this).
    preferred_element_type: output dtype; accumulation is in at least float32.

  Returns:
    `[M, F]`; rows at or past sum(group_sizes) are zero.
  """
  out_dtype = preferred_element_type or lhs.dtype
  acc_dtype = jnp.promote_types(out_dtype, jnp.float32)
  rhs_spec = "efd" if transpose_rhs else "edf"
  # Row m of masked[:, e] is lhs[m] if m is in group e, else exact zeros, so the sum over e in the
  # contraction picks exactly one expert per row.
  masked = _mask_per_group(lhs, group_sizes)  # [M, E, D]
  out = jnp.einsum(
    f"med,{rhs_spec}->mf",
    masked,
    rhs,
    precision=_PRECISION,
    preferred_element_type=acc_dtype,
  )  # [M, F]
  return out.astype(out_dtype)


def tgmm(
  lhs: jax.Array,
  grad: jax.Array,
  group_sizes: jax.Array,
  *,
  preferred_element_type=None,
) -> jax.Array:
  """Per-group `lhs_e^T @ grad_e`: the weight gradient of gmm.

  Args:
    lhs: `[M, D]` rows sorted by group.
    grad: `[M, F]` rows in the same order.
    group_sizes: `[E]` integer group sizes, sum <= M.
    preferred_element_type: output dtype; accumulation is in at least float32.

  Returns:
    `[E, D, F]`; a group with no rows gets zeros.
  """
  out_dtype = preferred_element_type or jnp.result_type(lhs, grad)
  acc_dtype = jnp.promote_types(out_dtype, jnp.float32)
  masked_lhs = _mask_per_group(lhs, group_sizes)  # [M, E, D]
  masked_grad = _mask_per_group(grad, group_sizes)  # [M, E, F]
  out = jnp.einsum(
    "med,mef->edf",
    masked_lhs,
    masked_grad,
    precision=_PRECISION,
    preferred_element_type=acc_dtype,
  )  # [E, D, F]
  return out.astype(out_dtype)

"""Grouped matmul: the public entry points `gmm` and `tgmm`, backend dispatch, and their VJPs.

A mixture-of-experts layer sorts its tokens by expert, so that expert e owns a contiguous block of
`group_sizes[e]` rows, and then multiplies each block by its own weight matrix:

    out[rows of group e] = lhs[rows of group e] @ rhs[e]        lhs [M, D], rhs [E, D, F] -> [M, F]

`gmm` is that op; `tgmm` is its weight gradient, `d rhs[e] = lhs_e^T @ d out_e` -> [E, D, F].
Several backends implement them (see `_BACKENDS`); every one gives the same numbers up to
floating-point rounding, and all of them return zeros for rows at or past sum(group_sizes).

Differentiation. A backend either is differentiable by plain autodiff (`reference`, and `xla`
through `ragged_dot`'s own rules), or supplies forward kernels only and gets this file's custom
VJP, which needs nothing but those kernels:

    out = gmm(x, w)        ->   dx = gmm(dout, w, transpose_rhs=True),   dw = tgmm(x, dout)
    out = tgmm(x, g)       ->   dx = gmm(g, dout, transpose_rhs=True),   dg = gmm(x, dout)

`gmm_multi(lhs, (rhs_1, ..., rhs_n), group_sizes)` is gmm of one lhs against several weights (a gated
FFN's gate and up). A backend may give fused kernels for it, `gmm_multi` and `gmm_multi_vjp`; the
`blas` backend does (one host callback for all the products, one for all their gradients, each
group's rows read once), and its `gmm_multi_vjp` with one weight is `gmm`'s VJP too. Elsewhere
`gmm_multi` is n calls of `gmm`.

Adding a backend (e.g. a Pallas kernel) is one entry in `_BACKENDS`: its `gmm` and `tgmm` take
`(lhs, rhs_or_grad, group_sizes, *, [transpose_rhs,] preferred_element_type, interpret)`.
"""

import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from moejax.kernels.grouped_matmul import blas, cpu, reference, xla


class Backend(NamedTuple):
  """One implementation of the grouped matmul.

  Attributes:
    gmm: `(lhs [M, D], rhs [E, D, F], group_sizes [E], *, transpose_rhs, preferred_element_type,
      interpret) -> [M, F]`, zero rows past sum(group_sizes). With `transpose_rhs`, rhs is
      `[E, F, D]` and group e uses `rhs[e].T`.
    tgmm: `(lhs [M, D], grad [M, F], group_sizes [E], *, preferred_element_type, interpret)
      -> [E, D, F]`.
    autodiff: True if `gmm` is differentiated by plain autodiff; False to wrap it in the custom
      VJP built from `gmm` and `tgmm` (a kernel with loops or a `pallas_call` needs this).
    gmm_multi: optional `(lhs, rhss, group_sizes, *, preferred_element_type, interpret)` -> one
      output per weight in one kernel call (`gmm_multi`'s forward).
    gmm_multi_vjp: optional `(lhs, rhss, group_sizes, douts) -> (d lhs, d rhss)`, the gradients of
      all of them in one kernel call; with one weight it is also `gmm`'s VJP (it must then equal
      the `gmm` + `tgmm` pair).
  """

  gmm: Callable[..., jax.Array]
  tgmm: Callable[..., jax.Array]
  autodiff: bool
  gmm_multi: Callable[..., tuple[jax.Array, ...]] | None = None
  gmm_multi_vjp: Callable[..., tuple[jax.Array, tuple[jax.Array, ...]]] | None = None


# name -> implementation. "auto" is resolved by `_resolve_backend` and is not an entry.
_BACKENDS: dict[str, Backend] = {
  "reference": Backend(reference.gmm, reference.tgmm, autodiff=True),
  "xla": Backend(xla.gmm, xla.tgmm, autodiff=True),
  "cpu": Backend(cpu.gmm, cpu.tgmm, autodiff=False),
  # One host call for all gradients: each group's rows are read once, while in cache.
  "blas": Backend(
    blas.gmm,
    blas.tgmm,
    autodiff=False,
    gmm_multi=blas.gmm_multi,
    gmm_multi_vjp=blas.gmm_multi_vjp,
  ),
}

BACKENDS: tuple[str, ...] = ("auto", *_BACKENDS)


def _platform(*arrays) -> str:
  """The platform the op will run on, decided at trace time.

  A concrete array knows its devices; under `jit` or `shard_map` the inputs are tracers and the
  default backend is the best information available.
  """
  for x in arrays:
    if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
      platforms = {d.platform for d in x.devices()}
      if len(platforms) == 1:
        return platforms.pop()
  return jax.default_backend()


def _resolve_backend(backend: str, *arrays) -> str:
  if backend == "auto":
    return "blas" if _platform(*arrays) == "cpu" else "xla"
  if backend not in _BACKENDS:
    raise ValueError(f"Unknown grouped-matmul backend={backend!r}; known backends: {BACKENDS}.")
  if backend == "blas" and (platform := _platform(*arrays)) != "cpu":
    raise ValueError(
      f"Grouped-matmul backend='blas' calls the host's BLAS on host buffers, so it runs on CPU "
      f"only; this computation runs on {platform!r}: use backend='auto' or 'xla'."
    )
  return backend


def _to_common_varying_axes(*arrays) -> list[jax.Array]:
  """Inside `shard_map`, casts the arrays to vary over the union of their manual axes.

  A custom VJP must return cotangents typed like its inputs. If rhs is replicated over an axis
  that lhs varies over, d rhs computed per shard varies too; casting rhs to varying *before* the
  op makes JAX transpose that cast into the psum that d rhs needs. No-op outside `shard_map`.
  """
  axes = set(cpu.varying_axes(*arrays))
  return [
    jax.lax.pcast(x, tuple(sorted(axes - set(cpu.varying_axes(x)))), to="varying") for x in arrays
  ]


def _check_group_sizes(fn: str, group_sizes, num_groups: int | None) -> jax.Array:
  """Checks group_sizes is `[E]` integers (E = num_groups when given); returns it as int32."""
  group_sizes = jnp.asarray(group_sizes)
  if group_sizes.ndim != 1 or (num_groups is not None and group_sizes.shape[0] != num_groups):
    expected = "[E]" if num_groups is None else f"[E]=({num_groups},)"
    raise ValueError(f"{fn}: group_sizes must have shape {expected}, got {group_sizes.shape}.")
  if not jnp.issubdtype(group_sizes.dtype, jnp.integer):
    raise ValueError(f"{fn}: group_sizes must be integers, got dtype {group_sizes.dtype}.")
  return group_sizes.astype(jnp.int32)


# ------------------------------------------------------------------------------------------------
# Custom VJPs for backends whose kernels are not differentiable by autodiff.
#
# `backend`, `out_dtype` and `interpret` are static (nondiff_argnums); group_sizes is an integer
# array and gets no cotangent (None).
# ------------------------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _gmm_with_vjp(lhs, rhs, group_sizes, backend, out_dtype, interpret):
  return _BACKENDS[backend].gmm(
    lhs, rhs, group_sizes, preferred_element_type=out_dtype, interpret=interpret
  )


def _gmm_fwd(lhs, rhs, group_sizes, backend, out_dtype, interpret):
  out = _gmm_with_vjp(lhs, rhs, group_sizes, backend, out_dtype, interpret)
  return out, (lhs, rhs, group_sizes)


def _gmm_bwd(backend, out_dtype, interpret, residuals, dout):
  del out_dtype
  lhs, rhs, group_sizes = residuals  # [M, D], [E, D, F], [E]
  kernels = _BACKENDS[backend]
  if kernels.gmm_multi_vjp is not None:
    dlhs, (drhs,) = kernels.gmm_multi_vjp(lhs, (rhs,), group_sizes, (dout,))  # [M, D], [E, D, F]
    return dlhs, drhs, None
  # d lhs[m] = d out[m] @ rhs[g(m)]^T; zero past the groups, like the forward.
  dlhs = kernels.gmm(
    dout,
    rhs,
    group_sizes,
    transpose_rhs=True,
    preferred_element_type=lhs.dtype,
    interpret=interpret,
  )  # [M, D]
  # d rhs[e] = lhs_e^T @ d out_e, accumulated per group in place.
  drhs = kernels.tgmm(
    lhs, dout, group_sizes, preferred_element_type=rhs.dtype, interpret=interpret
  )  # [E, D, F]
  return dlhs, drhs, None


_gmm_with_vjp.defvjp(_gmm_fwd, _gmm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _gmm_multi_with_vjp(lhs, rhss, group_sizes, backend, out_dtype, interpret):
  return _BACKENDS[backend].gmm_multi(
    lhs, rhss, group_sizes, preferred_element_type=out_dtype, interpret=interpret
  )


def _gmm_multi_fwd(lhs, rhss, group_sizes, backend, out_dtype, interpret):
  outs = _gmm_multi_with_vjp(lhs, rhss, group_sizes, backend, out_dtype, interpret)
  return outs, (lhs, rhss, group_sizes)


def _gmm_multi_bwd(backend, out_dtype, interpret, residuals, douts):
  del out_dtype, interpret
  lhs, rhss, group_sizes = residuals  # [M, D], ([E, D, F_i], ...), [E]
  dlhs, drhss = _BACKENDS[backend].gmm_multi_vjp(lhs, rhss, group_sizes, tuple(douts))
  return dlhs, drhss, None


_gmm_multi_with_vjp.defvjp(_gmm_multi_fwd, _gmm_multi_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _tgmm_with_vjp(lhs, grad, group_sizes, backend, out_dtype, interpret):
  return _BACKENDS[backend].tgmm(
    lhs, grad, group_sizes, preferred_element_type=out_dtype, interpret=interpret
  )


def _tgmm_fwd(lhs, grad, group_sizes, backend, out_dtype, interpret):
  out = _tgmm_with_vjp(lhs, grad, group_sizes, backend, out_dtype, interpret)
  return out, (lhs, grad, group_sizes)


def _tgmm_bwd(backend, out_dtype, interpret, residuals, dout):
  del out_dtype
  lhs, grad, group_sizes = residuals  # [M, D], [M, F], [E]
  kernels = _BACKENDS[backend]
  # out[e] = sum_{m in e} outer(lhs[m], grad[m]), so with dout [E, D, F]:
  # d lhs[m] = dout[g(m)] @ grad[m]  and  d grad[m] = lhs[m] @ dout[g(m)].
  dlhs = kernels.gmm(
    grad,
    dout,
    group_sizes,
    transpose_rhs=True,
    preferred_element_type=lhs.dtype,
    interpret=interpret,
  )  # [M, D]
  dgrad = kernels.gmm(
    lhs, dout, group_sizes, preferred_element_type=grad.dtype, interpret=interpret
  )  # [M, F]
  return dlhs, dgrad, None


_tgmm_with_vjp.defvjp(_tgmm_fwd, _tgmm_bwd)


# ------------------------------------------------------------------------------------------------
# Public API.
# ------------------------------------------------------------------------------------------------


def gmm(
  lhs: jax.Array,
  rhs: jax.Array,
  group_sizes: jax.Array,
  *,
  backend: str = "auto",
  interpret: bool = False,
  preferred_element_type=None,
) -> jax.Array:
  """Grouped matmul: row block e of `lhs` times `rhs[e]`.

  Rows of `lhs` are sorted by group: rows [0, group_sizes[0]) belong to group 0, the next
  group_sizes[1] rows to group 1, and so on. Rows at or past sum(group_sizes) belong to no group
  and their output is zero (with every backend).

      sizes = jnp.bincount(expert_ids, length=E)           # [E]
      y = gmm(x_sorted, w_up_edf, sizes)                    # [M, D] x [E, D, F] -> [M, F]

  Differentiable with respect to `lhs` and `rhs`; `group_sizes` is data (may be traced) and gets
  no gradient. Safe under `jit` and `shard_map` (nothing depends on the device count).

  Args:
    lhs: `[M, D]` rows sorted by group.
    rhs: `[E, D, F]` one matrix per group.
    group_sizes: `[E]` integer rows per group, sum <= M.
    backend: one of `BACKENDS`. "auto" is "blas" on a CPU platform (host BLAS GEMMs per
      group, split over the cores, `blas.py`), else "xla" (`ragged_dot`). "cpu" is the same
      loop in XLA dots (no host callback), "reference" the slow masked oracle.
    interpret: run a Pallas backend in interpret mode (ignored by the others).
    preferred_element_type: output dtype, default `lhs.dtype`. Products are accumulated in at
      least float32 (bf16 inputs accumulate in float32).

  Returns:
    `[M, F]` in `preferred_element_type`.

  Raises:
    ValueError: for an unknown backend or inconsistent shapes.
  """
  lhs, rhs = jnp.asarray(lhs), jnp.asarray(rhs)
  if lhs.ndim != 2:
    raise ValueError(f"gmm: lhs must be [M, D], got shape {lhs.shape}.")
  if rhs.ndim != 3:
    raise ValueError(f"gmm: rhs must be [E, D, F], got shape {rhs.shape}.")
  if lhs.shape[1] != rhs.shape[1]:
    raise ValueError(f"gmm: lhs [M, D]={lhs.shape} and rhs [E, D, F]={rhs.shape} disagree on D.")
  group_sizes = _check_group_sizes("gmm", group_sizes, rhs.shape[0])
  name = _resolve_backend(backend, lhs, rhs)
  out_dtype = np.dtype(preferred_element_type or lhs.dtype)
  # One compute dtype for both operands (the cast is differentiable, so gradients come back in
  # each input's own dtype).
  dtype = jnp.result_type(lhs, rhs)
  lhs, rhs = lhs.astype(dtype), rhs.astype(dtype)
  lhs, rhs, group_sizes = _to_common_varying_axes(lhs, rhs, group_sizes)
  with jax.named_scope(f"gmm_{name}"):
    if _BACKENDS[name].autodiff:
      return _BACKENDS[name].gmm(
        lhs, rhs, group_sizes, preferred_element_type=out_dtype, interpret=interpret
      )
    return _gmm_with_vjp(lhs, rhs, group_sizes, name, out_dtype, interpret)


def gmm_multi(
  lhs: jax.Array,
  rhss: Sequence[jax.Array],
  group_sizes: jax.Array,
  *,
  backend: str = "auto",
  interpret: bool = False,
  preferred_element_type=None,
) -> tuple[jax.Array, ...]:
  """`gmm` of one lhs against several weights: `tuple(gmm(lhs, rhs) for rhs in rhss)`.

      gate, up = gmm_multi(x_sorted, (w_gate_edf, w_up_edf), sizes)   # [M, F] each

  The `blas` backend computes all the products in one host call and all their gradients in
  another, reading each group's rows of lhs (and of the output gradients) once while they are in
  cache; other backends call `gmm` once per weight. Arguments as for `gmm`; every rhs is
  `[E, D, F_i]` with lhs's D and the same E (the F_i may differ).
  """
  lhs = jnp.asarray(lhs)
  rhss = tuple(jnp.asarray(w) for w in rhss)
  if not rhss:
    raise ValueError("gmm_multi: rhss must hold at least one [E, D, F] weight, got none.")
  name = _resolve_backend(backend, lhs, *rhss)
  if _BACKENDS[name].gmm_multi is None or len(rhss) == 1:
    return tuple(
      gmm(
        lhs,
        w,
        group_sizes,
        backend=name,
        interpret=interpret,
        preferred_element_type=preferred_element_type,
      )
      for w in rhss
    )
  if lhs.ndim != 2:
    raise ValueError(f"gmm_multi: lhs must be [M, D], got shape {lhs.shape}.")
  for i, w in enumerate(rhss):
    if w.ndim != 3 or w.shape[:2] != (rhss[0].shape[0], lhs.shape[1]):
      raise ValueError(
        f"gmm_multi: rhss[{i}] must be [E, D, F] with E={rhss[0].shape[0]} and lhs's "
        f"D={lhs.shape[1]}, got shape {w.shape}."
      )
  group_sizes = _check_group_sizes("gmm_multi", group_sizes, rhss[0].shape[0])
  out_dtype = np.dtype(preferred_element_type or lhs.dtype)
  dtype = jnp.result_type(lhs, *rhss)
  lhs, *rhss = (x.astype(dtype) for x in (lhs, *rhss))
  lhs, *rhss, group_sizes = _to_common_varying_axes(lhs, *rhss, group_sizes)
  with jax.named_scope(f"gmm_multi_{name}"):
    return _gmm_multi_with_vjp(lhs, tuple(rhss), group_sizes, name, out_dtype, interpret)


def tgmm(
  lhs: jax.Array,
  grad: jax.Array,
  group_sizes: jax.Array,
  num_groups: int | None = None,
  *,
  backend: str = "auto",
  interpret: bool = False,
  preferred_element_type=None,
) -> jax.Array:
  """Transposed grouped matmul: `out[e] = lhs_e^T @ grad_e`, the weight gradient of `gmm`.

      d_w_up_edf = tgmm(x_sorted, d_y, sizes)               # [M, D], [M, F] -> [E, D, F]

  Rows at or past sum(group_sizes) are ignored; a group with no rows gets zeros. Differentiable
  with respect to `lhs` and `grad` for every backend (its VJP is two gmm calls).

  Args:
    lhs: `[M, D]` rows sorted by group.
    grad: `[M, F]` rows in the same order (typically the output gradient of gmm).
    group_sizes: `[E]` integer rows per group, sum <= M.
    num_groups: E; optional, checked against `group_sizes` when given.
    backend: one of `BACKENDS`, as for `gmm`.
    interpret: run a Pallas backend in interpret mode (ignored by the others).
    preferred_element_type: output dtype, default the promoted dtype of lhs and grad.

  Returns:
    `[E, D, F]` in `preferred_element_type`.

  Raises:
    ValueError: for an unknown backend or inconsistent shapes.
  """
  lhs, grad = jnp.asarray(lhs), jnp.asarray(grad)
  if lhs.ndim != 2:
    raise ValueError(f"tgmm: lhs must be [M, D], got shape {lhs.shape}.")
  if grad.ndim != 2 or grad.shape[0] != lhs.shape[0]:
    raise ValueError(
      f"tgmm: grad must be [M, F] with the M of lhs [M, D]={lhs.shape}, got shape {grad.shape}."
    )
  group_sizes = _check_group_sizes("tgmm", group_sizes, num_groups)
  name = _resolve_backend(backend, lhs, grad)
  dtype = jnp.result_type(lhs, grad)
  out_dtype = np.dtype(preferred_element_type or dtype)
  lhs, grad = lhs.astype(dtype), grad.astype(dtype)
  lhs, grad, group_sizes = _to_common_varying_axes(lhs, grad, group_sizes)
  with jax.named_scope(f"tgmm_{name}"):
    return _tgmm_with_vjp(lhs, grad, group_sizes, name, out_dtype, interpret)

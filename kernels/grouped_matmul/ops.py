"""Grouped matmul: the public entry points `gmm` and `tgmm`, backend dispatch, and their VJPs.

A mixture-of-experts layer sorts its tokens by expert, so that expert e owns a contiguous block of
`group_sizes[e]` rows, and then multiplies each block by its own weight matrix:

    out[rows of group e] = lhs[rows of group e] @ rhs[e]        lhs [M, D], rhs [E, D, F] -> [M, F]

`gmm` is that op; `tgmm` is its weight gradient, `d rhs[e] = lhs_e^T @ d out_e` -> [E, D, F].
Several backends implement them (see `_BACKENDS`); every one gives the same numbers up to
floating-point rounding, and all of them return zeros for rows at or past sum(group_sizes).

Backends. `xla` is `jax.lax.ragged_dot`, which TPU and GPU compile to grouped kernels; `blas`
hands each group to the host's BLAS through a buffer callback (CPU only: XLA:CPU lowers ragged_dot
to E times the FLOPs); `reference` is the masked oracle. `auto` is chosen by the platform the
computation is *compiled for*, not by the host that traces it: `jax.lax.platform_dependent` stages
both `blas` and `xla` kernels and lowering keeps only the branch of the target platform, so a
program traced on this CPU host and lowered for a GPU or TPU mesh holds `ragged_dot` and no host
callback, while lowered for CPU it holds the callback and nothing else. The choice is made inside
the custom VJP, on kernels that take and return the same residuals on every platform, so autodiff
never sees the conditional (autodiff of a `platform_dependent` would save the union of both
branches' residuals, zero-filled on the branch not taken). Lowered for several platforms at once
`auto` would need a host callback in a multi-platform module, which `buffer_callback` refuses.

Options. A backend may take options (tile sizes, a thread count, Pallas's `interpret`) through
`options=`, a static mapping; `Backend.options` lists each backend's names with their defaults,
and an unknown name is an error that names the backend and what it allows. `auto` takes the
options of the backends it may pick and hands each the ones it knows.

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
`(lhs, rhs_or_grad, group_sizes, *, [transpose_rhs,] preferred_element_type, **options)`.
"""

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from moejax.kernels.grouped_matmul import blas, reference, xla
from moejax.kernels.grouped_matmul.common import (
  check_group_sizes,
  check_lhs,
  check_rhss,
  to_common_varying_axes,
)

# A backend's options as `ops` hands them around: sorted (name, value) pairs, hashable, so that
# they can be a static argument of the custom VJPs.
Options = tuple[tuple[str, Any], ...]


class Backend(NamedTuple):
  """One implementation of the grouped matmul.

  Attributes:
    gmm: `(lhs [M, D], rhs [E, D, F], group_sizes [E], *, transpose_rhs, preferred_element_type,
      **options) -> [M, F]`, zero rows past sum(group_sizes). With `transpose_rhs`, rhs is
      `[E, F, D]` and group e uses `rhs[e].T`.
    tgmm: `(lhs [M, D], grad [M, F], group_sizes [E], *, preferred_element_type, **options)
      -> [E, D, F]`.
    autodiff: True if `gmm` is differentiated by plain autodiff; False to wrap it in the custom
      VJP built from `gmm` and `tgmm` (a kernel with loops, a callback or a `pallas_call` needs
      this).
    gmm_multi: optional `(lhs, rhss, group_sizes, *, preferred_element_type, **options)` -> one
      output per weight in one kernel call (`gmm_multi`'s forward).
    gmm_multi_vjp: optional `(lhs, rhss, group_sizes, douts, **options) -> (d lhs, d rhss)`, the
      gradients of all of them in one kernel call; with one weight it is also `gmm`'s VJP (it
      must then equal the `gmm` + `tgmm` pair).
    options: the option names the kernels take, with their defaults.
  """

  gmm: Callable[..., jax.Array]
  tgmm: Callable[..., jax.Array]
  autodiff: bool
  gmm_multi: Callable[..., tuple[jax.Array, ...]] | None = None
  gmm_multi_vjp: Callable[..., tuple[jax.Array, tuple[jax.Array, ...]]] | None = None
  options: Mapping[str, Any] = {}


def _gmm_multi_by_gmm(kernels: Backend) -> Callable[..., tuple[jax.Array, ...]]:
  """`gmm_multi` for a backend without one: its `gmm` once per weight."""

  def gmm_multi(lhs, rhss, group_sizes, *, preferred_element_type, **options):
    return tuple(
      kernels.gmm(lhs, w, group_sizes, preferred_element_type=preferred_element_type, **options)
      for w in rhss
    )

  return gmm_multi


def _gmm_multi_vjp_by_kernels(kernels: Backend) -> Callable[..., Any]:
  """`gmm_multi_vjp` for a backend without one: per weight, d lhs_i by `gmm` with rhs_i[e].T
  (summed over i) and d rhs_i by `tgmm`."""

  def gmm_multi_vjp(lhs, rhss, group_sizes, douts, **options):
    dlhs = [
      kernels.gmm(
        dout, w, group_sizes, transpose_rhs=True, preferred_element_type=lhs.dtype, **options
      )
      for w, dout in zip(rhss, douts, strict=True)
    ]  # [M, D] each
    drhss = tuple(
      kernels.tgmm(lhs, dout, group_sizes, preferred_element_type=w.dtype, **options)
      for w, dout in zip(rhss, douts, strict=True)
    )  # [E, D, F_i] each
    return functools.reduce(jnp.add, dlhs), drhss

  return gmm_multi_vjp


def _by_compile_target(cpu: Backend, other: Backend) -> Backend:
  """A backend whose kernels are `cpu`'s when the computation is lowered for CPU and `other`'s
  when lowered for any other platform (`jax.lax.platform_dependent`).

  Both branches are traced; lowering keeps the target platform's only, so the other branch leaves
  nothing in the compiled program. Both are wrapped in the custom VJP (never autodiff through the
  conditional) and so must agree on residuals: `ops`' VJPs save only the op's inputs.
  """
  names = {**other.options, **cpu.options}

  def select(kernel: str, fallback: Callable[[Backend], Callable[..., Any]] | None = None):
    def pick(kernels: Backend, kwargs: dict[str, Any]):
      fn = getattr(kernels, kernel) or fallback(kernels)
      unknown = set(names) - set(kernels.options)  # the other backend's options
      return functools.partial(fn, **{k: v for k, v in kwargs.items() if k not in unknown})

    def run(*arrays, **kwargs):
      return jax.lax.platform_dependent(*arrays, cpu=pick(cpu, kwargs), default=pick(other, kwargs))

    return run

  return Backend(
    gmm=select("gmm"),
    tgmm=select("tgmm"),
    autodiff=False,
    gmm_multi=select("gmm_multi", _gmm_multi_by_gmm),
    gmm_multi_vjp=select("gmm_multi_vjp", _gmm_multi_vjp_by_kernels),
    options=names,
  )


# name -> implementation.
_BACKENDS: dict[str, Backend] = {
  "reference": Backend(reference.gmm, reference.tgmm, autodiff=True),
  "xla": Backend(xla.gmm, xla.tgmm, autodiff=True),
  # One host call for all gradients: each group's rows are read once, while in cache.
  "blas": Backend(
    blas.gmm,
    blas.tgmm,
    autodiff=False,
    gmm_multi=blas.gmm_multi,
    gmm_multi_vjp=blas.gmm_multi_vjp,
    options=blas.OPTIONS,
  ),
}
_BACKENDS = {"auto": _by_compile_target(cpu=_BACKENDS["blas"], other=_BACKENDS["xla"]), **_BACKENDS}

BACKENDS: tuple[str, ...] = tuple(_BACKENDS)


def register_backend(name: str, backend: Backend) -> Backend:
  """Registers a grouped-matmul backend under `name` (`gmm(..., backend=name)`,
  `MoEConfig.gmm_backend=name`); returns it. Registering an existing name replaces it; `auto` is
  not replaceable (it is the compile-target choice between `blas` and `xla`).
  """
  global BACKENDS
  if name == "auto" or not isinstance(name, str) or not name:
    raise ValueError(f"register_backend: name={name!r}; allowed: a non-empty name other than auto")
  if not isinstance(backend, Backend):
    raise TypeError(f"register_backend: backend must be an ops.Backend, got {type(backend)}")
  _BACKENDS[name] = backend
  BACKENDS = tuple(_BACKENDS)
  return backend


def backends() -> tuple[str, ...]:
  """The registered backend names, `auto` first (including those registered after import)."""
  return tuple(_BACKENDS)


def _backend(fn: str, backend: str, options) -> tuple[str, Backend, Options]:
  """(name, kernels, options as sorted pairs) for a public call, each checked.

  `options` is None, a mapping or a tuple of (name, value) pairs; every name must be one the
  backend takes and every value hashable (options are static: they pick the kernel).
  """
  if backend not in _BACKENDS:
    raise ValueError(f"Unknown grouped-matmul backend={backend!r}; known backends: {BACKENDS}.")
  kernels = _BACKENDS[backend]
  if options is None:
    return backend, kernels, ()
  pairs = tuple(options.items()) if isinstance(options, Mapping) else tuple(options)
  if not all(isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) for p in pairs):
    raise ValueError(
      f"{fn}: options={options!r}; allowed: a mapping or a tuple of (name, value) pairs."
    )
  allowed = ", ".join(sorted(kernels.options)) or "none"
  seen = set()
  for name, value in pairs:
    if name not in kernels.options:
      raise ValueError(
        f"{fn}: option {name!r} is not one that backend={backend!r} takes; allowed: {allowed}."
      )
    if name in seen:
      raise ValueError(f"{fn}: option {name!r} is given twice in options={options!r}.")
    seen.add(name)
    try:
      hash(value)
    except TypeError:
      raise ValueError(
        f"{fn}: option {name}={value!r} must be hashable (options are static), e.g. a tuple "
        f"instead of a list."
      ) from None
  return backend, kernels, tuple(sorted(pairs))


def check_options(backend: str, options, where: str = "gmm") -> Options:
  """`options` for `backend` as sorted (name, value) pairs; ValueError naming `where` otherwise.

  For configs that hold a backend and its options (`MoEConfig.gmm_options`), to fail at
  construction rather than at the first trace.
  """
  return _backend(where, backend, options)[2]


# ------------------------------------------------------------------------------------------------
# Custom VJPs for backends whose kernels are not differentiable by autodiff.
#
# `backend`, `out_dtype` and `options` are static (nondiff_argnums); group_sizes is an integer
# array and gets no cotangent (None).
# ------------------------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _gmm_with_vjp(lhs, rhs, group_sizes, backend, out_dtype, options):
  return _BACKENDS[backend].gmm(
    lhs, rhs, group_sizes, preferred_element_type=out_dtype, **dict(options)
  )


def _gmm_fwd(lhs, rhs, group_sizes, backend, out_dtype, options):
  out = _gmm_with_vjp(lhs, rhs, group_sizes, backend, out_dtype, options)
  return out, (lhs, rhs, group_sizes)


def _gmm_bwd(backend, out_dtype, options, residuals, dout):
  del out_dtype
  lhs, rhs, group_sizes = residuals  # [M, D], [E, D, F], [E]
  kernels = _BACKENDS[backend]
  if kernels.gmm_multi_vjp is not None:
    dlhs, (drhs,) = kernels.gmm_multi_vjp(lhs, (rhs,), group_sizes, (dout,), **dict(options))
    return dlhs, drhs, None  # [M, D], [E, D, F]
  # d lhs[m] = d out[m] @ rhs[g(m)]^T; zero past the groups, like the forward.
  # d rhs[e] = lhs_e^T @ d out_e, accumulated per group in place.
  dlhs, (drhs,) = _gmm_multi_vjp_by_kernels(kernels)(
    lhs, (rhs,), group_sizes, (dout,), **dict(options)
  )
  return dlhs, drhs, None


_gmm_with_vjp.defvjp(_gmm_fwd, _gmm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _gmm_multi_with_vjp(lhs, rhss, group_sizes, backend, out_dtype, options):
  kernels = _BACKENDS[backend]
  gmm_multi = kernels.gmm_multi or _gmm_multi_by_gmm(kernels)
  return gmm_multi(lhs, rhss, group_sizes, preferred_element_type=out_dtype, **dict(options))


def _gmm_multi_fwd(lhs, rhss, group_sizes, backend, out_dtype, options):
  outs = _gmm_multi_with_vjp(lhs, rhss, group_sizes, backend, out_dtype, options)
  return outs, (lhs, rhss, group_sizes)


def _gmm_multi_bwd(backend, out_dtype, options, residuals, douts):
  del out_dtype
  lhs, rhss, group_sizes = residuals  # [M, D], ([E, D, F_i], ...), [E]
  kernels = _BACKENDS[backend]
  gmm_multi_vjp = kernels.gmm_multi_vjp or _gmm_multi_vjp_by_kernels(kernels)
  dlhs, drhss = gmm_multi_vjp(lhs, rhss, group_sizes, tuple(douts), **dict(options))
  return dlhs, drhss, None


_gmm_multi_with_vjp.defvjp(_gmm_multi_fwd, _gmm_multi_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _tgmm_with_vjp(lhs, grad, group_sizes, backend, out_dtype, options):
  return _BACKENDS[backend].tgmm(
    lhs, grad, group_sizes, preferred_element_type=out_dtype, **dict(options)
  )


def _tgmm_fwd(lhs, grad, group_sizes, backend, out_dtype, options):
  out = _tgmm_with_vjp(lhs, grad, group_sizes, backend, out_dtype, options)
  return out, (lhs, grad, group_sizes)


def _tgmm_bwd(backend, out_dtype, options, residuals, dout):
  del out_dtype
  lhs, grad, group_sizes = residuals  # [M, D], [M, F], [E]
  kernels = _BACKENDS[backend]
  # out[e] = sum_{m in e} outer(lhs[m], grad[m]), so with dout [E, D, F]:
  # d lhs[m] = dout[g(m)] @ grad[m]  and  d grad[m] = lhs[m] @ dout[g(m)].
  dlhs = kernels.gmm(
    grad, dout, group_sizes, transpose_rhs=True, preferred_element_type=lhs.dtype, **dict(options)
  )  # [M, D]
  dgrad = kernels.gmm(
    lhs, dout, group_sizes, preferred_element_type=grad.dtype, **dict(options)
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
  options: Mapping[str, Any] | Options | None = None,
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
    backend: one of `BACKENDS`. "auto" is "blas" where the computation is compiled for CPU (host
      BLAS GEMMs per group, split over the cores, `blas.py`) and "xla" (`ragged_dot`) where it is
      compiled for anything else; "reference" is the slow masked oracle.
    options: static backend options, a mapping or a tuple of (name, value) pairs, e.g.
      `{"threads": 1}` for "blas" (see `Backend.options`; "xla" and "reference" take none).
    preferred_element_type: output dtype, default `lhs.dtype`. Products are accumulated in at
      least float32 (bf16 inputs accumulate in float32).

  Returns:
    `[M, F]` in `preferred_element_type`.

  Raises:
    ValueError: for an unknown backend or option, or inconsistent shapes; when lowered, for
      "blas" on a platform other than CPU.
  """
  lhs, rhs = jnp.asarray(lhs), jnp.asarray(rhs)
  check_lhs("gmm", lhs)
  check_rhss("gmm", lhs, (rhs,))
  group_sizes = check_group_sizes("gmm", group_sizes, rhs.shape[0])
  name, kernels, options = _backend("gmm", backend, options)
  out_dtype = np.dtype(preferred_element_type or lhs.dtype)
  # One compute dtype for both operands (the cast is differentiable, so gradients come back in
  # each input's own dtype).
  dtype = jnp.result_type(lhs, rhs)
  lhs, rhs = lhs.astype(dtype), rhs.astype(dtype)
  lhs, rhs, group_sizes = to_common_varying_axes(lhs, rhs, group_sizes)
  with jax.named_scope(f"gmm_{name}"):
    if kernels.autodiff:
      return kernels.gmm(lhs, rhs, group_sizes, preferred_element_type=out_dtype, **dict(options))
    return _gmm_with_vjp(lhs, rhs, group_sizes, name, out_dtype, options)


def gmm_multi(
  lhs: jax.Array,
  rhss: Sequence[jax.Array],
  group_sizes: jax.Array,
  *,
  backend: str = "auto",
  options: Mapping[str, Any] | Options | None = None,
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
  name, kernels, options = _backend("gmm_multi", backend, options)
  if kernels.autodiff or len(rhss) == 1:
    return tuple(
      gmm(
        lhs,
        w,
        group_sizes,
        backend=name,
        options=options,
        preferred_element_type=preferred_element_type,
      )
      for w in rhss
    )
  check_lhs("gmm_multi", lhs)
  check_rhss("gmm_multi", lhs, rhss)
  group_sizes = check_group_sizes("gmm_multi", group_sizes, rhss[0].shape[0])
  out_dtype = np.dtype(preferred_element_type or lhs.dtype)
  dtype = jnp.result_type(lhs, *rhss)
  lhs, *rhss = (x.astype(dtype) for x in (lhs, *rhss))
  lhs, *rhss, group_sizes = to_common_varying_axes(lhs, *rhss, group_sizes)
  with jax.named_scope(f"gmm_multi_{name}"):
    return _gmm_multi_with_vjp(lhs, tuple(rhss), group_sizes, name, out_dtype, options)


def tgmm(
  lhs: jax.Array,
  grad: jax.Array,
  group_sizes: jax.Array,
  num_groups: int | None = None,
  *,
  backend: str = "auto",
  options: Mapping[str, Any] | Options | None = None,
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
    options: static backend options, as for `gmm`.
    preferred_element_type: output dtype, default the promoted dtype of lhs and grad.

  Returns:
    `[E, D, F]` in `preferred_element_type`.

  Raises:
    ValueError: for an unknown backend or option, or inconsistent shapes.
  """
  lhs, grad = jnp.asarray(lhs), jnp.asarray(grad)
  check_lhs("tgmm", lhs)
  if grad.ndim != 2 or grad.shape[0] != lhs.shape[0]:
    raise ValueError(
      f"tgmm: grad must be [M, F] with the M of lhs [M, D]={lhs.shape}, got shape {grad.shape}."
    )
  group_sizes = check_group_sizes("tgmm", group_sizes, num_groups)
  name, _, options = _backend("tgmm", backend, options)
  dtype = jnp.result_type(lhs, grad)
  out_dtype = np.dtype(preferred_element_type or dtype)
  lhs, grad = lhs.astype(dtype), grad.astype(dtype)
  lhs, grad, group_sizes = to_common_varying_axes(lhs, grad, group_sizes)
  with jax.named_scope(f"tgmm_{name}"):
    return _tgmm_with_vjp(lhs, grad, group_sizes, name, out_dtype, options)

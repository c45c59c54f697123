"""Tests for moejax.kernels.gmm / tgmm: every backend against a float64 numpy loop and the oracle.

Tolerances (errors are measured relative to the largest |expected| entry, so that a near-zero
entry does not blow the measure up):
  float32:  1e-5. Inputs are O(1) and every sum has at most 50 terms, so float32 rounding is
            ~1e-7 relative; 1e-5 still catches any wrong row, group or transpose (O(1) errors).
  bfloat16: inputs are rounded to bf16 first and the float64 expectation is computed from the
            rounded values, so the only error left is the output rounding. Accumulating in float32
            then rounding once keeps every entry within half a bf16 ulp (2^-9 relative); the checks
            allow one ulp (2^-8).
"""

import functools
import os
import threading
import time
import warnings

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import moejax.kernels
from moejax.kernels import gmm, gmm_multi, tgmm
from moejax.kernels.grouped_matmul import blas

BACKENDS = ("reference", "xla", "blas")
# The backends whose kernels run under the custom VJP, which shard_map must type correctly
# ("auto" also runs its kernels inside a platform-dependent conditional).
VJP_BACKENDS = ("blas", "auto")
F32_TOL = 1e-5

# (M, D, F, group_sizes). M is never a multiple of a block size; D and F are unequal so a
# transposed operand cannot pass by accident.
CASES = {
  "ragged_with_empty_and_trailing_rows": (37, 24, 40, (10, 0, 20)),
  "one_group_all_rows": (29, 24, 40, (29,)),
  "one_group_no_rows": (13, 24, 40, (0,)),
  "eight_groups_ragged": (50, 16, 24, (0, 7, 0, 13, 1, 0, 22, 0)),
  "eight_groups_all_rows_in_last": (50, 16, 24, (0, 0, 0, 0, 0, 0, 0, 50)),
}

# The fast tier's shapes: ragged groups with empty ones and rows past them, and (blas) the tall case
# whose gradient is sliced along D. The one-group and all-rows-in-the-last-group shapes run in the
# slow tier (test_layer.py's all-tokens-on-one-expert tests cover that edge in the fast one).
FAST_CASES = ("ragged_with_empty_and_trailing_rows", "eight_groups_ragged", "tall")


def _cases(names):
  return [n if n in FAST_CASES else pytest.param(n, marks=pytest.mark.slow) for n in names]


# blas options that cut even these small shapes over `threads` threads.
def _split(threads):
  return {"threads": threads, "min_part_flops": 1}


def _numpy_gmm(lhs, rhs, group_sizes):
  """float64 per-group loop: the contract written as plainly as possible."""
  lhs, rhs = np.asarray(lhs, np.float64), np.asarray(rhs, np.float64)
  out = np.zeros((lhs.shape[0], rhs.shape[2]))
  start = 0
  for e, size in enumerate(np.asarray(group_sizes)):
    out[start : start + size] = lhs[start : start + size] @ rhs[e]
    start += size
  return out


def _numpy_tgmm(lhs, grad, group_sizes):
  lhs, grad = np.asarray(lhs, np.float64), np.asarray(grad, np.float64)
  sizes = np.asarray(group_sizes)
  out = np.zeros((len(sizes), lhs.shape[1], grad.shape[1]))
  start = 0
  for e, size in enumerate(sizes):
    out[e] = lhs[start : start + size].T @ grad[start : start + size]
    start += size
  return out


def _numpy_gmm_vjp(lhs, rhs, group_sizes, dout):
  """Gradients of sum(gmm(lhs, rhs) * dout) w.r.t. lhs and rhs, per group in float64."""
  rhs64 = np.asarray(rhs, np.float64)
  dlhs = _numpy_gmm(dout, np.swapaxes(rhs64, 1, 2), group_sizes)
  return dlhs, _numpy_tgmm(lhs, dout, group_sizes)


def _assert_numpy_gmm_and_grads(out, dlhs, drhs, lhs, rhs, sizes, dout):
  """out, d lhs and d rhs equal the float64 per-group loop; rows past the groups are exactly 0."""
  np_dlhs, np_drhs = _numpy_gmm_vjp(lhs, rhs, sizes, dout)
  assert _rel_err(out, _numpy_gmm(lhs, rhs, sizes)) < F32_TOL
  assert _rel_err(dlhs, np_dlhs) < F32_TOL
  assert _rel_err(drhs, np_drhs) < F32_TOL
  np.testing.assert_array_equal(out[sum(sizes) :], 0.0)


def _rel_err(actual, expected):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, (actual.shape, expected.shape)
  return np.max(np.abs(actual - expected), initial=0.0) / max(
    np.max(np.abs(expected), initial=0.0), 1e-30
  )


def _inputs(m, d, f, group_sizes, dtype=jnp.float32, seed=0):
  rng = np.random.default_rng(seed)
  lhs = jnp.asarray(rng.normal(size=(m, d)), dtype)
  rhs = jnp.asarray(rng.normal(size=(len(group_sizes), d, f)), dtype)
  dout = jnp.asarray(rng.normal(size=(m, f)), dtype)
  return lhs, rhs, jnp.asarray(group_sizes, jnp.int32), dout


def _gmm_and_grads(backend, lhs, rhs, group_sizes, dout, **kwargs):
  """(out, dlhs, drhs) under jit, with group_sizes a traced argument."""

  @jax.jit
  def run(lhs, rhs, group_sizes, dout):
    out, vjp = jax.vjp(lambda x, w: gmm(x, w, group_sizes, backend=backend, **kwargs), lhs, rhs)
    return (out, *vjp(dout))

  return run(lhs, rhs, group_sizes, dout)


@functools.cache
def _reference_gmm_and_grads(case):
  return _gmm_and_grads("reference", *_inputs(*CASES[case]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", _cases(CASES))
def test_gmm_forward_and_grads_match_numpy_and_reference(backend, case):
  m, d, f, sizes = CASES[case]
  lhs, rhs, group_sizes, dout = _inputs(m, d, f, sizes)
  out, dlhs, drhs = _gmm_and_grads(backend, lhs, rhs, group_sizes, dout)
  ref_out, ref_dlhs, ref_drhs = _reference_gmm_and_grads(case)
  np_dlhs, np_drhs = _numpy_gmm_vjp(lhs, rhs, sizes, dout)

  assert out.shape == (m, f) and out.dtype == jnp.float32
  assert dlhs.shape == lhs.shape and drhs.shape == rhs.shape
  assert _rel_err(out, _numpy_gmm(lhs, rhs, sizes)) < F32_TOL
  assert _rel_err(dlhs, np_dlhs) < F32_TOL
  assert _rel_err(drhs, np_drhs) < F32_TOL
  assert _rel_err(out, ref_out) < F32_TOL
  assert _rel_err(dlhs, ref_dlhs) < F32_TOL
  assert _rel_err(drhs, ref_drhs) < F32_TOL
  # Rows past the groups: exactly zero output and exactly zero lhs gradient.
  total = sum(sizes)
  np.testing.assert_array_equal(out[total:], 0.0)
  np.testing.assert_array_equal(dlhs[total:], 0.0)
  # A group with no rows gets an exactly zero weight gradient.
  for e, size in enumerate(sizes):
    if size == 0:
      np.testing.assert_array_equal(drhs[e], 0.0)


_BLAS_JIT_SHAPE = (29, 8, 12, 5)  # M, D, F, E for the property test below


@functools.cache
def _blas_jitted():
  options = _split(3)
  return jax.jit(
    lambda lhs, rhs, grad, gs: (
      gmm(lhs, rhs, gs, backend="blas", options=options),
      tgmm(lhs, grad, gs, backend="blas", options=options),
    )
  )


@hypothesis.settings(max_examples=25, deadline=None, derandomize=True)
@hypothesis.given(st.lists(st.integers(0, 12), min_size=5, max_size=5), st.integers(0, 2**31 - 1))
def test_blas_random_group_sizes(raw_sizes, seed):
  """Any split of at most M rows into E groups, including empty groups and trailing rows, cut
  over three threads (row shares and gradient slices that straddle groups)."""
  m, d, f, e = _BLAS_JIT_SHAPE
  sizes = list(raw_sizes)
  while sum(sizes) > m:  # shrink to sum <= M, keeping zeros where they are
    sizes[int(np.argmax(sizes))] -= 1
  lhs, rhs, group_sizes, _ = _inputs(m, d, f, sizes, seed=seed % 1000)
  grad = jnp.asarray(np.random.default_rng(seed % 1000).standard_normal((m, f)), jnp.float32)
  out, dw = _blas_jitted()(lhs, rhs, grad, group_sizes)  # one compilation: group_sizes is data
  assert _rel_err(out, _numpy_gmm(lhs, rhs, sizes)) < F32_TOL
  np.testing.assert_array_equal(out[sum(sizes) :], 0.0)
  assert _rel_err(dw, _numpy_tgmm(lhs, grad, sizes)) < F32_TOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_group_sizes_are_data_not_static(backend):
  """One jitted function, two different splits of the rows: both must be right."""
  m, d, f, _ = CASES["ragged_with_empty_and_trailing_rows"]
  lhs, rhs, _, _ = _inputs(m, d, f, (0, 0, 0))
  traces = []

  @jax.jit
  def fn(lhs, rhs, group_sizes):
    traces.append(group_sizes)
    return gmm(lhs, rhs, group_sizes, backend=backend)

  for sizes in [(10, 0, 20), (20, 17, 0)]:
    out = fn(lhs, rhs, jnp.asarray(sizes, jnp.int32))
    assert _rel_err(out, _numpy_gmm(lhs, rhs, sizes)) < F32_TOL
  assert len(traces) == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_bfloat16_rounds_once(backend):
  m, d, f, sizes = CASES["eight_groups_ragged"]
  lhs, rhs, group_sizes, dout = _inputs(m, d, f, sizes, dtype=jnp.bfloat16)
  out, dlhs, drhs = _gmm_and_grads(backend, lhs, rhs, group_sizes, dout)
  assert out.dtype == dlhs.dtype == drhs.dtype == jnp.bfloat16
  expected = _numpy_gmm(lhs, rhs, sizes)
  # Within one bf16 ulp (2^-8 relative) of the exact product of the bf16 inputs, entry by entry.
  np.testing.assert_array_less(
    np.abs(np.asarray(out, np.float64) - expected), 2.0**-8 * np.abs(expected) + 1e-6
  )
  np_dlhs, np_drhs = _numpy_gmm_vjp(lhs, rhs, sizes, dout)
  # Gradients: one rounding of a float32 accumulation too; measured against the largest entry.
  assert _rel_err(dlhs, np_dlhs) < 2.0**-8
  assert _rel_err(drhs, np_drhs) < 2.0**-8


@pytest.mark.parametrize("backend", BACKENDS)
def test_bfloat16_inputs_float32_output_accumulates_in_float32(backend):
  m, d, f, sizes = CASES["eight_groups_ragged"]
  lhs, rhs, group_sizes, dout = _inputs(m, d, f, sizes, dtype=jnp.bfloat16)
  out, dlhs, drhs = _gmm_and_grads(
    backend,
    lhs,
    rhs,
    group_sizes,
    dout.astype(jnp.float32),
    preferred_element_type=jnp.float32,
  )
  assert out.dtype == jnp.float32
  assert dlhs.dtype == drhs.dtype == jnp.bfloat16  # gradients come back in the inputs' dtype
  # Products of bf16 values are exact in float32, so only float32 summation error remains.
  assert _rel_err(out, _numpy_gmm(lhs, rhs, sizes)) < F32_TOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_past_groups_are_ignored_even_if_not_finite(backend):
  m, d, f, sizes = CASES["ragged_with_empty_and_trailing_rows"]
  lhs, rhs, group_sizes, dout = _inputs(m, d, f, sizes)
  total = sum(sizes)
  # Garbage in the unused rows of a dispatch buffer must not leak into any result.
  lhs = lhs.at[total:].set(jnp.nan)
  out, dlhs, drhs = _gmm_and_grads(backend, lhs, rhs, group_sizes, dout)
  np_dlhs, np_drhs = _numpy_gmm_vjp(lhs[:total], rhs, sizes, dout[:total])
  np.testing.assert_array_equal(out[total:], 0.0)
  np.testing.assert_array_equal(dlhs[total:], 0.0)
  assert _rel_err(out[:total], _numpy_gmm(lhs[:total], rhs, sizes)) < F32_TOL
  assert _rel_err(dlhs[:total], np_dlhs) < F32_TOL
  assert _rel_err(drhs, np_drhs) < F32_TOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_tgmm_matches_numpy(backend):
  m, d, f, sizes = CASES["eight_groups_ragged"]
  lhs, _, group_sizes, grad = _inputs(m, d, f, sizes)
  # Rows past the groups are ignored, even when they hold garbage.
  total = sum(sizes)
  lhs, grad = lhs.at[total:].set(jnp.nan), grad.at[total:].set(jnp.inf)
  out = jax.jit(functools.partial(tgmm, num_groups=len(sizes), backend=backend))(
    lhs, grad, group_sizes
  )
  assert out.shape == (len(sizes), d, f) and out.dtype == jnp.float32
  assert _rel_err(out, _numpy_tgmm(lhs[:total], grad[:total], sizes)) < F32_TOL
  for e, size in enumerate(sizes):
    if size == 0:
      np.testing.assert_array_equal(out[e], 0.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tgmm_grads_match_numpy(backend):
  """tgmm's own VJP (two gmm calls): d lhs[m] = dout[g] @ grad[m], d grad[m] = lhs[m] @ dout[g]."""
  m, d, f, sizes = CASES["ragged_with_empty_and_trailing_rows"]
  lhs, _, group_sizes, grad = _inputs(m, d, f, sizes)
  dout = jnp.asarray(np.random.default_rng(2).normal(size=(len(sizes), d, f)), jnp.float32)

  @jax.jit
  def tgmm_vjp(lhs, grad, group_sizes, dout):
    _, vjp = jax.vjp(lambda x, g: tgmm(x, g, group_sizes, backend=backend), lhs, grad)
    return vjp(dout)

  dlhs, dgrad = tgmm_vjp(lhs, grad, group_sizes, dout)
  assert _rel_err(dlhs, _numpy_gmm(grad, np.swapaxes(np.asarray(dout), 1, 2), sizes)) < F32_TOL
  assert _rel_err(dgrad, _numpy_gmm(lhs, dout, sizes)) < F32_TOL


def test_auto_backend_runs_eagerly_and_matches_blas():
  """Eager calls resolve "auto" on the platform they run on: here CPU, so the blas numbers."""
  m, d, f, sizes = CASES["ragged_with_empty_and_trailing_rows"]
  lhs, rhs, group_sizes, dout = _inputs(m, d, f, sizes)
  out = gmm(lhs, rhs, group_sizes)
  assert _rel_err(out, _numpy_gmm(lhs, rhs, sizes)) < F32_TOL
  np.testing.assert_array_equal(out, gmm(lhs, rhs, group_sizes, backend="blas"))
  auto = _gmm_and_grads("auto", lhs, rhs, group_sizes, dout)
  for a, b in zip(auto, _gmm_and_grads("blas", lhs, rhs, group_sizes, dout), strict=True):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("backend", VJP_BACKENDS)
def test_gmm_under_shard_map(backend):
  """Each device holds its own rows and its own group sizes; nothing assumes a global view."""
  devices = np.array(jax.devices())
  n, (m, d, f, sizes) = len(devices), CASES["ragged_with_empty_and_trailing_rows"]
  mesh = jax.sharding.Mesh(devices, ("x",))
  rng = np.random.default_rng(3)
  lhs = jnp.asarray(rng.normal(size=(n * m, d)), jnp.float32)
  rhs = jnp.asarray(rng.normal(size=(len(sizes), d, f)), jnp.float32)
  shard_sizes = np.stack([np.roll(sizes, i) for i in range(n)]).astype(np.int32)  # [n, E]
  spec = jax.sharding.PartitionSpec

  @jax.jit
  @functools.partial(
    jax.shard_map, mesh=mesh, in_specs=(spec("x"), spec(), spec("x")), out_specs=spec("x")
  )
  def sharded_loss_grads(x, w, gs):
    loss = lambda x, w: jnp.sum(gmm(x, w, gs[0], backend=backend) ** 2)
    dx, dw = jax.grad(loss, argnums=(0, 1))(x, w)
    return gmm(x, w, gs[0], backend=backend), dx, dw[None]

  out, dx, dw = sharded_loss_grads(lhs, rhs, jnp.asarray(shard_sizes))
  np_dw_total = 0.0
  for i in range(n):
    rows = slice(i * m, (i + 1) * m)
    expected = _numpy_gmm(lhs[rows], rhs, shard_sizes[i])
    np_dx, np_dw = _numpy_gmm_vjp(lhs[rows], rhs, shard_sizes[i], 2 * expected)
    np_dw_total = np_dw_total + np_dw
    assert _rel_err(out[rows], expected) < F32_TOL
    assert _rel_err(dx[rows], np_dx) < F32_TOL
  # rhs is replicated, so its gradient is the sum over the shards, the same on every device.
  for i in range(n):
    assert _rel_err(dw[i], np_dw_total) < F32_TOL


@pytest.mark.parametrize("backend", VJP_BACKENDS)
def test_gmm_under_shard_map_with_sharded_weights(backend):
  """Tensor-parallel layout: lhs replicated, rhs split along F. d lhs must be summed over shards."""
  devices = np.array(jax.devices())
  mesh = jax.sharding.Mesh(devices, ("x",))
  m, d, _, sizes = CASES["ragged_with_empty_and_trailing_rows"]
  f = 5 * len(devices)
  lhs, rhs, group_sizes, _ = _inputs(m, d, f, sizes, seed=4)
  spec = jax.sharding.PartitionSpec

  @jax.jit
  @functools.partial(
    jax.shard_map,
    mesh=mesh,
    in_specs=(spec(), spec(None, None, "x"), spec()),
    out_specs=(spec(None, "x"), spec(), spec(None, None, "x")),
  )
  def sharded_loss_grads(x, w, gs):
    loss = lambda x, w: jnp.sum(gmm(x, w, gs, backend=backend) ** 2)
    return gmm(x, w, gs, backend=backend), *jax.grad(loss, argnums=(0, 1))(x, w)

  out, dx, dw = sharded_loss_grads(lhs, rhs, group_sizes)
  expected = _numpy_gmm(lhs, rhs, sizes)
  np_dx, np_dw = _numpy_gmm_vjp(lhs, rhs, sizes, 2 * expected)
  assert _rel_err(out, expected) < F32_TOL
  assert _rel_err(dx, np_dx) < F32_TOL
  assert _rel_err(dw, np_dw) < F32_TOL


def test_unknown_backend_is_named():
  lhs, rhs, group_sizes, grad = _inputs(4, 3, 2, (2, 2))
  with pytest.raises(ValueError, match=r"backend='pallas_cpu'.*'auto'.*'blas'"):
    gmm(lhs, rhs, group_sizes, backend="pallas_cpu")
  with pytest.raises(ValueError, match=r"backend='nope'"):
    tgmm(lhs, grad, group_sizes, backend="nope")


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_blas_off_cpu_is_refused(platform):
  """The host callback reads host memory: lowered for an accelerator, it says so, naming the
  argument, while "auto" lowers to ragged_dot there."""
  lhs, rhs, group_sizes, grad = _inputs(4, 3, 2, (2, 2))
  message = rf"backend='blas'.*CPU only.*'{platform}'.*backend='auto'"
  for fn, args in [(gmm, (lhs, rhs, group_sizes)), (tgmm, (lhs, grad, group_sizes))]:
    traced = jax.jit(functools.partial(fn, backend="blas")).trace(*args)
    with pytest.raises(ValueError, match=message):
      traced.lower(lowering_platforms=(platform,))
    auto = jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()
    assert "ragged_dot" in auto and "callback" not in auto


@pytest.mark.parametrize("backend", ["auto", "blas"])
def test_options_name_the_option_backend_and_allowed(backend):
  lhs, rhs, group_sizes, grad = _inputs(4, 3, 2, (2, 2))
  allowed = r"allowed: min_part_flops, threads"
  with pytest.raises(ValueError, match=rf"gmm: option 'block_m'.*backend='{backend}'.*{allowed}"):
    gmm(lhs, rhs, group_sizes, backend=backend, options={"block_m": 8})
  with pytest.raises(ValueError, match=r"tgmm: option 'tile'.*backend='xla'.*allowed: none"):
    tgmm(lhs, grad, group_sizes, backend="xla", options=(("tile", 8),))
  with pytest.raises(ValueError, match=r"option threads=0; allowed: an int >= 1, or None"):
    gmm(lhs, rhs, group_sizes, backend=backend, options={"threads": 0})
  with pytest.raises(ValueError, match=r"option min_part_flops=\[1\] must be hashable"):
    gmm_multi(lhs, (rhs, rhs), group_sizes, backend=backend, options={"min_part_flops": [1]})
  with pytest.raises(ValueError, match=r"options=\['threads'\]; allowed: a mapping or a tuple"):
    gmm(lhs, rhs, group_sizes, backend=backend, options=["threads"])


@pytest.mark.parametrize(
  ("lhs_shape", "rhs_shape", "sizes_shape", "message"),
  [
    ((4,), (2, 3, 5), (2,), r"lhs must be \[M, D\], got shape \(4,\)"),
    ((4, 3), (3, 5), (2,), r"rhs must be \[E, D, F\], got shape \(3, 5\)"),
    ((4, 3), (2, 4, 5), (2,), r"lhs \[M, D\]=\(4, 3\) and rhs \[E, D, F\]=\(2, 4, 5\)"),
    ((4, 3), (2, 3, 5), (3,), r"group_sizes must have shape \[E\]=\(2,\), got \(3,\)"),
    ((4, 3), (2, 3, 5), (1, 2), r"group_sizes must have shape \[E\]=\(2,\), got \(1, 2\)"),
  ],
)
def test_gmm_shape_errors(lhs_shape, rhs_shape, sizes_shape, message):
  with pytest.raises(ValueError, match=message):
    gmm(jnp.zeros(lhs_shape), jnp.zeros(rhs_shape), jnp.zeros(sizes_shape, jnp.int32))


def test_tgmm_and_dtype_errors():
  lhs, _, group_sizes, grad = _inputs(4, 3, 2, (2, 2))
  with pytest.raises(ValueError, match=r"grad must be \[M, F\].*got shape \(5, 2\)"):
    tgmm(lhs, jnp.zeros((5, 2)), group_sizes)
  with pytest.raises(ValueError, match=r"group_sizes must have shape \[E\]=\(3,\), got \(2,\)"):
    tgmm(lhs, grad, group_sizes, num_groups=3)
  with pytest.raises(ValueError, match=r"group_sizes must be integers"):
    gmm(lhs, jnp.zeros((2, 3, 2)), jnp.asarray([2.0, 2.0]))


# (M, D, F, group_sizes) with D > F, so tgmm slices its gradient along D, not F.
BLAS_TALL_CASE = (45, 40, 24, (0, 17, 3, 0, 20))


@pytest.mark.parametrize("threads", [2, 3, 7])
@pytest.mark.parametrize("case", _cases([*CASES, "tall"]))
def test_blas_split_over_threads_matches_numpy(case, threads):
  """Every way the host kernels cut a call across threads (row shares that straddle groups, more
  threads than rows, gradient slices along D or F) gives the per-group products."""
  m, d, f, sizes = BLAS_TALL_CASE if case == "tall" else CASES[case]
  lhs, rhs, group_sizes, dout = _inputs(m, d, f, sizes, seed=threads)
  out, dlhs, drhs = _gmm_and_grads("blas", lhs, rhs, group_sizes, dout, options=_split(threads))
  _assert_numpy_gmm_and_grads(out, dlhs, drhs, lhs, rhs, sizes, dout)
  for e, size in enumerate(sizes):
    if size == 0:
      np.testing.assert_array_equal(drhs[e], 0.0)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("case", _cases([*CASES, "tall"]))
def test_blas_one_call_vjp_equals_the_two_kernels(case, threads):
  """`blas.gmm_multi_vjp` with one weight (the VJP `ops.gmm` uses for this backend) gives the
  numbers of gmm(dout, rhs, transpose_rhs=True) and tgmm(lhs, dout) bit for bit, on one thread
  (each group's two GEMMs back to back) and cut over several, with empty groups, one full group
  and rows past the groups; and both equal the float64 per-group gradients."""
  split = _split(threads)  # even these small shapes
  m, d, f, sizes = BLAS_TALL_CASE if case == "tall" else CASES[case]
  lhs, rhs, group_sizes, dout = _inputs(m, d, f, sizes, seed=20 + threads)
  dlhs, (drhs,) = jax.jit(
    lambda lhs, rhs, gs, dout: blas.gmm_multi_vjp(lhs, (rhs,), gs, (dout,), **split)
  )(lhs, rhs, group_sizes, dout)
  two = jax.jit(
    lambda lhs, rhs, gs, dout: (
      blas.gmm(dout, rhs, gs, transpose_rhs=True, **split),
      blas.tgmm(lhs, dout, gs, **split),
    )
  )(lhs, rhs, group_sizes, dout)
  np.testing.assert_array_equal(dlhs, two[0])
  np.testing.assert_array_equal(drhs, two[1])
  np_dlhs, np_drhs = _numpy_gmm_vjp(lhs, rhs, sizes, dout)
  assert _rel_err(dlhs, np_dlhs) < F32_TOL and _rel_err(drhs, np_drhs) < F32_TOL
  np.testing.assert_array_equal(dlhs[sum(sizes) :], 0.0)
  for e, size in enumerate(sizes):
    if size == 0:
      np.testing.assert_array_equal(drhs[e], 0.0)
  # The custom VJP of `gmm` goes through it.
  grads = _gmm_and_grads("blas", lhs, rhs, group_sizes, dout, options=split)[1:]
  np.testing.assert_array_equal(grads[0], dlhs)
  np.testing.assert_array_equal(grads[1], drhs)


def _gmm_multi_and_grads(backend, lhs, rhss, group_sizes, douts, options=None):
  """(outs, dlhs, drhss) of gmm_multi under jit, with group_sizes a traced argument."""

  @jax.jit
  def run(lhs, rhss, group_sizes, douts):
    multi = lambda x, ws: gmm_multi(x, ws, group_sizes, backend=backend, options=options)
    outs, vjp = jax.vjp(multi, lhs, rhss)
    return (outs, *vjp(douts))

  return run(lhs, rhss, group_sizes, douts)


@pytest.mark.parametrize(
  ("backend", "threads"), [(b, None) for b in (*BACKENDS, "auto")] + [("blas", 1), ("blas", 3)]
)
@pytest.mark.parametrize("case", _cases([*CASES, "tall"]))
def test_gmm_multi_matches_numpy(backend, threads, case):
  """gmm_multi against two weights of different widths: each output and every gradient (d lhs
  sums both weights' contributions) equal the float64 per-group loop, on every backend and, for
  blas, on one thread and cut over three; rows past the groups and empty groups give zeros."""
  m, d, f, sizes = BLAS_TALL_CASE if case == "tall" else CASES[case]
  lhs, rhs1, group_sizes, dout1 = _inputs(m, d, f, sizes, seed=31)
  _, rhs2, _, dout2 = _inputs(m, d, f + 5, sizes, seed=32)
  (out1, out2), dlhs, (drhs1, drhs2) = _gmm_multi_and_grads(
    backend, lhs, (rhs1, rhs2), group_sizes, (dout1, dout2), options=threads and _split(threads)
  )
  np_dlhs1, np_drhs1 = _numpy_gmm_vjp(lhs, rhs1, sizes, dout1)
  np_dlhs2, np_drhs2 = _numpy_gmm_vjp(lhs, rhs2, sizes, dout2)
  assert _rel_err(out1, _numpy_gmm(lhs, rhs1, sizes)) < F32_TOL
  assert _rel_err(out2, _numpy_gmm(lhs, rhs2, sizes)) < F32_TOL
  assert _rel_err(dlhs, np_dlhs1 + np_dlhs2) < F32_TOL
  assert _rel_err(drhs1, np_drhs1) < F32_TOL
  assert _rel_err(drhs2, np_drhs2) < F32_TOL
  total = sum(sizes)
  for a in (out1, out2, dlhs):
    np.testing.assert_array_equal(a[total:], 0.0)
  for e, size in enumerate(sizes):
    if size == 0:
      np.testing.assert_array_equal(drhs1[e], 0.0)
      np.testing.assert_array_equal(drhs2[e], 0.0)


def test_gmm_multi_errors_name_the_argument():
  lhs = jnp.zeros((6, 4))
  sizes = jnp.asarray([3, 3])
  with pytest.raises(ValueError, match=r"rhss must hold at least one"):
    gmm_multi(lhs, (), sizes, backend="blas")
  with pytest.raises(ValueError, match=r"rhss\[1\] must be \[E, D, F\] with E=2 and lhs's D=4"):
    gmm_multi(lhs, (jnp.zeros((2, 4, 3)), jnp.zeros((2, 5, 3))), sizes, backend="blas")


def test_blas_restores_the_blas_thread_count():
  """The kernels run each GEMM on one BLAS thread and hand the previous counts back after."""
  import threadpoolctl

  def counts():
    return [
      lib["num_threads"] for lib in threadpoolctl.threadpool_info() if lib["user_api"] == "blas"
    ]

  with threadpoolctl.threadpool_limits(2, user_api="blas"):
    before = counts()
    lhs, rhs, group_sizes, dout = _inputs(*CASES["ragged_with_empty_and_trailing_rows"])
    jax.block_until_ready(_gmm_and_grads("blas", lhs, rhs, group_sizes, dout))
    assert counts() == before


def test_blas_forked_child_closes_the_scope():
  """A child forked while a call holds BLAS at one thread gets the parent's counts back and no open
  scope (the calls that would close it stay in the parent)."""
  import threadpoolctl

  def counts():
    return [
      lib["num_threads"] for lib in threadpoolctl.threadpool_info() if lib["user_api"] == "blas"
    ]

  with threadpoolctl.threadpool_limits(2, user_api="blas"):
    before = counts()
    with blas._single_threaded_blas:
      assert set(counts()) == {1}
      with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # JAX warns about fork with its threads
        pid = os.fork()
      if pid == 0:  # the child: report through the exit status, run nothing else
        ok = blas._single_threaded_blas.open_scopes == 0 and counts() == before
        os._exit(0 if ok else 1)
      _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert counts() == before


def test_blas_workers_reraise_and_keep_working():
  """A part that raises on a worker surfaces in the caller; the workers serve the next call."""
  done = []

  def fail():
    raise RuntimeError("part failed")

  with pytest.raises(RuntimeError, match="part failed"):
    blas._workers.run([lambda: done.append(0), fail])
  blas._workers.run([lambda: done.append(1), lambda: done.append(2), lambda: done.append(3)])
  assert sorted(done) == [0, 1, 2, 3]


@pytest.fixture
def four_host_threads():
  """The process-wide host thread count at 4 (as `set_host_threads(4)` on a 4-core machine),
  restored to the default after the test."""
  moejax.kernels.set_host_threads(4)
  yield
  moejax.kernels.set_host_threads(None)


def test_blas_concurrent_calls_share_the_threads():
  """A call that starts while another runs takes its share of the threads, not all of them, and
  cuts its work exactly as it would alone."""
  ranges, threads = [], set()

  def record(first, last):
    ranges.append((first, last))
    threads.add(threading.get_ident())
    time.sleep(0.01)  # long enough that no thread takes every range before the others start

  blas._run_split(record, 10, 10**9, 4, 1)
  assert sorted(ranges) == [(0, 2), (2, 5), (5, 7), (7, 10)]
  assert len(threads) == 4
  ranges.clear()
  threads.clear()
  with blas._single_threaded_blas:  # another call in flight: 4 // 2 threads, the same ranges
    blas._run_split(record, 10, 10**9, 4, 1)
  assert sorted(ranges) == [(0, 2), (2, 5), (5, 7), (7, 10)]
  assert len(threads) == 2
  ranges.clear()
  blas._run_split(record, 10, 1, 4, 1)  # too little work to split: one range
  assert ranges == [(0, 10)]


def test_blas_results_do_not_depend_on_other_calls_in_flight(four_host_threads):
  """Bit for bit the same products whether a call runs alone or beside another (which halves its
  threads): the cut must not follow the timing, or two runs of one config would differ."""
  lhs, rhs, group_sizes, dout = _inputs(512, 128, 256, (200, 0, 180, 132), seed=11)
  alone = jax.block_until_ready(_gmm_and_grads("blas", lhs, rhs, group_sizes, dout))
  with blas._single_threaded_blas:
    beside = jax.block_until_ready(_gmm_and_grads("blas", lhs, rhs, group_sizes, dout))
  for a, b in zip(alone, beside, strict=True):
    np.testing.assert_array_equal(a, b)


def test_limit_host_threads_caps_nests_and_restores(four_host_threads):
  """`limit_host_threads` caps every call's threads while it is open, the smallest open cap
  wins, a call's `threads` option is capped too, and leaving (also by an exception) restores the
  count."""
  limit, count = moejax.kernels.limit_host_threads, moejax.kernels.host_threads
  with limit(2):
    assert count() == 2
    with limit(3):
      assert count() == 2
      with limit(1):
        assert count() == 1
    assert count() == 2
    assert count(3) == 2  # a call's option is capped as well
    with limit(8):  # a cap above the count leaves the count
      assert count() == 2
  assert count() == 4
  assert count(3) == 3
  with pytest.raises(RuntimeError, match="inside"), limit(1):
    raise RuntimeError("inside")
  assert count() == 4


def test_limit_host_threads_computes_what_that_thread_count_does(four_host_threads):
  """Under a cap, a call cuts its work as the `threads` option of that count would, so the
  products are those of that count bit for bit."""
  lhs, rhs, group_sizes, dout = _inputs(512, 128, 256, (200, 0, 180, 132), seed=12)

  def run(**options):
    options = {"min_part_flops": 1, **options}
    return jax.block_until_ready(
      _gmm_and_grads("blas", lhs, rhs, group_sizes, dout, options=options)
    )

  with moejax.kernels.limit_host_threads(1):
    capped = run()
  one = run(threads=1)
  for a, b in zip(capped, one, strict=True):
    np.testing.assert_array_equal(a, b)
  _assert_numpy_gmm_and_grads(*capped, lhs, rhs, (200, 0, 180, 132), dout)


@pytest.mark.parametrize("threads", [0, -1, 1.5, True, "2"])
def test_limit_host_threads_rejects(threads):
  with (
    pytest.raises(ValueError, match=rf"threads={threads!r}; allowed: an int >= 1"),
    moejax.kernels.limit_host_threads(threads),
  ):
    pass


@pytest.mark.parametrize("threads", [0, -1, 1.5, True, "2"])
def test_set_host_threads_rejects(threads):
  with pytest.raises(ValueError, match=rf"threads={threads!r}; allowed: an int >= 1, or None"):
    moejax.kernels.set_host_threads(threads)


def test_blas_under_jit_with_sharded_inputs():
  """Outside shard_map the host callback sees the whole array (XLA runs it once, on one device):
  rows sharded over every device must still come back as the per-group products."""
  devices = np.array(jax.devices())
  mesh = jax.sharding.Mesh(devices, ("x",))
  m, d, f, sizes = 8 * len(devices), 24, 40, (5, 0, 30, 1)
  lhs, rhs, group_sizes, dout = _inputs(m, d, f, sizes, seed=5)
  rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
  lhs, dout = jax.device_put(lhs, rows), jax.device_put(dout, rows)
  out, dlhs, drhs = _gmm_and_grads("blas", lhs, rhs, group_sizes, dout)
  np_dlhs, np_drhs = _numpy_gmm_vjp(lhs, rhs, sizes, dout)
  assert _rel_err(out, _numpy_gmm(lhs, rhs, sizes)) < F32_TOL
  assert _rel_err(dlhs, np_dlhs) < F32_TOL
  assert _rel_err(drhs, np_drhs) < F32_TOL

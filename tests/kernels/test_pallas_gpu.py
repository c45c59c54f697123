"""The `pallas_gpu` backend (Triton-flavoured Pallas): exact in interpret mode, lowers for cuda.

No GPU here, so two checks stand in for one: the kernels run in the Pallas interpreter on this CPU
(`interpret=True`, under `jax.jit`) against a float64 per-group numpy loop, and they lower for
`cuda` from this host (Triton's block and grid rules are enforced by lowering, not by the
interpreter). Shapes are small because interpret time dominates; M, K and N are not multiples of
the blocks so the padding is exercised, and blocks are small so tiles straddle group boundaries.

Tolerances (relative to the largest |expected| entry, as in test_gmm.py):
  float32:  1e-5 (sums of <= 96 O(1) terms round at ~1e-7; a wrong row or group is O(1)).
  bfloat16: the float64 expectation is computed from the bf16 inputs, so only the one rounding of
            the float32 accumulator remains: within one bf16 ulp (2^-8) entry by entry for the
            output, and 2^-8 of the largest entry for the gradients.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax.kernels import gmm, gmm_multi, tgmm
from moejax.kernels.grouped_matmul import ops, pallas_gpu
from moejax.moe import MoE, MoEConfig

F32_TOL = 1e-5
BF16_TOL = 2.0**-8
# Small blocks: several row tiles per group and several groups per row tile.
SMALL = {"bm": 16, "bk": 16, "bn": 32, "interpret": True}

# (M, D, F, group_sizes). D and F differ so a transposed operand cannot pass by accident.
CASES = {
  # Empty groups at the start, middle and end; rows past the sum (33) share a row tile with the
  # last group; M, D, F not block multiples.
  "ragged_empty_start_middle_end": (45, 40, 50, (0, 9, 0, 17, 7, 0)),
  # One group holds every row (M not a multiple of bm).
  "one_group_all_rows": (37, 24, 40, (0, 37, 0)),
  # Many small groups: some row tiles hold four groups; dimensions are block multiples.
  "many_small_groups_exact_blocks": (64, 32, 64, (5, 1, 0, 7, 3, 20, 0, 11, 17)),
}
FAST_CASES = ("ragged_empty_start_middle_end",)


def _cases():
  return [c if c in FAST_CASES else pytest.param(c, marks=pytest.mark.slow) for c in CASES]


def _numpy_gmm(lhs, rhs, group_sizes, group_offset=0):
  """float64 per-group loop; rhs holds groups group_offset.., rows of other groups are zero."""
  lhs, rhs = np.asarray(lhs, np.float64), np.asarray(rhs, np.float64)
  out = np.zeros((lhs.shape[0], rhs.shape[2]))
  start = 0
  for e, size in enumerate(group_sizes):
    if 0 <= e - group_offset < rhs.shape[0]:
      out[start : start + size] = lhs[start : start + size] @ rhs[e - group_offset]
    start += size
  return out


def _numpy_tgmm(lhs, grad, group_sizes, group_offset=0, num_groups=None):
  lhs, grad = np.asarray(lhs, np.float64), np.asarray(grad, np.float64)
  num_groups = len(group_sizes) if num_groups is None else num_groups
  out = np.zeros((num_groups, lhs.shape[1], grad.shape[1]))
  start = 0
  for e, size in enumerate(group_sizes):
    if 0 <= e - group_offset < num_groups:
      out[e - group_offset] = lhs[start : start + size].T @ grad[start : start + size]
    start += size
  return out


def _rel_err(actual, expected):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, (actual.shape, expected.shape)
  return np.max(np.abs(actual - expected), initial=0.0) / max(
    np.max(np.abs(expected), initial=0.0), 1e-30
  )


def _inputs(m, d, f, group_sizes, dtype=jnp.float32, seed=0):
  """lhs [M, D], rhs [E, D, F], group_sizes, dout [M, F]; NaN in lhs and dout past the sum."""
  rng = np.random.default_rng(seed)
  total = sum(group_sizes)
  lhs = jnp.asarray(rng.normal(size=(m, d)), dtype).at[total:].set(jnp.nan)
  rhs = jnp.asarray(rng.normal(size=(len(group_sizes), d, f)), dtype)
  dout = jnp.asarray(rng.normal(size=(m, f)), dtype).at[total:].set(jnp.nan)
  return lhs, rhs, jnp.asarray(group_sizes, jnp.int32), dout


@functools.partial(jax.jit, static_argnames=("options",))
def _gmm_and_grads(lhs, rhs, group_sizes, dout, options):
  """ops.gmm through the custom VJP: (out, d lhs, d rhs)."""
  fn = lambda x, w: gmm(x, w, group_sizes, backend="pallas_gpu", options=options)
  out, vjp = jax.vjp(fn, lhs, rhs)
  return (out, *vjp(dout))


def _check_gmm_and_grads(case, dtype, options):
  m, d, f, sizes = CASES[case]
  total = sum(sizes)
  lhs, rhs, group_sizes, dout = _inputs(m, d, f, sizes, dtype)
  out, dlhs, drhs = _gmm_and_grads(lhs, rhs, group_sizes, dout, tuple(sorted(options.items())))
  assert out.dtype == dlhs.dtype == drhs.dtype == dtype
  assert out.shape == (m, f) and dlhs.shape == lhs.shape and drhs.shape == rhs.shape
  # The oracle sees only the rows in groups (the NaN rows past the sum must not matter).
  expected = _numpy_gmm(lhs[:total], rhs, sizes)
  np_dlhs = _numpy_gmm(dout[:total], np.swapaxes(np.asarray(rhs, np.float64), 1, 2), sizes)
  np_drhs = _numpy_tgmm(lhs[:total], dout[:total], sizes)
  if dtype == jnp.float32:
    assert _rel_err(out[:total], expected) < F32_TOL
  else:  # within one bf16 ulp of the exact product of the bf16 inputs, entry by entry
    err = np.abs(np.asarray(out[:total], np.float64) - expected)
    np.testing.assert_array_less(err, BF16_TOL * np.abs(expected) + 1e-6)
  tol = F32_TOL if dtype == jnp.float32 else BF16_TOL
  assert _rel_err(dlhs[:total], np_dlhs) < tol
  assert _rel_err(drhs, np_drhs) < tol
  # Rows past the groups: exactly zero (no NaN leak); empty groups: exactly zero gradient.
  np.testing.assert_array_equal(out[total:], 0.0)
  np.testing.assert_array_equal(dlhs[total:], 0.0)
  for e, size in enumerate(sizes):
    if size == 0:
      np.testing.assert_array_equal(drhs[e], 0.0)


@pytest.mark.parametrize("case", _cases())
def test_gmm_forward_and_grads_match_numpy(case):
  _check_gmm_and_grads(case, jnp.float32, SMALL)


@pytest.mark.slow
@pytest.mark.parametrize("blocks", [(32, 32, 16), (16, 32, 16)])
def test_other_blocks(blocks):
  bm, bk, bn = blocks
  options = {"bm": bm, "bk": bk, "bn": bn, "interpret": True}
  _check_gmm_and_grads("many_small_groups_exact_blocks", jnp.float32, options)


@pytest.mark.parametrize("case", _cases())
def test_bfloat16_rounds_once(case):
  _check_gmm_and_grads(case, jnp.bfloat16, SMALL)


def test_tgmm_and_its_grads_match_numpy():
  """tgmm straight (NaN/Inf past the sum ignored, empty groups incl. the first exactly zero) and
  through its VJP (two gmm calls)."""
  m, d, f, sizes = CASES["ragged_empty_start_middle_end"]
  total = sum(sizes)
  lhs, _, group_sizes, grad = _inputs(m, d, f, sizes)
  grad = grad.at[total:].set(jnp.inf)
  ddw = jnp.asarray(np.random.default_rng(2).normal(size=(len(sizes), d, f)), jnp.float32)

  @jax.jit
  def run(lhs, grad, group_sizes, ddw):
    fn = lambda x, g: tgmm(x, g, group_sizes, backend="pallas_gpu", options=SMALL)
    dw, vjp = jax.vjp(fn, lhs, grad)
    return (dw, *vjp(ddw))

  dw, dlhs, dgrad = run(lhs, grad, group_sizes, ddw)
  assert dw.shape == (len(sizes), d, f)
  assert _rel_err(dw, _numpy_tgmm(lhs[:total], grad[:total], sizes)) < F32_TOL
  for e, size in enumerate(sizes):
    if size == 0:
      np.testing.assert_array_equal(dw[e], 0.0)
  ddw_t = np.swapaxes(np.asarray(ddw, np.float64), 1, 2)
  assert _rel_err(dlhs[:total], _numpy_gmm(grad[:total], ddw_t, sizes)) < F32_TOL
  assert _rel_err(dgrad[:total], _numpy_gmm(lhs[:total], ddw, sizes)) < F32_TOL
  np.testing.assert_array_equal(dlhs[total:], 0.0)
  np.testing.assert_array_equal(dgrad[total:], 0.0)


def test_gmm_multi_and_grads():
  m, d, f, sizes = CASES["ragged_empty_start_middle_end"]
  total = sum(sizes)
  lhs, rhs, group_sizes, _ = _inputs(m, d, f, sizes)
  rhs2 = jnp.asarray(np.random.default_rng(5).normal(size=rhs.shape), jnp.float32)

  @jax.jit
  def run(lhs, rhs, rhs2, group_sizes):
    def loss(x, w, v):
      gate, up = gmm_multi(x, (w, v), group_sizes, backend="pallas_gpu", options=SMALL)
      return jnp.sum(gate * up), (gate, up)

    return jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(lhs, rhs, rhs2)

  (dx, dw, dv), (gate, up) = run(lhs, rhs, rhs2, group_sizes)
  np_gate, np_up = _numpy_gmm(lhs[:total], rhs, sizes), _numpy_gmm(lhs[:total], rhs2, sizes)
  assert _rel_err(gate[:total], np_gate) < F32_TOL
  assert _rel_err(up[:total], np_up) < F32_TOL
  np.testing.assert_array_equal(gate[total:], 0.0)
  np.testing.assert_array_equal(up[total:], 0.0)
  swap = lambda w: np.swapaxes(np.asarray(w, np.float64), 1, 2)
  np_dx = _numpy_gmm(np_up, swap(rhs), sizes) + _numpy_gmm(np_gate, swap(rhs2), sizes)
  assert _rel_err(dx[:total], np_dx) < F32_TOL
  np.testing.assert_array_equal(dx[total:], 0.0)
  assert _rel_err(dw, _numpy_tgmm(lhs[:total], np_up, sizes)) < F32_TOL
  assert _rel_err(dv, _numpy_tgmm(lhs[:total], np_gate, sizes)) < F32_TOL


@pytest.mark.slow
def test_random_group_sizes_one_compilation():
  """Random splits of at most M rows into E groups (zeros, tiny groups, NaN rows past the sum),
  all through one jitted gmm + tgmm: group sizes are data."""
  m, d, f, e = 40, 24, 40, 5
  rng = np.random.default_rng(7)
  run = jax.jit(
    lambda x, w, g, gs: (pallas_gpu.gmm(x, w, gs, **SMALL), pallas_gpu.tgmm(x, g, gs, **SMALL))
  )
  for seed in range(12):
    cuts = np.sort(rng.integers(0, m + 1, size=e))  # group ends, the last one <= M
    sizes = np.diff(cuts, prepend=0)
    sizes[rng.random(e) < 0.3] = 0
    total = int(sizes.sum())
    lhs, rhs, group_sizes, grad = _inputs(m, d, f, tuple(int(s) for s in sizes), seed=seed)
    out, dw = run(lhs, rhs, grad, group_sizes)
    assert _rel_err(out[:total], _numpy_gmm(lhs[:total], rhs, sizes)) < F32_TOL
    np.testing.assert_array_equal(out[total:], 0.0)
    assert _rel_err(dw, _numpy_tgmm(lhs[:total], grad[:total], sizes)) < F32_TOL
    for g in np.flatnonzero(sizes == 0):
      np.testing.assert_array_equal(dw[g], 0.0)
  assert run._cache_size() == 1


@pytest.mark.parametrize("transpose_rhs", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_group_offset(transpose_rhs):
  """An expert-parallel shard: rhs holds groups 2..4 of 7. Rows of other groups are exactly zero;
  tgmm returns the three local gradients. The offset is static, then traced."""
  m, d, f, sizes = 40, 24, 40, (3, 0, 6, 0, 13, 9, 2)
  lhs, rhs, group_sizes, grad = _inputs(m, d, f, sizes)
  local = rhs[2:5]  # [3, D, F]
  kernel_rhs = jnp.swapaxes(local, 1, 2) if transpose_rhs else local
  options = dict(SMALL)
  expected = _numpy_gmm(lhs, rhs[2:5], sizes, group_offset=2)
  expected_dw = _numpy_tgmm(lhs, grad, sizes, group_offset=2, num_groups=3)

  @jax.jit
  def run(lhs, kernel_rhs, group_sizes, grad, offset):
    static = pallas_gpu.gmm(
      lhs, kernel_rhs, group_sizes, transpose_rhs=transpose_rhs, group_offset=2, **options
    )
    traced = pallas_gpu.gmm(
      lhs, kernel_rhs, group_sizes, transpose_rhs=transpose_rhs, group_offset=offset, **options
    )
    dw = pallas_gpu.tgmm(lhs, grad, group_sizes, group_offset=offset, num_groups=3, **options)
    return static, traced, dw

  static, traced, dw = run(lhs, kernel_rhs, group_sizes, grad, jnp.int32(2))
  rows = slice(sizes[0], sum(sizes[:5]))  # the local groups' rows
  for out in (static, traced):
    assert _rel_err(out[rows], expected[rows]) < F32_TOL
    np.testing.assert_array_equal(out[: rows.start], 0.0)
    np.testing.assert_array_equal(out[rows.stop :], 0.0)
  assert _rel_err(dw, expected_dw) < F32_TOL
  np.testing.assert_array_equal(dw[1], 0.0)  # group 3 is empty
  with pytest.raises(ValueError, match=r"group_offset=5 with 3 local groups of 7"):
    pallas_gpu.gmm(lhs, local, group_sizes, group_offset=5, **options)


def test_options_are_declared_and_checked():
  assert ops._BACKENDS["pallas_gpu"].options == {
    "bm": 128,
    "bk": 64,
    "bn": 128,
    "num_warps": 4,
    "num_stages": 3,
    "interpret": False,
  }
  lhs, rhs, group_sizes, _ = _inputs(8, 4, 4, (4, 4))
  with pytest.raises(ValueError, match=r"option bm=24; allowed: a power of two >= 16"):
    gmm(lhs, rhs, group_sizes, backend="pallas_gpu", options={"bm": 24, "interpret": True})
  with pytest.raises(ValueError, match=r"option 'block_m'.*backend='pallas_gpu'.*allowed: bk, bm"):
    gmm(lhs, rhs, group_sizes, backend="pallas_gpu", options={"block_m": 8})


def test_moe_layer_matches_xla_backend():
  """A gated MoE layer (gmm_multi + gmm in the experts) forward and every gradient equals the
  same layer on the `xla` backend."""
  small = {"bm": 16, "bk": 16, "bn": 16, "interpret": True}
  base = dict(d_model=24, num_experts=4, top_k=2, expert_hidden_dim=40, activation="swiglu")
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 11, 24)), jnp.float32)

  def run(cfg):
    model = MoE(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)

    @jax.jit
    def loss(state, x):
      y, _ = nnx.merge(graphdef, state)(x)
      return jnp.sum(y * jnp.cos(y)), y

    (_, y), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(state, x)
    return y, jax.tree.leaves(grads)

  y, grads = run(MoEConfig(**base, gmm_backend="pallas_gpu", gmm_options=small))
  y_xla, grads_xla = run(MoEConfig(**base, gmm_backend="xla"))
  assert _rel_err(y, y_xla) < F32_TOL
  assert len(grads) == len(grads_xla)
  for g, g_xla in zip(grads, grads_xla, strict=True):
    assert _rel_err(g, g_xla) < F32_TOL


# ------------------------------------------------------------------------------------------------
# Lowering for cuda from this CPU host (no GPU, no CUDA plugin): Triton's rules hold.
# ------------------------------------------------------------------------------------------------

_MIXTRAL = dict(m=4096, d=4096, f=14336, e=8)  # tokens x d_model x expert_hidden_dim, 8 experts
_TRITON_CALL = "__gpu$xla.gpu.triton"


def _custom_calls(text: str) -> list[str]:
  return re.findall(r'custom_call @([\w.$]+)|call_target_name = "([\w.$]+)"', text)


def _lower_for_cuda(fn, *args) -> str:
  return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def _mixtral_args():
  m, d, f, e = _MIXTRAL.values()
  bf16 = jnp.bfloat16
  return (
    jax.ShapeDtypeStruct((m, d), bf16),  # lhs
    jax.ShapeDtypeStruct((e, d, f), bf16),  # rhs
    jax.ShapeDtypeStruct((e,), jnp.int32),  # group_sizes
    jax.ShapeDtypeStruct((m, f), bf16),  # grad
  )


def _triton_calls(text: str) -> int:
  targets = [a or b for a, b in _custom_calls(text)]
  assert set(targets) == {_TRITON_CALL}, set(targets)  # no host callback, nothing else
  assert "ragged_dot" not in text
  return len(targets)


def test_kernels_lower_for_cuda_mixtral_shape():
  lhs, rhs, group_sizes, grad = _mixtral_args()
  assert _triton_calls(_lower_for_cuda(pallas_gpu.gmm, lhs, rhs, group_sizes)) == 1
  rhs_t = jax.ShapeDtypeStruct((8, 14336, 4096), jnp.bfloat16)
  gmm_t = functools.partial(pallas_gpu.gmm, transpose_rhs=True)
  assert _triton_calls(_lower_for_cuda(gmm_t, grad, rhs_t, group_sizes)) == 1
  assert _triton_calls(_lower_for_cuda(pallas_gpu.tgmm, lhs, grad, group_sizes)) == 1


def test_ops_gmm_with_grad_lowers_for_cuda_mixtral_shape():
  lhs, rhs, group_sizes, _ = _mixtral_args()

  def loss(x, w, gs):
    out = gmm(x, w, gs, backend="pallas_gpu")
    return jnp.sum(out.astype(jnp.float32) ** 2)

  text = _lower_for_cuda(jax.grad(loss, argnums=(0, 1)), lhs, rhs, group_sizes)
  assert _triton_calls(text) == 3  # forward gmm, d lhs by gmm(transpose_rhs), d rhs by tgmm


def test_expert_parallel_under_shard_map_lowers_for_cuda():
  """Each shard holds E / 2 experts' weights and takes group_offset from its axis index (traced);
  the kernels (gmm, gmm with transpose_rhs, tgmm) lower for cuda inside `shard_map` with
  check_vma on, on an abstract mesh."""
  mesh = jax.sharding.AbstractMesh((2,), ("expert",))
  spec = jax.sharding.PartitionSpec
  m, d, f, e = 256, 128, 256, 8
  lhs = jax.ShapeDtypeStruct((m, d), jnp.bfloat16)
  rhs = jax.ShapeDtypeStruct((e, d, f), jnp.bfloat16)
  group_sizes = jax.ShapeDtypeStruct((e,), jnp.int32)

  @functools.partial(
    jax.shard_map,
    mesh=mesh,
    in_specs=(spec(), spec("expert"), spec()),
    out_specs=(spec(), spec(), spec("expert")),
  )
  def shard(x, w, gs):
    offset = jax.lax.axis_index("expert") * w.shape[0]
    out = pallas_gpu.gmm(x, w, gs, group_offset=offset)  # [M, F], other shards' rows zero
    dx = pallas_gpu.gmm(out, w, gs, transpose_rhs=True, group_offset=offset)  # [M, D]
    dw = pallas_gpu.tgmm(x, out, gs, group_offset=offset, num_groups=w.shape[0])  # [E/2, D, F]
    return jax.lax.psum(out, "expert"), jax.lax.psum(dx, "expert"), dw

  text = _lower_for_cuda(shard, lhs, rhs, group_sizes)
  assert _triton_calls(text) == 3


@pytest.mark.slow
def test_ops_gmm_under_shard_map_interpret():
  """Data-parallel rows through ops' custom VJP, in interpret mode on the CPU devices (interpret
  mode inside shard_map needs check_vma=False)."""
  devices = np.array(jax.devices()[:2])
  mesh = jax.sharding.Mesh(devices, ("x",))
  spec = jax.sharding.PartitionSpec
  m, d, f, sizes = 24, 16, 32, (7, 0, 11)
  lhs, _, _, _ = _inputs(2 * m, d, f, (2 * m,))
  rhs = _inputs(m, d, f, sizes)[1]  # [E, D, F]
  shard_sizes = jnp.asarray([sizes, sizes[::-1]], jnp.int32)  # [2, E]

  @jax.jit
  @functools.partial(
    jax.shard_map,
    mesh=mesh,
    in_specs=(spec("x"), spec(), spec("x")),
    out_specs=(spec("x"), spec("x"), spec("x")),
    check_vma=False,
  )
  def run(x, w, gs):
    fn = lambda x, w: gmm(x, w, gs[0], backend="pallas_gpu", options=SMALL)
    out, vjp = jax.vjp(fn, x, w)
    dx, dw = vjp(out)
    return out, dx, dw[None]

  out, dx, dw = run(lhs, rhs, shard_sizes)
  for i in range(2):
    rows, split = slice(i * m, (i + 1) * m), np.asarray(shard_sizes[i])
    expected = _numpy_gmm(lhs[rows], rhs, split)
    assert _rel_err(out[rows], expected) < F32_TOL
    swapped = np.swapaxes(np.asarray(rhs, np.float64), 1, 2)
    assert _rel_err(dx[rows], _numpy_gmm(expected, swapped, split)) < F32_TOL
    assert _rel_err(dw[i], _numpy_tgmm(lhs[rows], expected, split)) < F32_TOL

"""The `pallas_tpu` grouped-matmul backend: its kernels in interpret mode on CPU against a float64
per-group loop, and lowered for TPU from this host (Mosaic's block rules; nothing is executed).

Tolerances (relative to the largest |expected| entry, as in test_gmm.py):
  float32:  1e-5; every sum has at most 256 O(1) terms, float32 rounding is ~1e-6 of the largest
            entry, while a wrong row, group, tile or transpose is an O(1) error.
  bfloat16: inputs are rounded to bf16 and the expectation computed from the rounded values, so only
            the output rounding of a float32 accumulation remains: half an ulp (2^-9), checked at one
            ulp (2^-8), entry by entry for the forward.

Interpret mode is slow to trace and run, so shapes are tiny and tiles small (tm=8, tk=tn=128): M up
to 64, D and F of 128, 256 and 130 (a K and an N remainder). The slow tier adds the remaining
shape cases, a second bfloat16 case, gmm_multi, an expert-parallel run under shard_map, and (with
libtpu importable) compiles for TPU.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.experimental.pallas import tpu as pltpu

from moejax.kernels import gmm, gmm_multi, tgmm
from moejax.kernels.grouped_matmul import pallas_tpu
from moejax.moe import MoE, MoEConfig

F32_TOL = 1e-5
BF16_TOL = 2.0**-8
TILES = {"tm": 8, "tk": 128, "tn": 128}
OPTIONS = {**TILES, "interpret": True}

# (M, D, F, group_sizes). M is never a multiple of tm=8 except where a tile boundary is the point.
CASES = {
  # Empty groups at the start, middle and end; groups straddling tiles; rows past the groups.
  "empty_start_middle_end": (37, 128, 256, (0, 10, 0, 19, 0)),
  # One group holds every row; K = 130 leaves a remainder of 2 past one 128 tile.
  "one_group_all_rows_k_remainder": (29, 130, 128, (29,)),
  # N = 130: a remainder of the output columns (gmm) and of tgmm's N tile; two full tiles of M.
  "n_remainder_tile_aligned": (16, 256, 130, (8, 0, 8)),
  # Every row in the last of four groups, M = 64.
  "all_rows_in_last_group": (64, 128, 128, (0, 0, 0, 64)),
}
FAST_CASES = ("empty_start_middle_end", "one_group_all_rows_k_remainder")


def _cases(names):
  return [n if n in FAST_CASES else pytest.param(n, marks=pytest.mark.slow) for n in names]


def _numpy_gmm(lhs, rhs, group_sizes):
  """float64 per-group loop."""
  lhs, rhs = np.asarray(lhs, np.float64), np.asarray(rhs, np.float64)
  out = np.zeros((lhs.shape[0], rhs.shape[2]))
  start = 0
  for e, size in enumerate(group_sizes):
    out[start : start + size] = lhs[start : start + size] @ rhs[e]
    start += size
  return out


def _numpy_tgmm(lhs, grad, group_sizes):
  lhs, grad = np.asarray(lhs, np.float64), np.asarray(grad, np.float64)
  out = np.zeros((len(group_sizes), lhs.shape[1], grad.shape[1]))
  start = 0
  for e, size in enumerate(group_sizes):
    out[e] = lhs[start : start + size].T @ grad[start : start + size]
    start += size
  return out


def _rel_err(actual, expected):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, (actual.shape, expected.shape)
  return np.max(np.abs(actual - expected), initial=0.0) / max(np.max(np.abs(expected)), 1e-30)


def _inputs(m, d, f, group_sizes, dtype=jnp.float32, seed=0, nan_past_groups=True):
  """(lhs, rhs, group_sizes, dout); lhs rows at or past sum(group_sizes) are NaN by default."""
  rng = np.random.default_rng(seed)
  lhs = rng.normal(size=(m, d))
  if nan_past_groups:
    lhs[sum(group_sizes) :] = np.nan
  rhs = rng.normal(size=(len(group_sizes), d, f))
  dout = rng.normal(size=(m, f))
  return (
    jnp.asarray(lhs, dtype),
    jnp.asarray(rhs, dtype),
    jnp.asarray(group_sizes, jnp.int32),
    jnp.asarray(dout, dtype),
  )


@functools.partial(jax.jit, static_argnames="interpret")
def _gmm_and_grads(lhs, rhs, group_sizes, dout, interpret=True):
  """(out, d lhs, d rhs) through ops' custom VJP, with group_sizes traced."""
  options = {**OPTIONS, "interpret": interpret}
  fn = lambda x, w: gmm(x, w, group_sizes, backend="pallas_tpu", options=options)
  out, vjp = jax.vjp(fn, lhs, rhs)
  return (out, *vjp(dout))


def _expected(lhs, rhs, sizes, dout):
  """float64 (out, d lhs, d rhs); NaN rows of lhs past the groups are read as zeros (no group
  owns them)."""
  lhs = np.nan_to_num(np.asarray(lhs, np.float64))
  rhs = np.asarray(rhs, np.float64)
  return (
    _numpy_gmm(lhs, rhs, sizes),
    _numpy_gmm(dout, np.swapaxes(rhs, 1, 2), sizes),
    _numpy_tgmm(lhs, dout, sizes),
  )


def _assert_rows_past_groups_and_empty_groups_are_zero(out, dlhs, drhs, sizes):
  total = sum(sizes)
  for x in (out, dlhs, drhs):
    assert np.isfinite(np.asarray(x, np.float64)).all()
  np.testing.assert_array_equal(np.asarray(out[total:], np.float64), 0.0)
  np.testing.assert_array_equal(np.asarray(dlhs[total:], np.float64), 0.0)
  for e, size in enumerate(sizes):
    if size == 0:
      np.testing.assert_array_equal(np.asarray(drhs[e], np.float64), 0.0)


@pytest.mark.parametrize("case", _cases(CASES))
def test_float32_forward_and_grads_match_float64_loop(case):
  m, d, f, sizes = CASES[case]
  lhs, rhs, group_sizes, dout = _inputs(m, d, f, sizes)
  out, dlhs, drhs = _gmm_and_grads(lhs, rhs, group_sizes, dout)
  expected_out, expected_dlhs, expected_drhs = _expected(lhs, rhs, sizes, dout)

  assert out.shape == (m, f) and out.dtype == jnp.float32
  assert _rel_err(out, expected_out) < F32_TOL
  assert _rel_err(dlhs, expected_dlhs) < F32_TOL
  assert _rel_err(drhs, expected_drhs) < F32_TOL
  _assert_rows_past_groups_and_empty_groups_are_zero(out, dlhs, drhs, sizes)


def test_tpu_interpreter_matches_and_zeroes_the_rows_it_leaves_stale():
  """`pltpu.InterpretParams()` simulates TPU memory: rows no visit writes come back as copies of
  an earlier tile there (NaN under `interpret=True`); the op must still return exact zeros."""
  m, d, f, sizes = CASES["empty_start_middle_end"]
  lhs, rhs, group_sizes, dout = _inputs(m, d, f, sizes)
  out, dlhs, drhs = _gmm_and_grads(lhs, rhs, group_sizes, dout, interpret=pltpu.InterpretParams())
  expected_out, expected_dlhs, expected_drhs = _expected(lhs, rhs, sizes, dout)
  assert _rel_err(out, expected_out) < F32_TOL
  assert _rel_err(dlhs, expected_dlhs) < F32_TOL
  assert _rel_err(drhs, expected_drhs) < F32_TOL
  _assert_rows_past_groups_and_empty_groups_are_zero(out, dlhs, drhs, sizes)


@pytest.mark.parametrize(
  "case",
  [
    "empty_start_middle_end",
    pytest.param("one_group_all_rows_k_remainder", marks=pytest.mark.slow),
  ],
)
def test_bfloat16_rounds_once(case):
  m, d, f, sizes = CASES[case]
  lhs, rhs, group_sizes, dout = _inputs(m, d, f, sizes, dtype=jnp.bfloat16)
  out, dlhs, drhs = _gmm_and_grads(lhs, rhs, group_sizes, dout)
  expected_out, expected_dlhs, expected_drhs = _expected(lhs, rhs, sizes, dout)

  assert out.dtype == dlhs.dtype == drhs.dtype == jnp.bfloat16
  np.testing.assert_array_less(
    np.abs(np.asarray(out, np.float64) - expected_out), BF16_TOL * np.abs(expected_out) + 1e-6
  )
  assert _rel_err(dlhs, expected_dlhs) < BF16_TOL
  assert _rel_err(drhs, expected_drhs) < BF16_TOL
  _assert_rows_past_groups_and_empty_groups_are_zero(out, dlhs, drhs, sizes)


def test_group_offset_computes_only_the_local_groups():
  """An expert-parallel shard: groups [2, 4) of five; rhs and tgmm's output hold only those.
  group_offset is traced (as under shard_map, from the axis index)."""
  m, d, f, sizes = CASES["empty_start_middle_end"]  # (0, 10, 0, 19, 0): local groups 2 (empty), 3
  lhs, rhs, group_sizes, dout = _inputs(m, d, f, sizes, nan_past_groups=False)
  lhs = lhs.at[:10].set(jnp.nan)  # rows of group 1, another shard's: must not leak in

  @jax.jit
  def run(lhs, rhs, group_sizes, dout, offset):
    out = pallas_tpu.gmm(lhs, rhs[2:4], group_sizes, group_offset=offset, **OPTIONS)
    dw = pallas_tpu.tgmm(lhs, dout, group_sizes, group_offset=offset, num_local_groups=2, **OPTIONS)
    return out, dw

  out, dw = run(lhs, rhs, group_sizes, dout, jnp.int32(2))
  # Every group's product, then only the local groups' rows (10..28, group 3) and weights kept.
  clean_lhs = np.nan_to_num(np.asarray(lhs, np.float64))
  expected_out = _numpy_gmm(clean_lhs, rhs, sizes)
  expected_out[:10] = 0.0
  expected_dw = _numpy_tgmm(clean_lhs, dout, sizes)[2:4]
  assert _rel_err(out, expected_out) < F32_TOL
  assert _rel_err(dw, expected_dw) < F32_TOL
  np.testing.assert_array_equal(np.asarray(out[:10]), 0.0)  # group 1's rows
  np.testing.assert_array_equal(np.asarray(out[29:]), 0.0)  # rows past the groups
  np.testing.assert_array_equal(np.asarray(dw[0]), 0.0)  # group 2 is empty


def _expert_parallel(mesh, check_vma, **options):
  """gmm and tgmm on two shards of two experts each: group_offset from the axis index, the local
  products summed (gmm: each row is one shard's, zero on the other) or stacked (tgmm)."""
  spec = jax.sharding.PartitionSpec

  @functools.partial(
    jax.shard_map,
    mesh=mesh,
    in_specs=(spec(), spec("x"), spec(), spec()),
    out_specs=(spec(), spec("x")),
    check_vma=check_vma,
  )
  def run(lhs, rhs, group_sizes, dout):
    offset = jax.lax.axis_index("x") * rhs.shape[0]
    out = pallas_tpu.gmm(lhs, rhs, group_sizes, group_offset=offset, **options)
    dw = pallas_tpu.tgmm(
      lhs, dout, group_sizes, group_offset=offset, num_local_groups=rhs.shape[0], **options
    )
    return jax.lax.psum(out, "x"), dw

  return jax.jit(run)


@pytest.mark.slow
def test_expert_parallel_shards_under_shard_map():
  """Interpret mode runs inside shard_map only with check_vma=False (a Pallas limitation)."""
  sizes = (0, 10, 0, 19)
  lhs, rhs, group_sizes, dout = _inputs(37, 128, 128, sizes)
  mesh = jax.make_mesh((2,), ("x",), devices=jax.devices()[:2])
  spec = jax.sharding.PartitionSpec
  put = lambda x, *axes: jax.device_put(x, jax.sharding.NamedSharding(mesh, spec(*axes)))
  args = (put(lhs), put(rhs, "x"), put(group_sizes), put(dout))
  out, dw = map(np.asarray, _expert_parallel(mesh, False, **OPTIONS)(*args))
  expected_out, _, expected_dw = _expected(lhs, rhs, sizes, dout)
  assert _rel_err(out, expected_out) < F32_TOL
  assert _rel_err(dw, expected_dw) < F32_TOL
  np.testing.assert_array_equal(out[29:], 0.0)
  np.testing.assert_array_equal(dw[0], 0.0)
  np.testing.assert_array_equal(dw[2], 0.0)


def test_expert_parallel_lowers_for_tpu_under_shard_map():
  """With check_vma=True the kernels' outputs carry their operands' varying axes."""
  mesh = jax.sharding.AbstractMesh((2,), ("x",))
  fn = _expert_parallel(mesh, True, **TILES)
  shapes = [((64, 256), jnp.float32), ((4, 256, 128), jnp.float32), ((4,), jnp.int32)]
  args = [jax.ShapeDtypeStruct(s, d) for s, d in [*shapes, ((64, 128), jnp.float32)]]
  text = fn.trace(*args).lower(lowering_platforms=("tpu",)).as_text()
  assert text.count("tpu_custom_call") == 2


def test_tgmm_and_its_grads_through_ops():
  """ops.tgmm's VJP (two gmm calls, one with transpose_rhs) on the pallas_tpu kernels."""
  m, d, f, sizes = CASES["empty_start_middle_end"]
  lhs, _, group_sizes, grad = _inputs(m, d, f, sizes, nan_past_groups=False)
  ddw = jnp.asarray(np.random.default_rng(1).normal(size=(len(sizes), d, f)), jnp.float32)

  @jax.jit
  def run(lhs, grad, group_sizes, ddw):
    out, vjp = jax.vjp(
      lambda x, g: tgmm(x, g, group_sizes, backend="pallas_tpu", options=OPTIONS), lhs, grad
    )
    return (out, *vjp(ddw))

  out, dlhs, dgrad = run(lhs, grad, group_sizes, ddw)
  ddw64 = np.asarray(ddw, np.float64)
  assert _rel_err(out, _numpy_tgmm(lhs, grad, sizes)) < F32_TOL
  assert _rel_err(dlhs, _numpy_gmm(grad, np.swapaxes(ddw64, 1, 2), sizes)) < F32_TOL
  assert _rel_err(dgrad, _numpy_gmm(lhs, ddw64, sizes)) < F32_TOL


@pytest.mark.slow
def test_gmm_multi_and_grads():
  m, d, f, sizes = CASES["empty_start_middle_end"]
  lhs, rhs, group_sizes, dout = _inputs(m, d, f, sizes)

  @jax.jit
  def run(lhs, rhs, group_sizes):
    def loss(x, w):
      gate, up = gmm_multi(x, (w, 2 * w), group_sizes, backend="pallas_tpu", options=OPTIONS)
      return jnp.sum(gate * dout) + jnp.sum(up * dout)

    return jax.grad(loss, argnums=(0, 1))(lhs, rhs)

  dlhs, drhs = run(lhs, rhs, group_sizes)
  _, expected_dlhs, expected_drhs = _expected(lhs, rhs, sizes, dout)
  assert _rel_err(dlhs, 3 * expected_dlhs) < F32_TOL
  assert _rel_err(drhs, 3 * expected_drhs) < F32_TOL


@pytest.mark.parametrize(
  ("visit_empty", "expected"),
  [
    # gmm: group 1 owns rows 0-9 (tiles 0, 1), group 3 rows 10-28 (tiles 1, 2, 3); tile 1 is
    # visited once by each; empty groups are skipped.
    (False, [(1, 0), (1, 1), (3, 1), (3, 2), (3, 3)]),
    # tgmm: each empty group is visited once too, at the tile where it would start.
    (True, [(0, 0), (1, 0), (1, 1), (2, 1), (3, 1), (3, 2), (3, 3), (4, 3)]),
  ],
)
def test_visit_list(visit_empty, expected):
  sizes = jnp.asarray((0, 10, 0, 19, 0), jnp.int32)
  visits = pallas_tpu._visits(sizes, 0, 5, num_rows=40, tm=8, visit_empty=visit_empty)
  count = int(visits.count)
  assert count == len(expected)
  pairs = zip(visits.group[:count].tolist(), visits.tile[:count].tolist(), strict=True)
  assert list(pairs) == expected
  ends = np.cumsum(sizes)
  np.testing.assert_array_equal(visits.end[:count], [ends[g] for g, _ in expected])
  assert (int(visits.rows[0]), int(visits.rows[1])) == (0, 29)


def test_tiles_must_follow_the_tpu_block_rule():
  lhs, rhs, group_sizes, _ = _inputs(16, 128, 128, (16,))
  with pytest.raises(ValueError, match=r"tn=64; allowed: a positive multiple of 128"):
    pallas_tpu.gmm(lhs, rhs, group_sizes, tm=8, tk=128, tn=64, interpret=True)
  with pytest.raises(ValueError, match=r"tm=12; allowed: a positive multiple of 8"):
    pallas_tpu.tgmm(lhs, lhs, group_sizes, tm=12, interpret=True)
  with pytest.raises(ValueError, match=r"'block_m' is not one that backend='pallas_tpu' takes"):
    gmm(lhs, rhs, group_sizes, backend="pallas_tpu", options={"block_m": 8})


# ------------------------------------------------------------------------------------------------
# The MoE layer with gmm_backend="pallas_tpu" (interpret) against the xla backend.
# ------------------------------------------------------------------------------------------------


def test_moe_layer_forward_and_grads_equal_the_xla_backend():
  """gmm_options={"interpret": True}: the default tiles, shrunk to the layer's 32 rows and 128
  columns (the gated FFN's gate, up and down products and all their gradients)."""

  def loss_and_grads(backend, options):
    config = MoEConfig(
      d_model=128,
      num_experts=4,
      top_k=2,
      expert_hidden_dim=128,
      gmm_backend=backend,
      gmm_options=options,
    )
    graphdef, state = nnx.split(MoE(config, rngs=nnx.Rngs(0)))
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 8, 128)), jnp.float32)

    @jax.jit
    def run(state, x):
      def loss(state, x):
        y, _ = nnx.merge(graphdef, state)(x)
        return jnp.sum(y**2), y

      return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(state, x)

    return run(state, x)

  (loss, y), (dstate, dx) = loss_and_grads("pallas_tpu", {"interpret": True})
  (ref_loss, ref_y), (ref_dstate, ref_dx) = loss_and_grads("xla", ())
  assert _rel_err(y, ref_y) < F32_TOL
  assert _rel_err(loss, ref_loss) < F32_TOL
  assert _rel_err(dx, ref_dx) < F32_TOL
  flat, ref_flat = nnx.to_flat_state(dstate), nnx.to_flat_state(ref_dstate)
  assert [p for p, _ in flat] == [p for p, _ in ref_flat]
  for (path, g), (_, ref_g) in zip(flat, ref_flat, strict=True):
    assert _rel_err(g[...], ref_g[...]) < F32_TOL, path


# ------------------------------------------------------------------------------------------------
# Lowered for TPU from this host at a Mixtral-like shape, default tiles (Mosaic's block rules).
# ------------------------------------------------------------------------------------------------

M, D, F, E = 4096, 4096, 14336, 8
_BF16 = jnp.bfloat16


def _tpu_kernel_calls(fn, *shapes) -> int:
  args = [jax.ShapeDtypeStruct(s, d) for s, d in shapes]
  text = jax.jit(fn).trace(*args).lower(lowering_platforms=("tpu",)).as_text()
  return len(re.findall(r"tpu_custom_call", text))


def test_gmm_lowers_for_tpu():
  fn = lambda x, w, gs: pallas_tpu.gmm(x, w, gs)
  assert _tpu_kernel_calls(fn, ((M, D), _BF16), ((E, D, F), _BF16), ((E,), jnp.int32)) == 1


def test_gmm_transpose_rhs_lowers_for_tpu():
  fn = lambda dy, w, gs: pallas_tpu.gmm(dy, w, gs, transpose_rhs=True)
  assert _tpu_kernel_calls(fn, ((M, F), _BF16), ((E, D, F), _BF16), ((E,), jnp.int32)) == 1


def test_tgmm_lowers_for_tpu():
  fn = lambda x, dy, gs: pallas_tpu.tgmm(x, dy, gs)
  assert _tpu_kernel_calls(fn, ((M, D), _BF16), ((M, F), _BF16), ((E,), jnp.int32)) == 1


def test_gmm_with_grads_through_ops_lowers_for_tpu():
  """Forward, d lhs (gmm with transpose_rhs) and d rhs (tgmm): three Mosaic kernels."""

  def fn(x, w, gs):
    loss = lambda x, w: jnp.sum(gmm(x, w, gs, backend="pallas_tpu").astype(jnp.float32) ** 2)
    return jax.value_and_grad(loss, argnums=(0, 1))(x, w)

  assert _tpu_kernel_calls(fn, ((M, D), _BF16), ((E, D, F), _BF16), ((E,), jnp.int32)) == 3


def test_small_tiles_and_remainders_lower_for_tpu():
  """The interpret tests' tiles and remainder shapes are legal Mosaic blocks too."""
  fn = lambda x, w, gs: pallas_tpu.gmm(x, w, gs, **TILES)
  assert _tpu_kernel_calls(fn, ((37, 130), _BF16), ((3, 130, 130), _BF16), ((3,), jnp.int32)) == 1
  fn = lambda x, dy, gs: pallas_tpu.tgmm(x, dy, gs, **TILES)
  assert _tpu_kernel_calls(fn, ((37, 130), _BF16), ((37, 130), _BF16), ((3,), jnp.int32)) == 1


# ------------------------------------------------------------------------------------------------
# Compiled by the real TPU compiler without a TPU (catches VMEM overflow, which lowering does not).
# Needs libtpu, which the dev environment does not install: e.g.
#   pip install --no-deps --target /tmp/libtpu "libtpu==0.0.42.*"
#   PYTHONPATH=/tmp/libtpu python -m pytest tests/kernels/test_pallas_tpu.py -m slow -k compile
# ------------------------------------------------------------------------------------------------


def _compile_for_tpu(topology: str, fn, *shapes):
  pytest.importorskip("libtpu")
  from jax.experimental import topologies

  device = topologies.get_topology_desc(topology, "tpu").devices[0]
  sharding = jax.sharding.SingleDeviceSharding(device)
  args = [jax.ShapeDtypeStruct(s, d, sharding=sharding) for s, d in shapes]
  return jax.jit(fn).trace(*args).lower().compile()


@pytest.mark.slow
@pytest.mark.parametrize("topology", ["v5e:2x2", "v6e:2x2", "v5p:2x2x1"])
def test_default_tiles_compile_for_tpu_in_bfloat16(topology):
  def fn(x, w, gs):
    loss = lambda x, w: jnp.sum(gmm(x, w, gs, backend="pallas_tpu").astype(jnp.float32) ** 2)
    return jax.value_and_grad(loss, argnums=(0, 1))(x, w)

  _compile_for_tpu(topology, fn, ((M, D), _BF16), ((E, D, F), _BF16), ((E,), jnp.int32))


@pytest.mark.slow
def test_float32_default_tiles_compile_for_v5e_with_a_larger_vmem_limit():
  """float32 doubles every tile: 18 MiB of scoped VMEM against v5e's default 16 MiB."""
  shapes = (((M, D), jnp.float32), ((E, D, F), jnp.float32), ((E,), jnp.int32))
  with pytest.raises(jax.errors.JaxRuntimeError, match="CompileTimeScopedVmemOom"):
    _compile_for_tpu("v5e:2x2", lambda x, w, gs: pallas_tpu.gmm(x, w, gs), *shapes)
  fn = lambda x, w, gs: pallas_tpu.gmm(x, w, gs, vmem_limit_bytes=32 << 20)
  _compile_for_tpu("v5e:2x2", fn, *shapes)

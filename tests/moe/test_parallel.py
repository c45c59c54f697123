"""Expert parallelism: the MoE layer under a mesh equals the layer on one device.

The single-device layer is itself checked against the float64 per-expert loop in test_layer.py; here
every mesh layout, dispatch, router and transport must reproduce it, outputs and gradients (with
respect to the input and every parameter), within 1e-5 relative.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AbstractDevice, AbstractMesh, AxisType

from moejax import sharding
from moejax.moe import MoE, MoEConfig, ep_transport, parallel

D, F, E = 32, 16, 8
RTOL = 1e-5

MESHES = {
  "1x8": dict(data=1, expert=8),
  "2x4": dict(data=2, expert=4),
  "4x2": dict(data=4, expert=2),
  "8x1": dict(data=8, expert=1),
  "2x2x2": dict(data=2, fsdp=2, expert=2),
}


def _config(**kw):
  base = dict(d_model=D, num_experts=E, top_k=2, expert_hidden_dim=F)
  return MoEConfig(**(base | kw))


def _quick(**kw):
  """A config on the ragged_dot backend, which compiles faster on CPU than the blocked one; the
  mesh tests above run the default backend."""
  return _config(gmm_backend="xla", **kw)


def _run(cfg, mesh_cfg, x, *, token_mask=None, rules=None, seed=0, skew=0.0):
  """(y, grads wrt (params, x), aux) of sum(y * cos(y)), on one device or under a mesh."""
  model = MoE(cfg, rngs=nnx.Rngs(seed))
  model.router.deterministic = True
  if skew:  # push most tokens to experts 0 and 1: a skewed routing for LLEP
    x = x + 1.0
    model.router.kernel[...] = model.router.kernel[...].at[:, :2].add(skew / D)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(params, x):
    y, aux = nnx.merge(graphdef, params, rest)(x, token_mask=token_mask)
    return jnp.sum(y * jnp.cos(y)), (y, aux)

  f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
  if mesh_cfg is None:
    (_, (y, aux)), grads = f(params, x)
  else:
    mesh = sharding.make_mesh(mesh_cfg)
    with jax.set_mesh(mesh), sharding.use_rules(rules or sharding.LOGICAL_RULES):
      (_, (y, aux)), grads = f(params, x)
  return y, grads, aux


_REFERENCE = {}


def _reference(cfg, x, **kw):
  """The single-device result, computed once per configuration (compiles dominate these tests)."""
  key = (cfg, tuple(sorted(kw.items())))
  if key not in _REFERENCE:
    _REFERENCE[key] = _run(cfg, None, x, **kw)
  return _REFERENCE[key]


def _assert_close(a, b, what):
  scale = float(jnp.max(jnp.abs(b))) or 1.0
  err = float(jnp.max(jnp.abs(a - b))) / scale
  assert err <= RTOL, f"{what}: max error {err:.2e} x max|ref| (allowed {RTOL})"


def _assert_same(got, ref):
  (y1, g1, a1), (y0, g0, a0) = got, ref
  _assert_close(y1, y0, "output")
  for (path, a), b in zip(jax.tree.leaves_with_path(g1), jax.tree.leaves(g0), strict=True):
    _assert_close(a, b, f"gradient {jax.tree_util.keystr(path)}")
  np.testing.assert_allclose(a1["dropped_fraction"], a0["dropped_fraction"], atol=1e-7)
  np.testing.assert_array_equal(a1["expert_counts"], a0["expert_counts"])


@pytest.fixture(scope="module")
def x():
  return jax.random.normal(jax.random.PRNGKey(1), (4, 16, D))


# The fast tier runs one mesh (2x4); the others, and most layouts below, are the slow tier.
@pytest.mark.parametrize(
  "mesh", [m if m == "2x4" else pytest.param(m, marks=pytest.mark.slow) for m in MESHES]
)
@pytest.mark.parametrize(
  "kw",
  [dict(), dict(dispatch="capacity", capacity_factor=0.5)],
  ids=["dropless", "capacity"],
)
def test_mesh_equals_one_device(mesh, kw, x):
  cfg = _config(**kw)
  ref = _reference(cfg, x)
  got = _run(cfg, MESHES[mesh], x)
  _assert_same(got, ref)
  if kw:  # the capacity really drops copies, and exactly the single device's
    assert float(ref[2]["dropped_fraction"]) > 0.2
  # Every copy is computed exactly once somewhere.
  kept = round(float(jnp.sum(ref[2]["expert_counts"])) * (1 - float(ref[2]["dropped_fraction"])))
  assert float(jnp.sum(got[2]["device_load"])) == kept


@pytest.mark.parametrize(
  "kw",
  [
    dict(router="expert_choice", capacity_factor=1.0),
    pytest.param(dict(router="top_p", top_p=0.6, top_k=3), marks=pytest.mark.slow),
    pytest.param(
      dict(router="sigmoid", num_groups=4, topk_groups=2, routed_scaling_factor=2.5),
      marks=pytest.mark.slow,
    ),
    pytest.param(
      dict(num_shared_experts=1, shared_expert_gate=True, norm_topk_prob=False),
      marks=pytest.mark.slow,
    ),
    # Switch scales by the raw top-1 probability. Renormalised, a top-1 weight is exactly 1 and
    # the router gets no gradient: both sides then compare rounding noise (~1e-6 on AVX-512).
    pytest.param(
      dict(
        activation="gelu", top_k=1, norm_topk_prob=False, dispatch="capacity", capacity_factor=1.0
      ),
      marks=pytest.mark.slow,
    ),
    pytest.param(dict(num_experts=16, top_k=4, expert_hidden_dim=8), marks=pytest.mark.slow),
  ],
  ids=["expert_choice", "top_p", "sigmoid_grouped", "shared", "switch_capacity", "fine_grained"],
)
def test_routers_and_experts_under_ep(kw, x):
  cfg = _quick(**kw)
  _assert_same(_run(cfg, MESHES["2x4"], x), _reference(cfg, x))


@pytest.mark.slow
def test_padding_is_not_dispatched_under_ep(x):
  mask = jnp.ones(x.shape[:2], jnp.int32).at[:, 11:].set(0).at[0, :5].set(0)
  cfg = _quick(dispatch="capacity", capacity_factor=0.75)
  ref = _run(cfg, None, x, token_mask=mask)
  got = _run(cfg, MESHES["2x4"], x, token_mask=mask)
  _assert_same(got, ref)
  assert float(jnp.sum(got[2]["device_load"])) <= 2 * int(mask.sum())


@pytest.mark.slow
def test_expert_tensor_parallel_and_folding(x):
  """Experts' F split over `tensor` (psum), and MoE Parallel Folding: experts over expert x tensor."""
  cfg = _config()
  ref = _reference(cfg, x)
  mesh = dict(data=2, expert=2, tensor=2)
  _assert_same(_run(cfg, mesh, x), ref)
  folded = sharding.logical_rules("expert,tensor")
  got = _run(cfg, mesh, x, rules=folded)
  _assert_same(got, ref)
  assert got[2]["device_load"].shape == (8,)  # tokens now split over all 8 devices
  lay = parallel.layout(sharding.make_mesh(mesh), cfg, 64, folded)
  assert lay.expert_axes == ("expert", "tensor") and lay.tensor_axes == () and lay.ep_size == 4


@pytest.mark.slow
def test_ragged_transport_index_arithmetic_on_cpu(x, monkeypatch):
  """XLA:CPU cannot compile ragged_all_to_all; its semantics emulated by a padded all_to_all run
  the ragged transport's offsets and sizes, which must give the same result."""
  monkeypatch.setattr(ep_transport, "ragged_all_to_all", ep_transport.emulated_ragged_all_to_all)
  ref = _run(_quick(), None, x, skew=3.0)
  for kw in (dict(), dict(llep_alpha=1.0)):
    got = _run(_quick(ep_transport="ragged", **kw), MESHES["2x4"], x, skew=3.0)
    _assert_same(got, ref)
  # Ragged sends only routed rows: fewer bytes than the padded buffers.
  padded = _run(_quick(llep_alpha=1.0), MESHES["2x4"], x, skew=3.0)
  _assert_same(padded, ref)
  assert float(got[2]["a2a_bytes"]) < float(padded[2]["a2a_bytes"])


def test_auto_transport_is_padded_on_cpu_and_ragged_lowers_for_accelerators():
  assert parallel.choose_transport("auto", "cpu") == "padded"
  assert parallel.choose_transport("auto", "gpu") == "ragged"
  cfg = _config(gmm_backend="xla")
  model = MoE(cfg, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def f(params, x):
    return nnx.merge(graphdef, params, rest)(x)[0]

  x = jax.ShapeDtypeStruct((4, 16, D), jnp.float32)
  texts = {}
  for platform, target in (("gpu", "cuda"), ("cpu", "cpu")):
    device = AbstractDevice(device_kind=platform, num_cores=None, platform=platform)
    mesh = AbstractMesh((2, 1, 4, 1), sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 4,
                        abstract_device=device)  # fmt: skip
    with jax.sharding.use_abstract_mesh(mesh):
      texts[platform] = jax.jit(f).trace(params, x).lower(lowering_platforms=(target,)).as_text()
  assert "ragged_all_to_all" in texts["gpu"]
  assert "ragged_all_to_all" not in texts["cpu"] and "all_to_all" in texts["cpu"]


@pytest.mark.slow  # test_llep_plan_properties is the fast tier's LLEP check
def test_llep_same_outputs_lower_max_load(x):
  ep = _run(_quick(), MESHES["1x8"], x, skew=3.0)
  llep = _run(_quick(llep_alpha=1.1, llep_slots=2), MESHES["1x8"], x, skew=3.0)
  _assert_same(llep, ep)
  _assert_same(llep, _run(_quick(), None, x, skew=3.0))
  native, load = np.asarray(ep[2]["device_load"]), np.asarray(llep[2]["device_load"])
  np.testing.assert_array_equal(np.asarray(llep[2]["native_device_load"]), native)
  assert native.max() > 2.0 * native.mean()  # the routing really is skewed
  assert load.sum() == native.sum()
  assert load.max() < native.max()
  assert load.max() <= 1.1 * native.mean() + 1


@pytest.mark.parametrize("seed", range(6))
def test_llep_plan_properties(seed):
  rng = np.random.default_rng(seed)
  n, el, slots = 4, 3, 2
  counts = rng.zipf(1.5, size=n * el).clip(0, 500).astype(np.int32) * rng.integers(0, 2, n * el)
  alpha = 1.2
  plan = jax.jit(parallel.llep_plan, static_argnums=(1, 2, 3))(jnp.asarray(counts), n, alpha, slots)
  share, hosted = np.asarray(plan.share), np.asarray(plan.hosted)
  native = counts.reshape(n, el).sum(1)
  np.testing.assert_array_equal(share.sum(1), counts)  # every copy computed exactly once
  assert (share >= 0).all()
  owner = np.arange(n * el) // el
  for d in range(n):  # a device computes only its own experts and those it hosts
    foreign = {int(e) for e in np.nonzero(share[:, d])[0] if owner[e] != d}
    assert foreign <= {int(e) for e in hosted[d] if e >= 0}
    assert len(foreign) <= slots
  if native.max() <= alpha * counts.sum() / n:
    np.testing.assert_array_equal(share[np.arange(n * el), owner], counts)  # no spill needed
  else:
    assert share.sum(0).max() < native.max()


def test_bad_layouts_are_named(x):
  with pytest.raises(ValueError, match=r"num_experts=6 .*expert-parallel size 4"):
    _run(_config(num_experts=6), MESHES["2x4"], x)
  with pytest.raises(ValueError, match=r"got 60 tokens"):
    parallel.layout(sharding.make_mesh(dict(data=1, expert=8)), _config(), 60)
  with pytest.raises(ValueError, match="ep_transport"):
    _config(ep_transport="nccl")
  with pytest.raises(ValueError, match="llep_alpha"):
    _config(llep_alpha=0.5)
  with pytest.raises(ValueError, match="expert_axes"):
    sharding.logical_rules("expert,pipeline")

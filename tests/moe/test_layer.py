"""The MoE layer against the independent per-expert reference (tests/moe/reference.py).

Tolerance: float32 implementation vs float64 reference, max |a - b| <= 1e-5 * max |b| per array,
for the output, the input gradient and the gradient of every parameter.
"""

import dataclasses
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax.moe import AuxFreeBias, MoE, MoEConfig, capacity_dispatch
from moejax.moe.router import route
from tests.moe import reference

RTOL = 1e-5
B, S, D, F = 2, 12, 16, 24


def assert_close(actual, expected, rtol=RTOL, what=""):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
  scale = np.abs(expected).max()
  err = np.abs(actual - expected).max()
  assert err <= rtol * scale, f"{what}: max err {err:.3e} > {rtol} * {scale:.3e}"


def flat_params(model) -> dict[str, np.ndarray]:
  """Every Param and the aux-free bias, keyed 'router.kernel', 'experts.w_up', ..."""
  state = nnx.state(model, (nnx.Param, AuxFreeBias))
  return {".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(state)}


def make(cfg: MoEConfig, seed=0):
  model = MoE(cfg, rngs=nnx.Rngs(seed))
  rng = np.random.default_rng(seed)
  if cfg.router_bias:
    model.router.bias[...] = jnp.asarray(rng.normal(size=cfg.num_experts), jnp.float32)
  if cfg.aux_free_bias:
    # Large enough to change the selection, so a bias leaking into the weights would show.
    model.router.aux_free_bias[...] = jnp.asarray(
      0.3 * rng.normal(size=cfg.num_experts), jnp.float32
    )
  x = jnp.asarray(rng.normal(size=(B, S, D)), jnp.float32)
  cot = jnp.asarray(rng.normal(size=(B, S, D)), jnp.float32)
  return model, x, cot


def check_against_reference(cfg: MoEConfig, seed=0, prepare=None):
  """`prepare(model)`, if given, edits the model's parameters before the comparison."""
  model, x, cot = make(cfg, seed)
  if prepare is not None:
    prepare(model)
  params = flat_params(model)
  xt = np.asarray(x, np.float64).reshape(B * S, D)
  chosen, requested = reference.select(cfg, params, xt)

  graphdef, state = nnx.split(model)

  @jax.jit
  def loss(state, x):
    y, aux = nnx.merge(graphdef, state)(x)
    return jnp.sum(y * cot), (y, aux)

  (_, (y, aux)), (g_state, g_x) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(state, x)

  with jax.enable_x64(True):
    p64 = {k: jnp.asarray(v, jnp.float64) for k, v in params.items()}
    nondiff = {k: p64.pop(k) for k in list(p64) if k.endswith("aux_free_bias")}
    del nondiff  # selection only: already used by `select`
    x64 = jnp.asarray(xt)
    cot64 = jnp.asarray(np.asarray(cot, np.float64).reshape(B * S, D))

    def ref_loss(p, x):
      return jnp.sum(reference.forward(cfg, p, x, chosen, requested) * cot64)

    y_ref = reference.forward(cfg, p64, x64, chosen, requested)
    g_ref, gx_ref = jax.grad(ref_loss, argnums=(0, 1))(p64, x64)
    y_ref, gx_ref = np.asarray(y_ref), np.asarray(gx_ref)
    g_ref = {k: np.asarray(v) for k, v in g_ref.items()}

  assert_close(y.reshape(B * S, D), y_ref, what="output")
  assert_close(g_x.reshape(B * S, D), gx_ref, what="grad x")
  g_flat = {".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(g_state)}
  for name, g in g_ref.items():
    assert_close(g_flat[name], g, what=f"grad {name}")
  # Every parameter has a reference gradient: nothing is left unchecked.
  trained = {k for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  assert {".".join(map(str, k)) for k in trained} == set(g_ref)

  expected_drop = 1.0 - chosen.sum() / requested.sum()
  np.testing.assert_allclose(float(aux["dropped_fraction"]), expected_drop, atol=1e-6)
  np.testing.assert_allclose(np.asarray(aux["expert_counts"]), requested.sum(0), atol=0)
  np.testing.assert_allclose(float(aux["experts_per_token"]), requested.sum() / (B * S), rtol=1e-6)
  return chosen, requested


BASE = MoEConfig(d_model=D, num_experts=6, top_k=2, expert_hidden_dim=F)

ROUTER_CASES = {
  "mixtral": dict(router="softmax_topk", norm_topk_prob=True),
  "qwen2": dict(router="softmax_topk", norm_topk_prob=False),
  "switch_top1": dict(router="softmax_topk", top_k=1, norm_topk_prob=False),
  "softmax_bias": dict(router="softmax_topk", aux_free_bias=True, routed_scaling_factor=1.5),
  "topk_softmax": dict(router="topk_softmax", top_k=3),
  "deepseek_v3": dict(
    router="sigmoid",
    num_experts=8,
    top_k=3,
    num_groups=4,
    topk_groups=2,
    aux_free_bias=True,
    routed_scaling_factor=2.5,
  ),
  "sigmoid_plain": dict(router="sigmoid", norm_topk_prob=False),
  "deepseek_v2": dict(
    router="softmax_topk",
    num_experts=8,
    top_k=3,
    num_groups=4,
    topk_groups=2,
    norm_topk_prob=False,
    routed_scaling_factor=16.0,
  ),
  "expert_choice": dict(router="expert_choice", capacity_factor=1.0),
  "expert_choice_cf2": dict(router="expert_choice", capacity_factor=2.0),
  "top_p": dict(router="top_p", top_k=4, top_p=0.5),
  "top_p_norm": dict(router="top_p", top_k=3, top_p=0.7, norm_topk_prob=True),
  "router_bias": dict(router="softmax_topk", router_bias=True),
}


# The fast tier checks every router with dropless dispatch; capacity dispatch is checked against the
# reference below (drops, all tokens on one expert, padding), every router with it in the slow tier,
# as are the second variants of a router (no renormalisation, capacity factor 2, renormalised top-p).
SLOW_ROUTER_CASES = ("qwen2", "sigmoid_plain", "expert_choice_cf2", "top_p_norm")


@pytest.mark.parametrize("dispatch", ["dropless", pytest.param("capacity", marks=pytest.mark.slow)])
@pytest.mark.parametrize(
  "case",
  [pytest.param(c, marks=pytest.mark.slow) if c in SLOW_ROUTER_CASES else c for c in ROUTER_CASES],
)
def test_router_dispatch_matches_reference(case, dispatch):
  cfg = dataclasses.replace(BASE, dispatch=dispatch, **ROUTER_CASES[case])
  chosen, requested = check_against_reference(cfg, seed=zlib.crc32(case.encode()) % 1000)
  if dispatch == "dropless" or cfg.router == "expert_choice":
    assert (chosen == requested).all()


@pytest.mark.parametrize("capacity_factor", [0.5, pytest.param(1.0, marks=pytest.mark.slow), 1.25])
@pytest.mark.parametrize("top_k", [1, 2])
def test_capacity_drops_exactly_the_reference_tokens(capacity_factor, top_k):
  # Top-1 as in Switch: the raw probability is the weight (renormalised it would be constantly 1).
  cfg = dataclasses.replace(
    BASE,
    dispatch="capacity",
    top_k=top_k,
    capacity_factor=capacity_factor,
    norm_topk_prob=top_k > 1,
  )
  model, x, _ = make(cfg, seed=3)
  params = flat_params(model)
  xt = np.asarray(x).reshape(B * S, D)
  chosen, requested = reference.select(cfg, params, xt)
  routing = route(model.router.logits(jnp.asarray(xt)), cfg)
  _, plan = capacity_dispatch(jnp.asarray(xt), routing, cfg.capacity(B * S))
  kept = np.zeros_like(chosen)
  ids, keep = np.asarray(routing.expert_ids), np.asarray(plan.keep)
  for t in range(B * S):
    kept[t, ids[t][keep[t]]] = True
  np.testing.assert_array_equal(kept, chosen)
  if capacity_factor < 1:
    assert chosen.sum() < requested.sum()  # the case really drops
  check_against_reference(cfg, seed=3)


@pytest.mark.parametrize("activation", ["swiglu", "geglu", "gelu", "relu"])
def test_activations(activation):
  check_against_reference(dataclasses.replace(BASE, activation=activation))


@pytest.mark.parametrize(
  "shared",
  [
    dict(num_shared_experts=1, shared_expert_gate=True, shared_expert_hidden_dim=40),  # Qwen2-MoE
    dict(num_shared_experts=2),  # DeepSeekMoE
    dict(num_shared_experts=1, activation="gelu"),
  ],
)
@pytest.mark.parametrize("dispatch", ["dropless", pytest.param("capacity", marks=pytest.mark.slow)])
def test_shared_experts(shared, dispatch):
  check_against_reference(dataclasses.replace(BASE, dispatch=dispatch, **shared))


@pytest.mark.parametrize("backend", ["reference", "xla", "blas"])
def test_gmm_backends(backend):
  check_against_reference(dataclasses.replace(BASE, num_experts=8, top_k=2, gmm_backend=backend))


@pytest.mark.slow
def test_fine_grained_many_experts():
  check_against_reference(
    dataclasses.replace(BASE, num_experts=32, top_k=6, expert_hidden_dim=8, num_shared_experts=2)
  )


@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_all_tokens_on_one_expert(dispatch):
  cfg = dataclasses.replace(BASE, dispatch=dispatch, top_k=1, norm_topk_prob=False)
  model, x, _ = make(cfg)
  # A router that sends everything to expert 2: a huge logit for one expert.
  kernel = np.zeros((D, cfg.num_experts), np.float32)
  kernel[:, 2] = 50.0
  model.router.kernel[...] = jnp.asarray(kernel)
  xs = jnp.abs(x) + 0.1  # positive inputs so expert 2's logit dominates for every token
  y, aux = model(xs)
  assert float(aux["expert_load"][2]) == 1.0
  c = cfg.capacity(B * S)
  expected_drop = 0.0 if dispatch == "dropless" else 1.0 - c / (B * S)
  np.testing.assert_allclose(float(aux["dropped_fraction"]), expected_drop, atol=1e-6)
  # Dropped tokens have exactly zero output (no shared experts here).
  nonzero_rows = int((np.abs(np.asarray(y).reshape(B * S, D)).max(-1) > 0).sum())
  assert nonzero_rows == (B * S if dispatch == "dropless" else c)


@pytest.mark.parametrize("backend", ["reference", "xla", "blas"])
def test_gmm_backends_all_tokens_on_one_expert(backend):
  """Output and every gradient against the reference when one expert gets every token copy and
  the others none (top-1, dropless): one full group and seven empty ones in every kernel."""
  cfg = dataclasses.replace(
    BASE, num_experts=8, top_k=1, norm_topk_prob=False, router_bias=True, gmm_backend=backend
  )

  def route_all_to_expert_5(model):
    # Logits x @ kernel are O(1); a bias of 8 on expert 5 wins for every token while its
    # probability (~0.99) stays differentiable, so the router still gets a real gradient.
    bias = np.zeros(cfg.num_experts, np.float32)
    bias[5] = 8.0
    model.router.bias[...] = jnp.asarray(bias)

  chosen, requested = check_against_reference(cfg, seed=3, prepare=route_all_to_expert_5)
  assert requested.sum(0)[5] == B * S and requested.sum() == B * S


def test_bf16_activations_keep_router_in_float32():
  cfg = dataclasses.replace(BASE, dtype=jnp.bfloat16)
  model, x, _ = make(cfg)
  y, aux = model(x.astype(jnp.bfloat16))
  assert y.dtype == jnp.bfloat16
  routing = model.router(x.reshape(B * S, D).astype(jnp.bfloat16))
  assert routing.logits.dtype == jnp.float32 and routing.weights.dtype == jnp.float32
  ref_model, _, _ = make(dataclasses.replace(BASE))
  y32, _ = ref_model(x)
  # bf16 has an 8-bit mantissa: 2^-8 relative per op, a few ops deep.
  assert_close(y.astype(jnp.float32), y32, rtol=3e-2, what="bf16 output")


def test_jitter_only_in_training():
  cfg = dataclasses.replace(BASE, jitter_noise=0.1)
  model = MoE(cfg, rngs=nnx.Rngs(params=0, jitter=1))
  x = jnp.asarray(np.random.default_rng(0).normal(size=(B, S, D)), jnp.float32)
  model.eval()
  l1 = model.router.logits(x.reshape(-1, D))
  l2 = model.router.logits(x.reshape(-1, D))
  np.testing.assert_array_equal(l1, l2)
  model.train()
  l3 = model.router.logits(x.reshape(-1, D))
  l4 = model.router.logits(x.reshape(-1, D))
  assert not np.allclose(l3, l1) and not np.allclose(l3, l4)
  # The noise is multiplicative on the router input within (1 - eps, 1 + eps).
  kernel = np.asarray(model.router.kernel[...])
  ratio_bound = np.abs(np.asarray(x).reshape(-1, D)) @ np.abs(kernel) * 0.1
  assert (np.abs(np.asarray(l3) - np.asarray(l1)) <= ratio_bound + 1e-5).all()


def test_parameter_names_and_shapes():
  cfg = dataclasses.replace(
    BASE, num_shared_experts=2, shared_expert_gate=True, aux_free_bias=True, router_bias=True
  )
  model = MoE(cfg, rngs=nnx.Rngs(0))
  shapes = {k: v.shape for k, v in flat_params(model).items()}
  e, fs = cfg.num_experts, 2 * F
  assert shapes == {
    "router.kernel": (D, e),
    "router.bias": (e,),
    "router.aux_free_bias": (e,),
    "experts.w_gate": (e, D, F),
    "experts.w_up": (e, D, F),
    "experts.w_down": (e, F, D),
    "shared_experts.w_gate": (D, fs),
    "shared_experts.w_up": (D, fs),
    "shared_experts.w_down": (fs, D),
    "shared_experts.gate": (D, 1),
  }
  # The bias is state, not a trainable parameter.
  params = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  assert "router.aux_free_bias" not in params


def test_dropped_fraction_counts_only_real_tokens():
  cfg = dataclasses.replace(BASE, dispatch="capacity", capacity_factor=0.5)
  model, x, _ = make(cfg, seed=4)
  params = flat_params(model)
  real = np.arange(B * S) % S < S - 3  # the last 3 positions of each sequence are padding
  xt = np.asarray(x, np.float64).reshape(B * S, D)
  chosen, requested = reference.select(cfg, params, xt, real)
  _, aux = model(x, token_mask=jnp.asarray(real.reshape(B, S)))
  expected = 1.0 - chosen.sum() / requested.sum()
  np.testing.assert_allclose(float(aux["dropped_fraction"]), expected, atol=1e-6)
  unmasked, all_requested = reference.select(cfg, params, xt)
  assert expected != 1.0 - unmasked.sum() / all_requested.sum()  # the mask changes the answer


@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_padding_is_not_dispatched(dispatch):
  cfg = dataclasses.replace(BASE, dispatch=dispatch, top_k=1, norm_topk_prob=False)
  model, x, _ = make(cfg)
  kernel = np.zeros((D, cfg.num_experts), np.float32)
  kernel[:, 2] = 50.0  # every token wants expert 2
  model.router.kernel[...] = jnp.asarray(kernel)
  xs = jnp.abs(x) + 0.1
  real = np.arange(S) >= 3  # padding first: in token order it would take expert 2's slots first
  mask = jnp.asarray(np.broadcast_to(real, (B, S)))
  y, aux = model(xs, token_mask=mask)
  y = np.asarray(y)
  assert np.abs(y[:, ~real]).max() == 0.0  # padding gets no expert output
  served = int((np.abs(y[:, real]).max(-1) > 0).sum())
  n_real = int(real.sum()) * B
  c = cfg.capacity(B * S)
  assert served == (n_real if dispatch == "dropless" else min(c, n_real))
  assert float(aux["expert_counts"].sum()) == n_real
  # Real tokens' outputs do not depend on whether padding is present (dropless is per token), up
  # to float32 rounding: the default CPU backend hands each expert's rows to a BLAS GEMM, which
  # picks its kernel (and so its summation order) by the number of rows, and padding changes that
  # number. The bound is relative to the largest output, as in the kernel tests.
  if dispatch == "dropless":
    y_all = np.asarray(model(xs)[0])[:, real]
    assert np.abs(y[:, real] - y_all).max() <= 1e-6 * np.abs(y_all).max()

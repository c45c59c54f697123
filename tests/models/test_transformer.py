"""The Transformer LM: forward shapes, aux, scanned == unscanned, gradients, causality, big configs.

Every model here shares one set of tiny shapes so eager initialisers compile once, models draw their
initial values from `unsafe_rbg` keys (XLA:CPU compiles threefry initialisers about 4x slower), and
each compiled function is reused across tests where it can be: CI machines have 2 shared cores.
Tolerance for scanned vs unscanned (same parameters, float32): max |a - b| <= 1e-5 * max |b|.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax.models import (
  ModelConfig,
  Transformer,
  layer_layout,
  lm_loss,
  stack_layers,
  unstack_layers,
)
from moejax.moe import AuxFreeBias, MoEConfig
from moejax.testing import tiny_model_config, tiny_moe_config

RTOL = 1e-5
B, S, V, D, E = 2, 8, 64, 32, 4

MOE = tiny_moe_config(router="sigmoid", aux_free_bias=True)  # D=32, E=4, K=2, F=16
# Dense, two layers (V=64, D=32, H=4, 2 kv heads, dense F=48).
BASE = tiny_model_config(
  moe=None, load_balance_coef=0.01, seq_balance_coef=0.003, z_loss_coef=0.002
)
assert (BASE.vocab_size, BASE.d_model, MOE.num_experts) == (V, D, E)
# Layers 0 dense | (1 MoE, 2 dense) x 2 scanned periods | 5 MoE: prefix, scan and suffix all used.
PATTERN = BASE.replace(num_layers=6, moe=MOE, first_k_dense=1, moe_every=2)


def assert_close(actual, expected, rtol=RTOL, what=""):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
  err, scale = np.abs(actual - expected).max(), np.abs(expected).max()
  assert err <= rtol * scale, f"{what}: max err {err:.3e} > {rtol} * {scale:.3e}"


# LLVM backend optimisations double XLA:CPU compile time and buy nothing at test sizes.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def rngs(seed=0) -> nnx.Rngs:
  return nnx.Rngs(jax.random.key(seed, impl="unsafe_rbg"))


def tokens(seed=0):
  # Distinct tokens in the whole batch, so each embedding row's gradient comes from one position.
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.permutation(V)[: B * S].reshape(B, S), jnp.int32)


def flat(state) -> dict[str, np.ndarray]:
  return {".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(state)}


@functools.cache
def _train_fn(graphdef):
  """jit(value_and_grad) of lm_loss + aux_loss wrt the Params, one compile per model structure."""

  def loss_fn(params, rest, tokens, mask):
    model = nnx.merge(graphdef, params, rest)
    logits, aux = model(tokens, token_mask=mask)
    loss, _ = lm_loss(logits[:, :-1], tokens[:, 1:], mask[:, 1:])
    return loss + aux["aux_loss"], (logits, aux)

  return jax.jit(jax.value_and_grad(loss_fn, has_aux=True), compiler_options=FAST_COMPILE)


@functools.cache
def _forward_fn(graphdef):
  return jax.jit(lambda state, t: nnx.merge(graphdef, state)(t), compiler_options=FAST_COMPILE)


def forward(model, tokens):
  """model(tokens), compiled once per model structure."""
  graphdef, state = nnx.split(model)
  return _forward_fn(graphdef)(state, tokens)


def train_step(model, tokens, mask=None):
  """(loss, logits, aux, grads) of one training step; grads is an nnx.State of the Params."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  mask = jnp.ones(tokens.shape, jnp.float32) if mask is None else mask
  (loss, (logits, aux)), grads = _train_fn(graphdef)(params, rest, tokens, mask)
  return loss, logits, aux, grads


@functools.cache
def pattern_models():
  """The PATTERN model scanned, and an unscanned one holding the very same variables."""
  unscanned = Transformer(PATTERN, rngs=rngs())
  # Move the aux-free biases off zero, so a bias routed to the wrong layer would show.
  rng = np.random.default_rng(0)
  for i in PATTERN.moe_layers:
    unscanned.blocks[i].moe.router.aux_free_bias[...] = jnp.asarray(
      0.3 * rng.normal(size=E), jnp.float32
    )
  # The scanned model is built abstractly (a scanned initialiser runs in test_dense_scanned_forward).
  scanned = nnx.eval_shape(lambda: Transformer(PATTERN.replace(scan_layers=True), rngs=rngs()))
  nnx.update(scanned, stack_layers(nnx.state(unscanned), PATTERN))
  return scanned, unscanned


def test_parameter_paths_and_logical_axes():
  scanned, unscanned = pattern_models()
  shapes = {k: v.shape for k, v in flat(nnx.state(unscanned, nnx.Param)).items()}
  assert shapes["embed.embedding"] == (V, D) and shapes["lm_head.kernel"] == (D, V)
  assert shapes["blocks.0.attn.q_proj.kernel"] == (D, 4, 8)
  assert shapes["blocks.0.mlp.w_up"] == (D, 48) and "blocks.0.moe.router.kernel" not in shapes
  assert shapes["blocks.1.moe.experts.w_up"] == (E, D, 16) and "blocks.1.mlp.w_up" not in shapes
  assert shapes["blocks.5.moe.router.kernel"] == (D, E)
  scanned_state = nnx.state(scanned)
  q = scanned_state["scanned_blocks"][0]["attn"]["q_proj"]["kernel"]
  assert q.shape == (2, D, 4, 8)
  assert q.get_metadata()["logical_axes"] == ("layers", "embed", "heads", "kv")
  assert set(flat(scanned_state)) >= {
    "prefix_blocks.0.mlp.w_up",
    "suffix_blocks.0.moe.router.kernel",
  }
  assert layer_layout(PATTERN) == (1, 2, 2, 1)
  # stack_layers produces exactly the variables (paths, shapes, logical axes) the model creates.
  fresh = nnx.state(
    nnx.eval_shape(lambda: Transformer(PATTERN.replace(scan_layers=True), rngs=rngs()))
  )
  stacked = stack_layers(nnx.state(unscanned), PATTERN)
  meta = lambda state: {
    ".".join(map(str, p)): (v.get_value().shape, v.get_metadata().get("logical_axes"))
    for p, v in nnx.to_flat_state(state)
  }
  assert meta(stacked) == meta(fresh)
  # stack_layers inverts unstack_layers.
  restacked = flat(stack_layers(unstack_layers(scanned_state, PATTERN), PATTERN))
  original = flat(scanned_state)
  assert restacked.keys() == original.keys()
  for k in original:
    np.testing.assert_array_equal(restacked[k], original[k], err_msg=k)


def test_scan_matches_unscanned_logits_aux_and_grads():
  scanned, unscanned = pattern_models()
  toks = tokens()
  loss_s, logits_s, aux_s, grads_s = train_step(scanned, toks)
  loss_u, logits_u, aux_u, grads_u = train_step(unscanned, toks)
  assert logits_u.shape == (B, S, V) and logits_u.dtype == jnp.float32
  assert_close(logits_s, logits_u, what="logits")
  assert_close(loss_s, loss_u, what="loss")
  for k in aux_u:
    assert_close(aux_s[k], aux_u[k], what=k)
  g_s, g_u = flat(unstack_layers(grads_s, PATTERN)), flat(grads_u)
  assert g_s.keys() == g_u.keys()
  for k in g_u:
    assert_close(g_s[k], g_u[k], what=f"grad {k}")


def test_aux_structure():
  _, model = pattern_models()
  toks = tokens(1)

  graphdef, state = nnx.split(model)

  @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
  def run(state, toks):
    model = nnx.merge(graphdef, state)
    _, aux = model(toks)
    # Independently: run the blocks by hand and ask each MoE layer for its own counts.
    x, counts = model.embed(toks), []
    for block in model.blocks:
      x, layer_aux = block(x, None, None, None)
      if layer_aux is not None:
        counts.append(layer_aux["expert_counts"])
    return aux, jnp.stack(counts)

  aux, counts = run(state, toks)
  L = PATTERN.num_moe_layers  # noqa: N806
  assert L == 3
  assert aux["expert_counts"].shape == aux["expert_load"].shape == (L, E)
  assert aux["dropped_fraction"].shape == aux["router_entropy"].shape == (L,)
  np.testing.assert_array_equal(np.asarray(aux["expert_counts"]), np.asarray(counts))
  np.testing.assert_allclose(np.asarray(aux["expert_counts"]).sum(-1), B * S * 2)  # dropless, K=2
  np.testing.assert_allclose(np.asarray(aux["expert_load"]).sum(-1), 1.0, rtol=1e-6)
  weighted = (
    PATTERN.load_balance_coef * aux["load_balance_loss"]
    + PATTERN.seq_balance_coef * aux["seq_balance_loss"]
    + PATTERN.z_loss_coef * aux["router_z_loss"]
  )
  # The per-loss values are averages over the MoE layers; aux_loss sums over them.
  assert_close(aux["aux_loss"], L * weighted, what="aux_loss")
  assert float(aux["aux_loss"]) > 0
  assert all(v.dtype == jnp.float32 for v in aux.values())


@pytest.mark.parametrize("scan", [False, True], ids=["unscanned", "scanned"])
def test_update_aux_free_bias(scan):
  scanned, unscanned = pattern_models()
  model = nnx.clone(scanned if scan else unscanned)
  params = flat(nnx.state(model, nnx.Param))
  before = flat(
    unstack_layers(nnx.state(model, AuxFreeBias), PATTERN)
    if scan
    else nnx.state(model, AuxFreeBias)
  )
  counts = jnp.asarray(np.random.default_rng(0).integers(0, 10, (3, E)), jnp.float32)
  model.update_aux_free_bias(counts)
  state = nnx.state(model, AuxFreeBias)
  after = flat(unstack_layers(state, PATTERN) if scan else state)
  keys = [f"blocks.{i}.moe.router.aux_free_bias" for i in PATTERN.moe_layers]
  assert sorted(after) == sorted(keys)
  rate = MOE.aux_free_bias_rate
  for row, k in enumerate(keys):
    c = np.asarray(counts[row])
    np.testing.assert_allclose(after[k] - before[k], rate * np.sign(c.mean() - c), atol=1e-7)
  # No parameter is touched.
  for k, v in flat(nnx.state(model, nnx.Param)).items():
    np.testing.assert_array_equal(v, params[k], err_msg=k)


def test_training_step_finite_grads_and_causal_loss():
  _, model = pattern_models()
  toks = tokens(2)
  loss, _, _, grads = train_step(model, toks)
  assert np.isfinite(float(loss))
  for k, g in flat(grads).items():
    assert np.all(np.isfinite(g)), k
    assert np.any(g != 0), f"no gradient reaches {k}"
  # Masking positions > t: the LM loss (predictions of tokens 1..t from positions 0..t-1) and the
  # MoE aux losses over positions 0..t (they mix tokens, so they get the mask as token_mask) must
  # send no gradient to the embeddings of the tokens after t.
  t = 4
  mask = jnp.broadcast_to((jnp.arange(S) <= t).astype(jnp.float32), (B, S))
  _, _, _, grads = train_step(model, toks, mask)
  g_embed = np.asarray(grads["embed"]["embedding"][...])  # [V, D]
  toks = np.asarray(toks)
  for b in range(B):
    for s in range(S):
      row = g_embed[toks[b, s]]
      if s > t:
        np.testing.assert_array_equal(row, 0.0, err_msg=f"position {s} > {t} gets a gradient")
      else:
        assert np.any(row != 0), f"position {s} <= {t} gets no gradient"


def test_dense_scanned_forward():
  # A dense model scans all its layers as periods of one.
  model = Transformer(BASE.replace(scan_layers=True), rngs=rngs())
  assert not model.prefix_blocks and not model.suffix_blocks
  q = np.asarray(model.scanned_blocks[0].attn.q_proj.kernel[...])
  assert q.shape == (2, D, 4, 8) and not np.allclose(q[0], q[1])  # layers initialised apart
  logits, aux = forward(model, tokens())
  assert logits.shape == (B, S, V) and logits.dtype == jnp.float32
  assert float(aux["aux_loss"]) == 0.0 and aux["expert_counts"].shape == (0, 0)
  assert aux["dropped_fraction"].shape == (0,)
  assert model.lm_head.kernel[...].shape == (D, V)
  model.update_aux_free_bias(aux["expert_counts"])  # no MoE layer: a no-op


def test_all_moe_bf16_tied():
  config = BASE.replace(
    moe=MOE.replace(dispatch="capacity", router="softmax_topk", aux_free_bias=False),
    dense_hidden_dim=None,
    tie_embeddings=True,
    dtype="bfloat16",
  )
  model = Transformer(config, rngs=rngs())
  assert model.lm_head is None and all(b.moe is not None for b in model.blocks)
  assert model.blocks[1].moe.experts.w_up[...].dtype == jnp.float32  # param_dtype
  logits, aux = forward(model, tokens())
  assert logits.shape == (B, S, V) and logits.dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(logits)))
  assert aux["expert_counts"].shape == (2, E) and aux["aux_loss"].dtype == jnp.float32
  model.update_aux_free_bias(aux["expert_counts"])  # no bias: a no-op


@pytest.mark.parametrize("scan", [False, True], ids=["unscanned", "scanned"])
def test_big_config_builds_abstractly(scan):
  moe = MoEConfig(d_model=4096, num_experts=64, top_k=8, expert_hidden_dim=1408)
  config = ModelConfig(
    vocab_size=102400,
    d_model=4096,
    num_layers=32 if scan else 8,
    num_heads=32,
    num_kv_heads=8,
    dense_hidden_dim=11008,
    moe=moe,
    first_k_dense=1,
    scan_layers=scan,
    param_dtype="bfloat16",
  )
  model = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
  params = nnx.state(model, nnx.Param)
  leaves = jax.tree.leaves(params)
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
  n = sum(int(np.prod(x.shape)) for x in leaves)
  assert all(x.dtype == jnp.bfloat16 for x in leaves)
  per_moe_layer = 3 * 64 * 4096 * 1408 + 4096 * 64
  assert n > (config.num_layers - 1) * per_moe_layer  # 32 layers: about 18 B parameters
  if scan:
    assert params["scanned_blocks"][0]["moe"]["experts"]["w_up"].shape == (31, 64, 4096, 1408)

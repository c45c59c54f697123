"""KV cache: prefill + one-token decoding steps give a full forward's logits.

GQA (with Qwen3-style QK norm) and MLA (DeepSeek-V3-style: q LoRA, interleaved RoPE, YaRN), each in
the unscanned and the scanned layout (the scanned model holds the very same variables, stacked),
with one left-padded row. The full forward masks padding with segment_ids and counts positions over
real tokens only; the cached calls pass token_mask and the same positions. Compiled functions are
shared across tests (2 CPU cores in CI). Tolerance (float32): max |a - b| <= 1e-5 * max |b| over
the real tokens.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax.models import MLA, ModelConfig, Transformer, stack_layers
from moejax.testing import tiny_model_config, tiny_moe_config

RTOL = 1e-5
B, S, V, D, E = 2, 8, 64, 32, 4
PREFILL, MAX_LEN = 5, 10  # prompt slots filled in one call, then S - PREFILL decoding steps
PAD = 3  # row 1 starts with PAD padding tokens

MOE = tiny_moe_config()  # D=32, E=4, K=2, F=16
YARN = (("factor", 4.0), ("original_max_position_embeddings", 4), ("rope_type", "yarn"))
# Layer 0 dense, layers 1-2 MoE: scanned, a dense prefix and two scanned periods.
GQA = tiny_model_config(num_layers=3, moe=MOE, first_k_dense=1, qk_norm="head")
assert (GQA.vocab_size, GQA.d_model, MOE.num_experts) == (V, D, E)
MLA_CONFIG = GQA.replace(
  num_kv_heads=None,
  qk_norm=None,
  attention="mla",
  q_lora_rank=12,
  kv_lora_rank=16,
  qk_nope_head_dim=8,
  qk_rope_head_dim=8,
  v_head_dim=12,
  rope_interleave=True,
  rope_scaling=YARN + (("mscale", 0.707), ("mscale_all_dim", 1.0)),
)
CONFIGS = {"gqa": GQA, "mla": MLA_CONFIG}

FAST_COMPILE = {"xla_backend_optimization_level": 0}


def assert_close(actual, expected, rtol=RTOL, what=""):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
  err, scale = np.abs(actual - expected).max(), np.abs(expected).max()
  assert err <= rtol * scale, f"{what}: max err {err:.3e} > {rtol} * {scale:.3e}"


def rngs(seed=0) -> nnx.Rngs:
  return nnx.Rngs(jax.random.key(seed, impl="unsafe_rbg"))


@functools.cache
def models(kind: str) -> tuple[Transformer, Transformer]:
  """(unscanned, scanned) models of CONFIGS[kind] holding the same variables."""
  config = CONFIGS[kind]
  unscanned = Transformer(config, rngs=rngs())
  scanned = nnx.eval_shape(lambda: Transformer(config.replace(scan_layers=True), rngs=rngs()))
  nnx.update(scanned, stack_layers(nnx.state(unscanned), config))
  return unscanned, scanned


def batch():
  """tokens, token_mask, positions [B, S]: row 1 left-padded, positions counting real tokens."""
  tokens = np.random.default_rng(0).integers(1, V, size=(B, S))
  mask = np.ones((B, S), np.int32)
  mask[1, :PAD] = 0
  tokens[mask == 0] = 0
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  return jnp.asarray(tokens, jnp.int32), jnp.asarray(mask), jnp.asarray(positions, jnp.int32)


@functools.cache
def _full_fn(graphdef):
  def full(state, tokens, mask, positions):
    model = nnx.merge(graphdef, state)
    return model(tokens, token_mask=mask, positions=positions, segment_ids=mask)[0]

  return jax.jit(full, compiler_options=FAST_COMPILE)


@functools.cache
def _prefill_fn(graphdef):
  def prefill(state, tokens, mask, positions):
    model = nnx.merge(graphdef, state)
    cache = model.init_cache(tokens.shape[0], MAX_LEN)  # inside jit: static sizes
    logits, _, cache = model(tokens, token_mask=mask, positions=positions, cache=cache)
    return logits, cache

  return jax.jit(prefill, compiler_options=FAST_COMPILE)


@functools.cache
def _step_fn(graphdef):
  def step(state, cache, tokens, mask, positions):
    model = nnx.merge(graphdef, state)
    logits, _, cache = model(tokens, token_mask=mask, positions=positions, cache=cache)
    return logits, cache

  return jax.jit(step, compiler_options=FAST_COMPILE)


def decode(model, tokens, mask, positions):
  """Logits [B, S, V] from a prefill of PREFILL tokens and one-token steps, and the final cache."""
  graphdef, state = nnx.split(model)
  p = PREFILL
  logits, cache = _prefill_fn(graphdef)(state, tokens[:, :p], mask[:, :p], positions[:, :p])
  out = [logits]
  for t in range(p, tokens.shape[1]):
    sl = slice(t, t + 1)
    logits, cache = _step_fn(graphdef)(state, cache, tokens[:, sl], mask[:, sl], positions[:, sl])
    out.append(logits)
  return jnp.concatenate(out, axis=1), cache


@functools.cache
def full_logits(kind):
  unscanned, _ = models(kind)
  graphdef, state = nnx.split(unscanned)
  return _full_fn(graphdef)(state, *batch())


# Scanned decoding is the slow tier here; test_dense_scanned_bf16_cache decodes scanned in the fast one.
@pytest.mark.parametrize(
  "scan", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["unscanned", "scanned"]
)
@pytest.mark.parametrize("kind", ["gqa", "mla"])
def test_decode_matches_full_forward(kind, scan):
  model = models(kind)[scan]
  tokens, mask, positions = batch()
  logits, cache = decode(model, tokens, mask, positions)
  expected = full_logits(kind)
  real = np.asarray(mask, bool)
  assert_close(np.asarray(logits)[real], np.asarray(expected)[real], what=f"{kind} logits")
  # The cache's bookkeeping, and the layout of its layers.
  assert int(cache["index"]) == S
  valid = np.zeros((B, MAX_LEN), bool)
  valid[:, :S] = real
  np.testing.assert_array_equal(np.asarray(cache["valid"]), valid)
  config = CONFIGS[kind]
  first = (cache["layers"]["prefix"] if scan else cache["layers"])[0]
  if kind == "gqa":
    assert first["k"].shape == first["v"].shape == (B, MAX_LEN, 2, 8)
  else:
    assert first["c_kv"].shape == (B, MAX_LEN, config.kv_lora_rank)
    assert first["k_pe"].shape == (B, MAX_LEN, config.qk_rope_head_dim)
  if scan:
    layers = cache["layers"]
    assert len(layers["prefix"]) == 1 and len(layers["scanned"]) == 1 and not layers["suffix"]
    leading = {a.shape[0] for a in jax.tree.leaves(layers["scanned"])}
    assert leading == {2}  # two scanned periods of one layer
    # The scanned periods wrote different caches (each period its own slice).
    leaf = jax.tree.leaves(layers["scanned"])[0]
    assert not np.allclose(np.asarray(leaf[0, :, :S]), np.asarray(leaf[1, :, :S]))
  else:
    assert len(cache["layers"]) == config.num_layers


def test_default_positions_and_mask():
  # No padding, no positions: a cached call counts positions from the cache index.
  model, _ = models("gqa")
  tokens = batch()[0].at[1, :PAD].set(5)
  graphdef, state = nnx.split(model)
  cache = model.init_cache(B, MAX_LEN)
  step = jax.jit(
    lambda state, cache, t: nnx.merge(graphdef, state)(t, cache=cache)[::2],
    compiler_options=FAST_COMPILE,
  )
  first, cache = step(state, cache, tokens[:, :4])
  second, cache = step(state, cache, tokens[:, 4:])
  expected, _ = jax.jit(lambda state, t: nnx.merge(graphdef, state)(t))(state, tokens)
  assert_close(jnp.concatenate([first, second], axis=1), expected, what="logits")
  assert int(cache["index"]) == S and bool(cache["valid"][:, :S].all())


def test_cache_rejects_segment_ids():
  model, _ = models("gqa")
  tokens = batch()[0]
  with pytest.raises(ValueError, match="segment_ids"):
    model(tokens, segment_ids=jnp.ones_like(tokens), cache=model.init_cache(B, MAX_LEN))


def test_mla_absorbed_and_expanded_cache_paths_agree():
  # The absorbed path (W_UK in the query, W_UV in the output) and the re-expanded one give the
  # same outputs, and both the cache-free forward's.
  mla = MLA(MLA_CONFIG, rngs=rngs(1))
  x = jnp.asarray(np.random.default_rng(1).normal(size=(B, S, D)), jnp.float32)
  graphdef, state = nnx.split(mla)

  @functools.partial(jax.jit, static_argnames="absorb", compiler_options=FAST_COMPILE)
  def run(state, x, absorb):
    attn = nnx.merge(graphdef, state)
    cache = attn.init_cache(B, MAX_LEN)
    valid = jnp.zeros((B, MAX_LEN), bool)
    outs = []
    for start, stop in ((0, PREFILL), (PREFILL, S)):  # a prefill, then the rest in one call
      index = jnp.asarray(start, jnp.int32)
      valid = valid.at[:, start:stop].set(True)
      t = jnp.arange(MAX_LEN)
      mask = valid[:, None, :] & (
        t[None, None, :] <= start + jnp.arange(stop - start)[None, :, None]
      )
      positions = jnp.broadcast_to(jnp.arange(start, stop), (B, stop - start))
      y, cache = attn(
        x[:, start:stop],
        positions=positions,
        cache=cache,
        cache_index=index,
        cache_mask=mask,
        absorb=absorb,
      )
      outs.append(y)
    return jnp.concatenate(outs, axis=1)

  expected = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))(state, x)
  assert_close(run(state, x, absorb=True), expected, what="absorbed")
  assert_close(run(state, x, absorb=False), expected, what="expanded")
  # The automatic choice: absorbed for one-token decoding, expanded for a long prompt.
  assert mla._absorbed_flops(1, 4096) < mla._expanded_flops(1, 4096)
  assert mla._absorbed_flops(4096, 4096) > mla._expanded_flops(4096, 4096)


def test_dense_scanned_bf16_cache():
  # A dense model scans every layer; the cache follows the activation dtype.
  config = GQA.replace(moe=None, first_k_dense=0, scan_layers=True, dtype="bfloat16")
  model = Transformer(config, rngs=rngs())
  tokens = batch()[0]
  graphdef, state = nnx.split(model)

  @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
  def run(state, tokens):
    model = nnx.merge(graphdef, state)
    cache = model.init_cache(B, MAX_LEN)
    logits, _, cache = model(tokens[:, :PREFILL], cache=cache)
    step, _, cache = model(tokens[:, PREFILL : PREFILL + 1], cache=cache)
    return jnp.concatenate([logits, step], axis=1), cache

  logits, cache = run(state, tokens)
  assert logits.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(logits)))
  k = cache["layers"]["scanned"][0]["k"]
  assert k.shape == (3, B, MAX_LEN, 2, 8) and k.dtype == jnp.bfloat16
  assert int(cache["index"]) == PREFILL + 1


def test_deepseek_v3_sized_mla_builds_abstractly():
  # DeepSeek-V3's attention (hidden 7168, 128 heads, q_lora 1536, kv_lora 512, 128 + 64 / 128).
  config = ModelConfig(
    vocab_size=1024,
    d_model=7168,
    num_layers=4,
    num_heads=128,
    dense_hidden_dim=256,
    attention="mla",
    q_lora_rank=1536,
    kv_lora_rank=512,
    qk_nope_head_dim=128,
    qk_rope_head_dim=64,
    v_head_dim=128,
    rope_interleave=True,
    rope_scaling={
      "rope_type": "yarn",
      "factor": 40.0,
      "original_max_position_embeddings": 4096,
      "beta_fast": 32,
      "beta_slow": 1,
      "mscale": 1.0,
      "mscale_all_dim": 1.0,
    },
    scan_layers=True,
    param_dtype="bfloat16",
  )
  model = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
  attn = nnx.state(model, nnx.Param)["scanned_blocks"][0]["attn"]
  n = sum(int(np.prod(x.shape[1:])) for x in jax.tree.leaves(attn))
  d, h = 7168, 128
  expected = d * 1536 + 1536 + 1536 * h * 192 + d * (512 + 64) + 512 + 512 * h * 256 + h * 128 * d
  assert n == expected  # about 187 M per layer, as in the released model
  cache = jax.eval_shape(lambda: model.init_cache(1, 4096))
  entry = cache["layers"]["scanned"][0]
  assert entry["c_kv"].shape == (4, 1, 4096, 512) and entry["k_pe"].shape == (4, 1, 4096, 64)

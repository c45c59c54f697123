"""Attention against an independent numpy float64 implementation (per-head loops, direct RoPE formula).

Tolerance: float32 implementation vs float64 reference, max |a - b| <= 1e-5 * max |b|.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax.models import (
  Attention,
  apply_rope,
  attention_mask,
  dot_product_attention,
  rope_angles,
)

RTOL = 1e-5
B, S, D = 2, 7, 32


def assert_close(actual, expected, rtol=RTOL, what=""):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
  err, scale = np.abs(actual - expected).max(), np.abs(expected).max()
  assert err <= rtol * scale, f"{what}: max err {err:.3e} > {rtol} * {scale:.3e}"


def rope_reference(x, positions, theta):
  """x [B, S, H, A] float64: dimension j pairs with j + A/2, rotated by p * theta^(-2j/A)."""
  a = x.shape[-1]
  out = np.empty_like(x)
  for j in range(a // 2):
    angle = positions[:, :, None] * theta ** (-2.0 * j / a)  # [B, S, 1]
    x1, x2 = x[..., j], x[..., j + a // 2]
    out[..., j] = x1 * np.cos(angle) - x2 * np.sin(angle)
    out[..., j + a // 2] = x2 * np.cos(angle) + x1 * np.sin(angle)
  return out


def attention_reference(params, x, positions, theta, segment_ids=None):
  """Per-head, per-query loops in float64."""
  q = np.einsum("bsd,dha->bsha", x, params["q_proj.kernel"])
  k = np.einsum("bsd,dha->bsha", x, params["k_proj.kernel"])
  v = np.einsum("bsd,dha->bsha", x, params["v_proj.kernel"])
  if "q_proj.bias" in params:
    q, k, v = q + params["q_proj.bias"], k + params["k_proj.bias"], v + params["v_proj.bias"]
  q, k = rope_reference(q, positions, theta), rope_reference(k, positions, theta)
  b, s, h, a = q.shape
  group = h // k.shape[2]
  out = np.zeros_like(q)
  for bi in range(b):
    for hi in range(h):
      kv = hi // group
      for si in range(s):
        keys = [
          t
          for t in range(si + 1)
          if segment_ids is None or segment_ids[bi, t] == segment_ids[bi, si]
        ]
        scores = np.array([q[bi, si, hi] @ k[bi, t, kv] for t in keys]) / np.sqrt(a)
        p = np.exp(scores - scores.max())
        p /= p.sum()
        out[bi, si, hi] = sum(pi * v[bi, t, kv] for pi, t in zip(p, keys, strict=True))
  return np.einsum("bsha,had->bsd", out, params["o_proj.kernel"])


def rngs(seed=0) -> nnx.Rngs:
  # XLA:CPU compiles threefry initialisers about 4x slower than these.
  return nnx.Rngs(jax.random.key(seed, impl="unsafe_rbg"))


# LLVM backend optimisations double XLA:CPU compile time and buy nothing at test sizes.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


@functools.cache
def _apply_fn(graphdef):
  return jax.jit(
    lambda state, x, **kw: nnx.merge(graphdef, state)(x, **kw), compiler_options=FAST_COMPILE
  )


def apply(attn, x, **kw):
  """attn(x, **kw), compiled once per structure (eager dispatch compiles every op separately)."""
  graphdef, state = nnx.split(attn)
  return _apply_fn(graphdef)(state, x, **kw)


def make(num_heads, num_kv_heads, qkv_bias=False, theta=10000.0, seed=0):
  attn = Attention(D, num_heads, num_kv_heads, rope_theta=theta, qkv_bias=qkv_bias, rngs=rngs(seed))
  rng = np.random.default_rng(seed)
  if qkv_bias:
    for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
      proj.bias[...] = jnp.asarray(rng.normal(size=proj.bias.shape), jnp.float32)
  params = {
    ".".join(map(str, p)): np.asarray(v[...], np.float64)
    for p, v in nnx.to_flat_state(nnx.state(attn, nnx.Param))
  }
  x = rng.normal(size=(B, S, D)).astype(np.float32)
  return attn, params, x


@pytest.mark.parametrize(
  "num_heads,num_kv_heads,qkv_bias",
  [(4, 4, False), (4, 2, True), (4, 1, False)],
  ids=["mha", "gqa-bias", "mqa"],
)
def test_attention_matches_reference(num_heads, num_kv_heads, qkv_bias):
  attn, params, x = make(num_heads, num_kv_heads, qkv_bias, theta=500.0)
  assert attn.k_proj.kernel.shape == (D, num_kv_heads, D // num_heads)
  positions = np.broadcast_to(np.arange(S), (B, S))
  y = apply(attn, jnp.asarray(x))
  assert_close(y, attention_reference(params, x.astype(np.float64), positions, 500.0), what="y")


def test_positions_and_segments_match_reference():
  attn, params, x = make(4, 2)
  positions = np.array([[3, 4, 5, 6, 7, 8, 9], [0, 1, 2, 0, 1, 2, 3]])
  segments = np.array([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 2, 2, 2, 2]])
  y = apply(
    attn, jnp.asarray(x), positions=jnp.asarray(positions), segment_ids=jnp.asarray(segments)
  )
  expected = attention_reference(params, x.astype(np.float64), positions, 10000.0, segments)
  assert_close(y, expected, what="y")
  # A packed second sequence equals the same tokens run alone from position 0.
  alone = apply(attn, jnp.asarray(x[1:, 3:]))
  assert_close(y[1:, 3:], alone, what="packed vs alone")


def test_causal():
  attn, _, x = make(4, 2)
  y = apply(attn, jnp.asarray(x))
  x2 = x.copy()
  x2[:, 4:] = np.random.default_rng(1).normal(size=x2[:, 4:].shape)
  y2 = apply(attn, jnp.asarray(x2))
  np.testing.assert_array_equal(np.asarray(y[:, :4]), np.asarray(y2[:, :4]))
  assert not np.allclose(np.asarray(y[:, 4:]), np.asarray(y2[:, 4:]))


def sdpa_reference(q, k, v, mask):
  """Per-head, per-query float64 softmax attention over the keys `mask` [B, S, T] allows."""
  b, s, h, a = q.shape
  group = h // k.shape[2]
  out = np.zeros(q.shape[:3] + v.shape[-1:])
  for bi, hi, si in np.ndindex(b, h, s):
    keys = np.flatnonzero(mask[bi, si])
    scores = k[bi, keys, hi // group] @ q[bi, si, hi] / np.sqrt(a)
    p = np.exp(scores - scores.max())
    out[bi, si, hi] = (p / p.sum()) @ v[bi, keys, hi // group]
  return out


def sdpa_grad_reference(q, k, v, mask, d_out):
  """dq, dk, dv of `sdpa_reference` for the cotangent d_out, per head and query in float64:
  p = softmax(s), s_j = q . k_j / sqrt(A); dv_j += p_j g, ds_j = p_j (g . v_j - sum_i p_i g . v_i),
  dq = sum_j ds_j k_j / sqrt(A), dk_j += ds_j q / sqrt(A), with g = d_out of that query."""
  b, s, h, a = q.shape
  group = h // k.shape[2]
  dq, dk, dv = np.zeros(q.shape), np.zeros(k.shape), np.zeros(v.shape)
  for bi, hi, si in np.ndindex(b, h, s):
    keys, kv = np.flatnonzero(mask[bi, si]), hi // group
    scores = k[bi, keys, kv] @ q[bi, si, hi] / np.sqrt(a)
    p = np.exp(scores - scores.max())
    p /= p.sum()
    g = d_out[bi, si, hi]
    dp = v[bi, keys, kv] @ g
    ds = p * (dp - p @ dp) / np.sqrt(a)
    dq[bi, si, hi] = ds @ k[bi, keys, kv]
    dk[bi, keys, kv] += ds[:, None] * q[bi, si, hi]
    dv[bi, keys, kv] += p[:, None] * g
  return dq, dk, dv


@pytest.mark.parametrize("causal", [False, True])
def test_gradients_match_float64_reference(causal):
  # The written-out softmax VJP (D = d_out . out, dv = e^T (d_out / l)) against per-query float64
  # derivatives; GQA (4 query heads on 2 kv heads), segments, and for causal=True query blocks.
  rng = np.random.default_rng(3)
  b, s, h, h_kv, a = 2, 6, 4, 2, 8
  q, k, v = (rng.normal(size=(b, s, n, a)) for n in (h, h_kv, h_kv))
  mask = attention_mask(s, jnp.array([[0, 0, 0, 0, 0, 0], [0, 0, 1, 1, 1, 2]]))
  d_out = rng.normal(size=(b, s, h, a))
  args = tuple(jnp.asarray(x, jnp.float32) for x in (q, k, v))

  def loss(*qkv):
    y = dot_product_attention(*qkv, mask, causal=causal, block_size=4)
    return jnp.sum(y * jnp.asarray(d_out, jnp.float32))

  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(*args)
  expected = sdpa_grad_reference(q, k, v, np.asarray(mask), d_out)
  for name, got, want in zip("qkv", grads, expected, strict=True):
    assert got.dtype == jnp.float32
    assert_close(got, want, what=f"d{name}")


def test_gradients_in_bfloat16_keep_the_dtype_and_follow_float32():
  rng = np.random.default_rng(4)
  q, k, v = (jnp.asarray(rng.normal(size=(2, 5, n, 8)), jnp.float32) for n in (4, 2, 2))
  d_out = jnp.asarray(rng.normal(size=(2, 5, 4, 8)), jnp.float32)

  def grads(dtype):
    loss = lambda *qkv: jnp.sum(
      dot_product_attention(*qkv, causal=True).astype(jnp.float32) * d_out
    )
    return jax.grad(loss, argnums=(0, 1, 2))(*(x.astype(dtype) for x in (q, k, v)))

  for name, low, full in zip("qkv", grads(jnp.bfloat16), grads(jnp.float32), strict=True):
    assert low.dtype == jnp.bfloat16
    assert_close(low, full, rtol=3e-2, what=f"bf16 d{name}")


def test_a_row_with_no_key_is_uniform_and_its_gradients_finite():
  rng = np.random.default_rng(5)
  q, k, v = (jnp.asarray(rng.normal(size=(1, 3, 2, 4)), jnp.float32) for _ in range(3))
  mask = jnp.asarray([[[True, False, False], [False, False, False], [True, True, True]]])
  y = dot_product_attention(q, k, v, mask)
  assert_close(y[0, 1], np.broadcast_to(np.asarray(v[0]).mean(axis=0), (2, 4)), what="uniform row")
  grads = jax.grad(lambda *qkv: jnp.sum(dot_product_attention(*qkv, mask)), argnums=(0, 1, 2))(
    q, k, v
  )
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)


# Block sizes 1, 3 (a short last block) and 16 (one block) in the fast tier; 2, 4 and 7 are slow.
@pytest.mark.parametrize(
  "block_size",
  [n if n in (1, 3, 16) else pytest.param(n, marks=pytest.mark.slow) for n in (1, 2, 3, 4, 7, 16)],
)
def test_causal_blocks_match_reference_and_full_computation(block_size):
  # Query blocks that skip the keys after their last row: S = 7 does not divide into most block
  # sizes (a short last block), and a segment mask rides along. Values and gradients must equal the
  # float64 reference and the unblocked computation.
  rng = np.random.default_rng(block_size)
  b, s, h, h_kv, a = 2, 7, 4, 2, 8
  q, k, v = (rng.normal(size=(b, s, n, a)) for n in (h, h_kv, h_kv))
  mask = attention_mask(s, jnp.array([[0, 0, 0, 0, 0, 0, 0], [0, 0, 1, 1, 1, 2, 2]]))
  args = tuple(jnp.asarray(x, jnp.float32) for x in (q, k, v))

  def attend(causal, *qkv):
    return dot_product_attention(*qkv, mask, causal=causal, block_size=block_size)

  y = jax.jit(functools.partial(attend, True))(*args)
  assert_close(y, sdpa_reference(q, k, v, np.asarray(mask)), what="blocked vs float64")
  cotangent = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
  grads = [
    jax.jit(jax.grad(lambda *qkv, c=c: jnp.sum(attend(c, *qkv) * cotangent), argnums=(0, 1, 2)))(
      *args
    )
    for c in (True, False)
  ]
  for name, blocked, full in zip("qkv", *grads, strict=True):
    assert_close(blocked, full, what=f"d{name}")


def test_causal_without_a_mask_is_the_causal_mask():
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(1, 6, 2, 4)), jnp.float32) for _ in range(3))
  for block_size in (2, 4, 8):
    y = dot_product_attention(q, k, v, causal=True, block_size=block_size)
    assert_close(y, sdpa_reference(*map(np.asarray, (q, k, v)), np.tril(np.ones((1, 6, 6), bool))))


def test_causal_needs_as_many_queries_as_keys():
  q = jnp.zeros((1, 3, 2, 4))
  with pytest.raises(ValueError, match="S=3, T=5"):
    dot_product_attention(q, jnp.zeros((1, 5, 2, 4)), jnp.zeros((1, 5, 2, 4)), causal=True)


def test_rope_formula_and_relative_positions():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(B, S, 3, 8))
  positions = rng.integers(0, 1000, size=(B, S))
  cos, sin = rope_angles(jnp.asarray(positions), 8, theta=10000.0)
  y = apply_rope(jnp.asarray(x, jnp.float32), cos, sin)
  assert_close(y, rope_reference(x, positions, 10000.0), what="rope")
  # q . k depends only on the offset between the positions.
  q, k = (jnp.asarray(rng.normal(size=(1, 1, 1, 8)), jnp.float32) for _ in range(2))

  def score(pq, pk):
    cq, sq = rope_angles(jnp.array([[pq]]), 8)
    ck, sk = rope_angles(jnp.array([[pk]]), 8)
    return float(jnp.sum(apply_rope(q, cq, sq) * apply_rope(k, ck, sk)))

  assert score(5, 2) == pytest.approx(score(105, 102), rel=1e-4)


@pytest.mark.parametrize(
  "scaling",
  [None, (("factor", 4.0), ("original_max_position_embeddings", 8), ("rope_type", "yarn"))],
)
def test_rope_angles_from_numpy_positions_are_the_traced_ones(scaling):
  # Positions known at trace time (numpy) give numpy cos, sin: constants of the program. They equal
  # the traced computation's, and one [1, S] row broadcasts over the batch in apply_rope.
  positions = np.arange(S)[None]  # [1, S]
  cos_np, sin_np = rope_angles(positions, 8, theta=500.0, scaling=scaling)
  assert isinstance(cos_np, np.ndarray) and cos_np.dtype == np.float32 and cos_np.shape == (1, S, 8)
  traced = jax.jit(lambda p: rope_angles(p, 8, theta=500.0, scaling=scaling))
  cos_jx, sin_jx = traced(jnp.broadcast_to(jnp.arange(S), (B, S)))
  assert_close(np.broadcast_to(cos_np, (B, S, 8)), cos_jx, rtol=1e-6, what="cos")
  assert_close(np.broadcast_to(sin_np, (B, S, 8)), sin_jx, rtol=1e-6, what="sin")
  x = np.random.default_rng(1).normal(size=(B, S, 3, 8))
  y = apply_rope(jnp.asarray(x, jnp.float32), cos_np, sin_np)
  expected = apply_rope(jnp.asarray(x, jnp.float32), cos_jx, sin_jx)
  assert_close(y, expected, rtol=1e-6, what="rope with [1, S, A] angles")
  if scaling is None:
    assert_close(y, rope_reference(x, np.broadcast_to(positions, (B, S)), 500.0), what="rope")


@pytest.mark.parametrize("interleave", [False, True], ids=["rotate_half", "interleaved"])
def test_rope_gradient_is_the_transposed_rotation(interleave):
  # apply_rope's written-out VJP against autodiff of the plain formula, for x and for cos, sin
  # (with a YaRN-style attention factor, so the rotation is not orthogonal).
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(B, S, 3, 8)), jnp.float32)
  cos, sin = rope_angles(jnp.asarray(rng.integers(0, 50, size=(B, S))), 8, theta=100.0)
  cos, sin = 1.3 * cos, 1.3 * sin
  cotangent = jnp.asarray(rng.normal(size=x.shape), jnp.float32)

  def plain(x, cos, sin):
    c, s = cos[:, :, None], sin[:, :, None]
    if interleave:
      x1, x2, c, s = x[..., 0::2], x[..., 1::2], c[..., :4], s[..., :4]
      return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)
    return x * c + jnp.concatenate([-x[..., 4:], x[..., :4]], axis=-1) * s

  rope = functools.partial(apply_rope, interleave=interleave)
  y, vjp = jax.vjp(rope, x, cos, sin)
  y_ref, vjp_ref = jax.vjp(plain, x, cos, sin)
  assert_close(y, y_ref, what="y")
  for name, got, want in zip(("x", "cos", "sin"), vjp(cotangent), vjp_ref(cotangent), strict=True):
    assert_close(got, want, what=f"d{name}")
  # bfloat16 activations: the gradient keeps x's dtype.
  dx = jax.grad(lambda x: jnp.sum(rope(x, cos, sin).astype(jnp.float32)))(x.astype(jnp.bfloat16))
  assert dx.dtype == jnp.bfloat16


def test_mask_and_bf16():
  mask = attention_mask(4, jnp.array([[0, 0, 1, 1]]))
  expected = np.array([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]], bool)
  np.testing.assert_array_equal(np.asarray(mask[0]), expected)
  attn = Attention(D, 4, 2, dtype=jnp.bfloat16, param_dtype=jnp.float32, rngs=rngs())
  y = apply(attn, jnp.ones((B, S, D)))
  assert y.dtype == jnp.bfloat16 and attn.q_proj.kernel[...].dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(y.astype(jnp.float32))))
  assert jax.tree.leaves(nnx.state(attn, nnx.Param))  # parameters exist


def test_logical_axes():
  attn = Attention(D, 4, 2, qkv_bias=True, rngs=rngs())
  assert attn.q_proj.kernel.get_metadata()["logical_axes"] == ("embed", "heads", "kv")
  assert attn.k_proj.bias.get_metadata()["logical_axes"] == ("heads", "kv")
  assert attn.o_proj.kernel.get_metadata()["logical_axes"] == ("heads", "kv", "embed")


def test_interleaved_rope_formula():
  # Pair (2j, 2j+1) turns by p * theta^(-2j/A); the result lists the pairs' first then second parts.
  rng = np.random.default_rng(0)
  x = rng.normal(size=(B, S, 3, 8))
  positions = rng.integers(0, 1000, size=(B, S))
  cos, sin = rope_angles(jnp.asarray(positions), 8, theta=10000.0)
  y = apply_rope(jnp.asarray(x, jnp.float32), cos, sin, interleave=True)
  expected = np.empty_like(x)
  for j in range(4):
    angle = positions[:, :, None] * 10000.0 ** (-2.0 * j / 8)
    x1, x2 = x[..., 2 * j], x[..., 2 * j + 1]
    expected[..., j] = x1 * np.cos(angle) - x2 * np.sin(angle)
    expected[..., j + 4] = x2 * np.cos(angle) + x1 * np.sin(angle)
  assert_close(y, expected, what="interleaved rope")


def test_qk_norm_parameters():
  attn = Attention(D, 4, 2, qk_norm="head", rngs=rngs())
  assert attn.q_norm.scale.shape == attn.k_norm.scale.shape == (8,)
  assert attn.q_norm.scale.get_metadata()["logical_axes"] == ("kv",)
  attn = Attention(D, 4, 2, qk_norm="proj", rngs=rngs())
  assert attn.q_norm.scale.shape == (4, 8) and attn.k_norm.scale.shape == (2, 8)
  assert attn.k_norm.scale.get_metadata()["logical_axes"] == ("heads", "kv")
  assert Attention(D, 4, 2, rngs=rngs()).q_norm is None
  with pytest.raises(ValueError, match="qk_norm"):
    Attention(D, 4, 2, qk_norm="layer", rngs=rngs())

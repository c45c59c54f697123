"""Causal self-attention with grouped-query heads and rotary position embeddings, and a KV cache.

    attn = Attention(d_model=512, num_heads=8, num_kv_heads=2, rngs=nnx.Rngs(0))
    y = attn(x)              # x, y [B, S, D]; causal, RoPE on positions 0..S-1

- Multi-head attention (Vaswani et al. 2017) computes softmax(q k^T / sqrt(head_dim)) v per head.
- Grouped-query attention (GQA; Ainslie et al. 2023) lets G = num_heads / num_kv_heads query heads
  share one key/value head: query head i reads kv head i // G, as `repeat_kv` does in Hugging Face's
  Llama/Mixtral. num_kv_heads == num_heads is MHA, num_kv_heads == 1 is multi-query attention.
- Rotary embeddings (RoPE; Su et al. 2021, eq. 34) rotate each query/key by an angle proportional to
  its position, so q . k depends only on the relative offset. The default is the "rotate-half"
  layout of GPT-NeoX / Llama / Mixtral in HF transformers: dimension j pairs with j + head_dim / 2
  (not with j + 1 as in the paper), with inverse frequencies theta^(-2j / head_dim), j < head_dim / 2.
  Checkpoint import needs no permutation of the q/k weights. `rope_interleave` pairs 2j with 2j + 1
  instead, and `rope_scaling` selects YaRN frequencies (see rope.py).
- QK normalisation: `qk_norm="head"` applies an RMSNorm over head_dim to every query and key head,
  one scale [A] shared by all heads (Qwen3 / Qwen3-MoE `q_norm`, `k_norm`); `qk_norm="proj"` one over
  each whole projection, scales [H, A] and [H_kv, A] (OLMoE / OLMo-2: HF normalises the flat [H*A]
  and [H_kv*A] vectors before splitting heads). Both come after the q/k biases and before RoPE.
- `clip_qkv=c` clamps q, k and v to [-c, c] after the QK norm and before RoPE (OLMoE, as HF does).

Scores, softmax and RoPE are computed in float32 whatever the activation dtype.

Parameters (names are a contract that checkpoints and tools rely on; A = head_dim):

    q_proj.kernel [D, H, A]      k_proj.kernel, v_proj.kernel [D, H_kv, A]     o_proj.kernel [H, A, D]
    q_proj.bias [H, A], k_proj.bias, v_proj.bias [H_kv, A]   (qkv_bias only; Qwen2 has them)
    q_norm.scale, k_norm.scale [A] (qk_norm="head") or [H, A], [H_kv, A] (qk_norm="proj")

A Hugging Face `q_proj.weight` [H*A, D] maps to `q_proj.kernel` as `weight.T.reshape(D, H, A)`,
`o_proj.weight` [D, H*A] as `weight.T.reshape(H, A, D)`, OLMoE's `q_norm.weight` [H*A] as
`weight.reshape(H, A)`.

KV cache (used by `Transformer` for decoding; `init_cache` makes an empty one). A call with
`cache={"k": [B, T, H_kv, A], "v": ...}` writes this call's keys (after RoPE) and values at slots
cache_index .. cache_index + S - 1 of the T = max_len slots and attends over all T slots under
`cache_mask` [B, S, T] (see `cache_attention_mask`); it returns (y, the updated cache). The slots
must fit: cache_index + S <= T (`jax.lax.dynamic_update_slice` would clamp, not fail, under jit).

Einsum letters: b batch, s query position, t key position, d model width, h heads (kv heads for k, v),
g query heads per kv head, a head_dim.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax.models.norm import RMSNorm
from moejax.models.rope import apply_rope, normalize_rope_scaling, rope_angles

__all__ = [
  "Attention",
  "Projection",
  "apply_rope",
  "attention_mask",
  "cache_attention_mask",
  "dot_product_attention",
  "rope_angles",
  "update_cache",
]

# Logical axes of q/k/v kernels; "kv" names the head_dim axis (sharding.py).
QKV_AXES = ("embed", "heads", "kv")


def attention_mask(seq_len: int, segment_ids: jax.Array | None = None) -> jax.Array:
  """Boolean mask [B or 1, S, T] (True = may attend): causal, and within one segment if given.

  `segment_ids` [B, S] marks packed sequences (tokens attend only to earlier tokens of the same
  segment); give padding its own id (e.g. 0) so no real token attends to it.
  """
  pos = jnp.arange(seq_len)
  mask = (pos[:, None] >= pos[None, :])[None]  # [1, S, T]
  if segment_ids is not None:
    mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])  # [B, S, T]
  return mask


def cache_attention_mask(valid: jax.Array, index: jax.Array, seq_len: int) -> jax.Array:
  """Mask [B, S, T] for S new tokens at cache slots index..index+S-1 attending over T slots.

  Query s sees slot t iff valid[b, t] (the slot holds a real token; `valid` [B, T] already includes
  this call's tokens) and t <= index + s (causal).
  """
  t = jnp.arange(valid.shape[1])
  causal = t[None, :] <= index + jnp.arange(seq_len)[:, None]  # [S, T]
  return valid[:, None, :] & causal[None]


def update_cache(buffer: jax.Array, new: jax.Array, index: jax.Array) -> jax.Array:
  """Write new [B, S, ...] into buffer [B, T, ...] at slots index..index+S-1 (in buffer's dtype)."""
  start = (0, index) + (0,) * (buffer.ndim - 2)
  return jax.lax.dynamic_update_slice(buffer, new.astype(buffer.dtype), start)


# Query rows per block when attention is causal (`dot_product_attention(..., causal=True)`).
CAUSAL_BLOCK = 128


def dot_product_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  mask: jax.Array | None = None,
  *,
  scale: float | None = None,
  causal: bool = False,
  block_size: int = CAUSAL_BLOCK,
) -> jax.Array:
  """Softmax attention with grouped kv heads: q [B, S, H, A], k [B, T, H_kv, A], v [B, T, H_kv, A_v]
  -> [B, S, H, A_v].

  `mask` [B or 1, S, T] (True = may attend). `scale` multiplies the scores (default A^-1/2). Scores
  and softmax are float32; a row with nothing to attend to gets uniform weights rather than NaN.

  `causal=True` lets query s see only keys t <= s (S == T), on top of `mask`: the queries run in
  blocks of `block_size` rows, each against only the keys up to its last row, which skips the upper
  triangle's work (62.5% of the full products at S = 4 blocks;
  forward+backward 163 -> 114 ms at B=8, S=512, H=8, H_kv=4, A=64 on 2 cores). The result is the
  full computation's.
  """
  b, s, h, a = q.shape
  t, h_kv, a_v = k.shape[1], k.shape[2], v.shape[-1]
  if causal and s != t:
    raise ValueError(f"causal attention needs as many queries as keys; got S={s}, T={t}")
  if block_size < 1:
    raise ValueError(f"block_size={block_size} must be positive")
  g = h // h_kv
  scale = a**-0.5 if scale is None else scale
  # Heads first, and query head i -> kv head i // G as rows (g, s) of one matrix per kv head: the
  # two products are then plain batched matmuls [B*H_kv] x [G*S, A] x [A, T], and XLA:CPU moves no
  # [S, T]-sized tensor between layouts (a 5-D "bshga,btha->bhgst" einsum measured 3x slower
  # forward+backward at B=8, S=512, H=8, H_kv=4, mostly transposing the scores).
  q = q.reshape(b, s, h_kv, g, a).transpose(0, 2, 3, 1, 4)  # [B, H_kv, G, S, A]
  k = k.transpose(0, 2, 1, 3)  # [B, H_kv, T, A]
  v = v.transpose(0, 2, 1, 3)  # [B, H_kv, T, A_v]
  blocks = [(lo, min(lo + block_size, s)) for lo in range(0, s, block_size)] if causal else []
  if len(blocks) < 2:
    blocks = [(0, s)]
  # Split, not sliced: the gradient of a split is one concatenation, of slices a sum of padded
  # copies (30-40 ms a layer at the small Mixtral config's [4096, 512] queries).
  q_blocks = jnp.split(q, [hi for _, hi in blocks[:-1]], axis=3)
  outs = []
  for (lo, hi), q_block in zip(blocks, q_blocks, strict=True):
    keys = hi if causal else t  # a causal block's queries see keys 0..hi-1 only
    block_mask = None if mask is None else mask[:, lo:hi, :keys]
    if causal:  # a constant XLA folds into the scores' bias
      tri = (jnp.arange(lo, hi)[:, None] >= jnp.arange(keys)[None, :])[None]  # [1, S_block, T]
      block_mask = tri if block_mask is None else block_mask & tri
    outs.append(_attend(q_block, k[:, :, :keys], v[:, :, :keys], block_mask, scale))
  out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=3)  # [B, H_kv, G, S, A_v]
  return out.transpose(0, 3, 1, 2, 4).reshape(b, s, h, a_v)


def _attend(q, k, v, mask, scale):
  """q [B, H_kv, G, S, A], k [B, H_kv, T, A], v [B, H_kv, T, A_v], mask [B or 1, S, T] or None
  -> [B, H_kv, G, S, A_v]."""
  # An additive bias (0 or the most negative float) rather than a select. A fully masked row stays
  # uniform: every entry is the same most negative float.
  bias = None
  if mask is not None:
    bias = jnp.where(mask, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)  # [B or 1, S, T]
  return _softmax_attend(q, k, v, bias, scale)


def _bkmt(x):
  """[B, H_kv, G, S, X] -> [B, H_kv, G*S, X]: query heads of one kv head as rows of one matrix."""
  b, h_kv, g, s, n = x.shape
  return x.reshape(b, h_kv, g * s, n)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _softmax_attend(q, k, v, bias, scale):
  return _softmax_attend_fwd(q, k, v, bias, scale)[0]


def _softmax_attend_fwd(q, k, v, bias, scale):
  """softmax(q k^T scale + bias) v, normalised after the product: out = (e v) / l with
  e = exp(scores - max) and l = sum(e), so no pass over the [.., S, T] probabilities divides.

  With the backward below, forward+backward of the small Mixtral config's attention (B=8, S=512,
  H=8, H_kv=4, A=64, causal blocks of 128) went from 221 to 194 ms (median, 2 cores) against
  autodiff of softmax(scores) v.
  """
  b, h_kv, g, s, _ = q.shape
  t = k.shape[2]
  # The scale goes on q [.., S, A], not on the [.., S, T] scores: XLA:CPU materialises a scalar
  # broadcast at the scores' size for its fused dot (small config, forward+backward per layer:
  # 187 -> 178 ms median).
  q = q * jnp.asarray(scale, q.dtype)
  scores = jnp.einsum("bkma,bkta->bkmt", _bkmt(q), k, preferred_element_type=jnp.float32)
  scores = scores.reshape(b, h_kv, g, s, t)  # float32
  if bias is not None:
    scores = scores + bias[:, None, None]
  e = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))  # [B, H_kv, G, S, T] float32
  inv_l = 1.0 / jnp.sum(e, axis=-1, keepdims=True)  # [B, H_kv, G, S, 1]
  pv = jnp.einsum(
    "bkmt,bkta->bkma", _bkmt(e).astype(v.dtype), v, preferred_element_type=jnp.float32
  )
  out = pv.reshape(b, h_kv, g, s, -1) * inv_l  # [B, H_kv, G, S, A_v] float32
  return out.astype(v.dtype), (q, k, v, bias, e, inv_l, out)  # q scaled


def _softmax_attend_bwd(scale, residuals, d_out):
  """The softmax VJP with p = e / l never formed: ds = p (dp - D) with D = rowsum(dp * p), and
  rowsum(dp * p) = rowsum((d_out v^T) * p) = d_out . out, a sum over A_v instead of over T
  (FlashAttention-2's D_i, Dao 2023); dv = p^T d_out = e^T (d_out / l)."""
  q, k, v, bias, e, inv_l, out = residuals
  b, h_kv, g, s, _ = q.shape
  t = k.shape[2]
  d_out = d_out.astype(jnp.float32)
  big_d = jnp.sum(d_out * out, axis=-1, keepdims=True)  # [B, H_kv, G, S, 1]
  dp = jnp.einsum(
    "bkma,bkta->bkmt", _bkmt(d_out).astype(v.dtype), v, preferred_element_type=jnp.float32
  )
  ds = e * inv_l * (dp.reshape(b, h_kv, g, s, t) - big_d)  # d scores
  dv = jnp.einsum(
    "bkma,bkmt->bkat",
    _bkmt(d_out * inv_l).astype(v.dtype),
    _bkmt(e).astype(v.dtype),
    preferred_element_type=jnp.float32,
  ).swapaxes(-1, -2)
  ds = _bkmt(ds).astype(q.dtype)
  dq = jnp.einsum("bkmt,bkta->bkma", ds, k, preferred_element_type=jnp.float32) * scale
  dk = jnp.einsum("bkma,bkmt->bkat", _bkmt(q), ds, preferred_element_type=jnp.float32)
  dk = dk.swapaxes(-1, -2)
  d_bias = None if bias is None else jnp.zeros_like(bias)  # the mask is not differentiable
  return (
    dq.reshape(q.shape).astype(q.dtype),
    dk.astype(k.dtype),
    dv.astype(v.dtype),
    d_bias,
  )


_softmax_attend.defvjp(_softmax_attend_fwd, _softmax_attend_bwd)


class Projection(nnx.Module):
  """A linear map contracting the leading `num_in` kernel axes: `kernel` [*in, *out], `bias` [*out].

  x [..., *in] -> [..., *out]. It runs as one 2-D matmul [N, prod(in)] x [prod(in), prod(out)] over
  the flattened leading axes: on XLA:CPU the gradient of a 3-D einsum such as "bsd,df->bsf" measured
  1.7x slower than the same matmul on [B*S, D] (40 vs 23 ms at B=16, S=128, D=128, F=512).
  Initialised fan-in over the contracted axes (variance 1 / prod(in)), like the MoE layer's weights.
  """

  def __init__(
    self,
    shape: Sequence[int],
    logical_axes: Sequence[str | None],
    *,
    num_in: int,
    use_bias: bool = False,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    in_axes = tuple(range(num_in))
    out_axes = tuple(range(num_in, len(shape)))
    init = nnx.initializers.variance_scaling(
      1.0, "fan_in", "truncated_normal", in_axis=in_axes, out_axis=out_axes
    )
    # `logical_axes` names each dimension with DESIGN.md's logical axes; sharding.py maps them to
    # mesh axes (flax's `out_sharding` metadata would shard eagerly and needs a mesh).
    self.kernel = nnx.Param(
      init(rngs.params(), tuple(shape), param_dtype), logical_axes=tuple(logical_axes)
    )
    self.bias = (
      nnx.Param(jnp.zeros(shape[num_in:], param_dtype), logical_axes=tuple(logical_axes[num_in:]))
      if use_bias
      else None
    )
    self.num_in = num_in
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.kernel[...].astype(self.dtype)
    in_shape, out_shape = kernel.shape[: self.num_in], kernel.shape[self.num_in :]
    lead = x.shape[: x.ndim - self.num_in]
    fan_in, fan_out = math.prod(in_shape), math.prod(out_shape)
    y = x.astype(self.dtype).reshape(-1, fan_in) @ kernel.reshape(fan_in, fan_out)
    y = y.reshape(*lead, *out_shape)
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


class Attention(nnx.Module):
  """Causal multi-head / grouped-query self-attention with RoPE. See the module docstring."""

  def __init__(
    self,
    d_model: int,
    num_heads: int,
    num_kv_heads: int | None = None,
    head_dim: int | None = None,
    *,
    rope_theta: float = 10000.0,
    rope_scaling: Mapping | tuple | None = None,
    rope_interleave: bool = False,
    qkv_bias: bool = False,
    qk_norm: str | None = None,
    clip_qkv: float | None = None,
    norm_eps: float = 1e-6,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    num_kv_heads = num_kv_heads or num_heads
    head_dim = head_dim or d_model // num_heads
    if num_heads % num_kv_heads:
      raise ValueError(f"num_kv_heads={num_kv_heads} must divide num_heads={num_heads}")
    if head_dim % 2:
      raise ValueError(f"head_dim={head_dim} must be even for rotary embeddings")
    if qk_norm not in (None, "head", "proj"):
      raise ValueError(f"qk_norm={qk_norm!r} must be None, 'head' or 'proj'")
    d, h, h_kv, a = d_model, num_heads, num_kv_heads, head_dim
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    proj = lambda heads: Projection((d, heads, a), QKV_AXES, num_in=1, use_bias=qkv_bias, **kw)
    self.q_proj, self.k_proj, self.v_proj = proj(h), proj(h_kv), proj(h_kv)
    self.o_proj = Projection((h, a, d), ("heads", "kv", "embed"), num_in=2, **kw)
    norm_kw = dict(eps=norm_eps, dtype=dtype, param_dtype=param_dtype)
    if qk_norm == "head":
      self.q_norm = RMSNorm(a, logical_axes=("kv",), **norm_kw)
      self.k_norm = RMSNorm(a, logical_axes=("kv",), **norm_kw)
    elif qk_norm == "proj":
      self.q_norm = RMSNorm((h, a), logical_axes=("heads", "kv"), **norm_kw)
      self.k_norm = RMSNorm((h_kv, a), logical_axes=("heads", "kv"), **norm_kw)
    else:
      self.q_norm = self.k_norm = None
    self.num_kv_heads = h_kv
    self.head_dim = head_dim
    self.rope_theta = rope_theta
    self.rope_scaling = normalize_rope_scaling(rope_scaling)  # hashable: a static attribute
    self.rope_interleave = rope_interleave
    self.clip_qkv = clip_qkv
    self.dtype = dtype

  def init_cache(self, batch_size: int, max_len: int, dtype=None) -> dict[str, jax.Array]:
    """An empty cache entry {"k", "v": [B, T, H_kv, A]} (dtype: the activation dtype)."""
    shape = (batch_size, max_len, self.num_kv_heads, self.head_dim)
    dtype = self.dtype if dtype is None else dtype
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}

  def __call__(
    self,
    x: jax.Array,
    *,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    cache: dict[str, jax.Array] | None = None,
    cache_index: jax.Array | None = None,
    cache_mask: jax.Array | None = None,
  ) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
    """x [B, S, D] -> [B, S, D], or (y, updated cache) when `cache` is given.

    `positions` [B, S] (default 0..S-1) are the RoPE positions; `segment_ids` [B, S] (optional)
    restricts attention to tokens of the same packed sequence (see `attention_mask`). With `cache`,
    `cache_index` (int32 scalar: the first slot this call writes) and `cache_mask` [B, S, T] are
    required and `segment_ids` is ignored; see the module docstring.
    """
    b, s, _ = x.shape
    if positions is None:  # numpy: the rotary angles become constants (see rope_angles)
      positions = np.arange(s)[None]  # [1, S]
    with jax.named_scope("qkv"):
      q = self.q_proj(x)  # [B, S, H, A]
      k = self.k_proj(x)  # [B, S, H_kv, A]
      v = self.v_proj(x)  # [B, S, H_kv, A]
      if self.q_norm is not None:
        q, k = self.q_norm(q), self.k_norm(k)
      if self.clip_qkv is not None:
        c = self.clip_qkv
        q, k, v = jnp.clip(q, -c, c), jnp.clip(k, -c, c), jnp.clip(v, -c, c)
    with jax.named_scope("rope"):
      cos, sin = rope_angles(
        positions, self.head_dim, self.rope_theta, scaling=self.rope_scaling
      )  # [B or 1, S, A]
      q = apply_rope(q, cos, sin, interleave=self.rope_interleave)
      k = apply_rope(k, cos, sin, interleave=self.rope_interleave)
    if cache is None:
      with jax.named_scope("attend"):
        out = dot_product_attention(q, k, v, attention_mask(s, segment_ids), causal=True)
      return self.o_proj(out)  # [B, S, D]
    with jax.named_scope("cache"):
      cache = {
        "k": update_cache(cache["k"], k, cache_index),  # [B, T, H_kv, A]
        "v": update_cache(cache["v"], v, cache_index),
      }
    with jax.named_scope("attend"):
      out = dot_product_attention(
        q, cache["k"].astype(q.dtype), cache["v"].astype(v.dtype), cache_mask
      )
    return self.o_proj(out), cache

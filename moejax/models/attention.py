"""Causal self-attention with grouped-query heads and rotary position embeddings.

    attn = Attention(d_model=512, num_heads=8, num_kv_heads=2, rngs=nnx.Rngs(0))
    y = attn(x)              # x, y [B, S, D]; causal, RoPE on positions 0..S-1

- Multi-head attention (Vaswani et al. 2017) computes softmax(q k^T / sqrt(head_dim)) v per head.
- Grouped-query attention (GQA; Ainslie et al. 2023) lets G = num_heads / num_kv_heads query heads
  share one key/value head: query head i reads kv head i // G, as `repeat_kv` does in Hugging Face's
  Llama/Mixtral. num_kv_heads == num_heads is MHA, num_kv_heads == 1 is multi-query attention.
- Rotary embeddings (RoPE; Su et al. 2021, eq. 34) rotate each query/key by an angle proportional to
  its position, so q . k depends only on the relative offset. We use the "rotate-half" layout of
  GPT-NeoX / Llama / Mixtral in HF transformers: dimension j pairs with j + head_dim / 2 (not with
  j + 1 as in the paper), with inverse frequencies theta^(-2j / head_dim), j < head_dim / 2. Checkpoint
  import needs no permutation of the q/k weights.

Scores, softmax and RoPE are computed in float32 whatever the activation dtype.

Parameters (names are a contract that checkpoints and tools rely on; A = head_dim):

    q_proj.kernel [D, H, A]      k_proj.kernel, v_proj.kernel [D, H_kv, A]     o_proj.kernel [H, A, D]
    q_proj.bias [H, A], k_proj.bias, v_proj.bias [H_kv, A]   (qkv_bias only; Qwen2 has them)

A Hugging Face `q_proj.weight` [H*A, D] maps to `q_proj.kernel` as `weight.T.reshape(D, H, A)`, and
`o_proj.weight` [D, H*A] as `weight.T.reshape(H, A, D)`.

Einsum letters: b batch, s query position, t key position, d model width, h heads (kv heads for k, v),
g query heads per kv head, a head_dim.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx


def rope_angles(
  positions: jax.Array, head_dim: int, theta: float = 10000.0
) -> tuple[jax.Array, jax.Array]:
  """cos, sin [..., head_dim] (float32) of the rotary angles for integer `positions` [...].

  Angle of dimension j (and of its partner j + head_dim / 2) at position p: p * theta^(-2j / head_dim).
  """
  half = head_dim // 2
  inv_freq = 1.0 / (theta ** (jnp.arange(half, dtype=jnp.float32) * 2.0 / head_dim))  # [A/2]
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [..., A/2]
  angles = jnp.concatenate([angles, angles], axis=-1)  # [..., A]
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotate x [B, S, H, A] by the angles cos, sin [B, S, A] (rotate-half layout); keeps x's dtype.

  x * cos + rotate_half(x) * sin,   rotate_half([x1, x2]) = [-x2, x1]
  """
  xf = x.astype(jnp.float32)
  x1, x2 = jnp.split(xf, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)  # [B, S, H, A]
  out = xf * cos[:, :, None, :] + rotated * sin[:, :, None, :]
  return out.astype(x.dtype)


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


def dot_product_attention(
  q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None
) -> jax.Array:
  """Softmax attention with grouped kv heads: q [B, S, H, A], k, v [B, T, H_kv, A] -> [B, S, H, A].

  `mask` [B or 1, S, T] (True = may attend). Scores and softmax are float32; a row with nothing to
  attend to gets uniform weights rather than NaN.
  """
  b, s, h, a = q.shape
  h_kv = k.shape[2]
  q = q.reshape(b, s, h_kv, h // h_kv, a)  # [B, S, H_kv, G, A]: query head i -> kv head i // G
  scores = jnp.einsum("bshga,btha->bhgst", q, k, preferred_element_type=jnp.float32)
  scores = scores * (a**-0.5)  # [B, H_kv, G, S, T]
  if mask is not None:
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1)  # [B, H_kv, G, S, T] float32
  out = jnp.einsum("bhgst,btha->bshga", probs.astype(v.dtype), v)  # [B, S, H_kv, G, A]
  return out.reshape(b, s, h, a)


class Projection(nnx.Module):
  """A linear map contracting the leading `num_in` kernel axes: `kernel` [*in, *out], `bias` [*out].

  Initialised fan-in over the contracted axes (variance 1 / prod(in)), like the MoE layer's weights.
  """

  def __init__(
    self,
    shape: Sequence[int],
    logical_axes: Sequence[str | None],
    *,
    num_in: int,
    einsum: str,
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
    self.einsum = einsum
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    y = jnp.einsum(self.einsum, x.astype(self.dtype), self.kernel[...].astype(self.dtype))
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
    qkv_bias: bool = False,
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
    d, h, h_kv, a = d_model, num_heads, num_kv_heads, head_dim
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    qkv_axes = ("embed", "heads", "kv")  # "kv": the head_dim axis (sharding.py)
    self.q_proj = Projection(
      (d, h, a), qkv_axes, num_in=1, einsum="bsd,dha->bsha", use_bias=qkv_bias, **kw
    )
    self.k_proj = Projection(
      (d, h_kv, a), qkv_axes, num_in=1, einsum="bsd,dha->bsha", use_bias=qkv_bias, **kw
    )
    self.v_proj = Projection(
      (d, h_kv, a), qkv_axes, num_in=1, einsum="bsd,dha->bsha", use_bias=qkv_bias, **kw
    )
    self.o_proj = Projection(
      (h, a, d), ("heads", "kv", "embed"), num_in=2, einsum="bsha,had->bsd", **kw
    )
    self.head_dim = head_dim
    self.rope_theta = rope_theta

  def __call__(
    self,
    x: jax.Array,
    *,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
  ) -> jax.Array:
    """x [B, S, D] -> [B, S, D].

    `positions` [B, S] (default 0..S-1) are the RoPE positions; `segment_ids` [B, S] (optional)
    restricts attention to tokens of the same packed sequence (see `attention_mask`).
    """
    b, s, _ = x.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(s), (b, s))
    with jax.named_scope("qkv"):
      q = self.q_proj(x)  # [B, S, H, A]
      k = self.k_proj(x)  # [B, S, H_kv, A]
      v = self.v_proj(x)  # [B, S, H_kv, A]
    with jax.named_scope("rope"):
      cos, sin = rope_angles(positions, self.head_dim, self.rope_theta)  # [B, S, A]
      q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    with jax.named_scope("attend"):
      out = dot_product_attention(q, k, v, attention_mask(s, segment_ids))  # [B, S, H, A]
    return self.o_proj(out)  # [B, S, D]

"""Multi-head latent attention (MLA; DeepSeek-AI 2024, "DeepSeek-V2", §2.1, eqs. 9-19).

    attn = MLA(config, rngs=nnx.Rngs(0))      # config.attention == "mla"
    y = attn(x)                               # x, y [B, S, D]; causal

Keys and values come from one low-rank latent per token, so a KV cache stores R_kv + A_rope numbers
per token and layer instead of 2 * H * A:

    c_q   = RMSNorm(x W_DQ)                    [B, S, R_q]     (q_lora_rank; None: q = x W_Q)
    q     = c_q W_UQ                           [B, S, H, A_nope + A_rope], split into q_nope, q_pe
    c_kv, k_pe = split(x W_DKV)                [B, S, R_kv], [B, S, A_rope]   (HF kv_a_proj_with_mqa)
    c_kv  = RMSNorm(c_kv)                                                     (HF kv_a_layernorm)
    k_nope, v = split(c_kv W_UKV)              [B, S, H, A_nope], [B, S, H, A_v]   (HF kv_b_proj)
    q_pe, k_pe = RoPE(q_pe), RoPE(k_pe)        k_pe is one head shared by all H query heads
    o     = softmax([q_nope, q_pe] . [k_nope, k_pe] * scale) v,    y = o W_O

RoPE covers only the A_rope = `qk_rope_head_dim` part (eq. 14-16). `rope_interleave` picks the
interleaved pairs of the released checkpoints: HF DeepSeek-V2 always rotates interleaved pairs
(complex multiply), HF DeepSeek-V3 iff its config's `rope_interleave` (True for the released models);
set ModelConfig.rope_interleave accordingly. scale = (A_nope + A_rope)^-1/2, times mscale(factor,
mscale_all_dim)^2 under YaRN rope scaling (rope.yarn_softmax_scale; cos and sin carry YaRN's own
attention factor). The q_a and kv_a RMSNorms use eps 1e-6 whatever the model's norm_eps: HF builds
them with the default eps (and so does DeepSeek's reference inference code).

Parameters (names are a contract; HF Linear weights [out, in] map as `weight.T.reshape(...)`):

    q_proj.kernel [D, H, A_qk]                          (q_lora_rank None; A_qk = A_nope + A_rope)
    q_a_proj.kernel [D, R_q]  q_a_norm.scale [R_q]  q_b_proj.kernel [R_q, H, A_qk]
    kv_a_proj.kernel [D, R_kv + A_rope]                 (first R_kv: c_kv, last A_rope: k_pe)
    kv_a_norm.scale [R_kv]
    kv_b_proj.kernel [R_kv, H, A_nope + A_v]            (per head: k_nope, then v)
    o_proj.kernel [H, A_v, D]

KV cache: {"c_kv": [B, T, R_kv] (after kv_a_norm), "k_pe": [B, T, A_rope] (after RoPE)}; see
attention.py for the slot and mask conventions. Attending over the cache either re-expands keys and
values for all T slots with kv_b_proj (as HF does), or absorbs W_UK into the query and W_UV into the
output (§2.1.3: scores = (q_nope W_UK^T) . c_kv + q_pe . k_pe, o = (p c_kv) W_UV), which costs
O(T (R_kv + A_rope)) per query and head instead of expanding T latents; `absorb=None` picks the one
with fewer FLOPs for the call's S and T (decoding, S = 1: absorbed).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax.models.attention import (
  QKV_AXES,
  Projection,
  attention_mask,
  dot_product_attention,
  update_cache,
)
from moejax.models.config import ModelConfig
from moejax.models.norm import RMSNorm
from moejax.models.rope import apply_rope, rope_angles, yarn_softmax_scale

# HF's DeepseekV2/V3 q_a_layernorm and kv_a_layernorm keep RMSNorm's default eps.
MLA_NORM_EPS = 1e-6


class MLA(nnx.Module):
  """Multi-head latent attention, built from a ModelConfig with attention="mla". See the module doc."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    c = config
    if c.attention != "mla":
      raise ValueError(f"MLA needs ModelConfig.attention='mla', got {c.attention!r}")
    d, h = c.d_model, c.num_heads
    self.nope_dim, self.rope_dim, self.v_dim = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
    self.kv_rank = c.kv_lora_rank
    a_qk = self.nope_dim + self.rope_dim
    kw = dict(dtype=c.dtype, param_dtype=c.param_dtype, rngs=rngs)
    norm = lambda dim: RMSNorm(
      dim, eps=MLA_NORM_EPS, dtype=c.dtype, param_dtype=c.param_dtype, logical_axes=(None,)
    )
    if c.q_lora_rank is None:
      self.q_proj = Projection((d, h, a_qk), QKV_AXES, num_in=1, **kw)
      self.q_a_proj = self.q_a_norm = self.q_b_proj = None
    else:
      r_q = c.q_lora_rank
      self.q_proj = None
      self.q_a_proj = Projection((d, r_q), ("embed", None), num_in=1, **kw)
      self.q_a_norm = norm(r_q)
      self.q_b_proj = Projection((r_q, h, a_qk), (None, "heads", "kv"), num_in=1, **kw)
    self.kv_a_proj = Projection((d, self.kv_rank + self.rope_dim), ("embed", None), num_in=1, **kw)
    self.kv_a_norm = norm(self.kv_rank)
    self.kv_b_proj = Projection(
      (self.kv_rank, h, self.nope_dim + self.v_dim),
      (None, "heads", "kv"),
      num_in=1,
      **kw,
    )
    self.o_proj = Projection((h, self.v_dim, d), ("heads", "kv", "embed"), num_in=2, **kw)
    self.num_heads = h
    self.scale = a_qk**-0.5 * yarn_softmax_scale(c.rope_scaling)
    self.rope_theta = c.rope_theta
    self.rope_scaling = c.rope_scaling
    self.rope_interleave = c.rope_interleave
    self.dtype = c.dtype

  def init_cache(self, batch_size: int, max_len: int, dtype=None) -> dict[str, jax.Array]:
    """An empty cache entry {"c_kv": [B, T, R_kv], "k_pe": [B, T, A_rope]}."""
    dtype = self.dtype if dtype is None else dtype
    return {
      "c_kv": jnp.zeros((batch_size, max_len, self.kv_rank), dtype),
      "k_pe": jnp.zeros((batch_size, max_len, self.rope_dim), dtype),
    }

  def __call__(
    self,
    x: jax.Array,
    *,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    cache: dict[str, jax.Array] | None = None,
    cache_index: jax.Array | None = None,
    cache_mask: jax.Array | None = None,
    absorb: bool | None = None,
  ) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
    """x [B, S, D] -> [B, S, D], or (y, updated cache) with `cache`; arguments as `Attention`'s.

    `absorb` (cache calls only): attend through the absorbed projections (True), by re-expanding
    keys and values (False), or whichever costs fewer FLOPs (None).
    """
    b, s, _ = x.shape
    if positions is None:  # numpy: the rotary angles become constants (see rope_angles)
      positions = np.arange(s)[None]  # [1, S]
    with jax.named_scope("q"):
      if self.q_proj is not None:
        q = self.q_proj(x)  # [B, S, H, A_qk]
      else:
        q = self.q_b_proj(self.q_a_norm(self.q_a_proj(x)))  # [B, S, H, A_qk]
      q_nope, q_pe = q[..., : self.nope_dim], q[..., self.nope_dim :]
    with jax.named_scope("kv_latent"):
      kv = self.kv_a_proj(x)  # [B, S, R_kv + A_rope]
      c_kv = self.kv_a_norm(kv[..., : self.kv_rank])  # [B, S, R_kv]
      k_pe = kv[..., self.kv_rank :]  # [B, S, A_rope]
    with jax.named_scope("rope"):
      cos, sin = rope_angles(positions, self.rope_dim, self.rope_theta, scaling=self.rope_scaling)
      q_pe = apply_rope(q_pe, cos, sin, interleave=self.rope_interleave)  # [B, S, H, A_rope]
      k_pe = apply_rope(k_pe[:, :, None], cos, sin, interleave=self.rope_interleave)[:, :, 0]
    if cache is None:
      with jax.named_scope("attend"):
        mask = attention_mask(s, segment_ids)
        out = self._attend_expanded(q_nope, q_pe, c_kv, k_pe, mask, causal=True)
      return self.o_proj(out)  # [B, S, D]
    with jax.named_scope("cache"):
      cache = {
        "c_kv": update_cache(cache["c_kv"], c_kv, cache_index),  # [B, T, R_kv]
        "k_pe": update_cache(cache["k_pe"], k_pe, cache_index),  # [B, T, A_rope]
      }
    c_kv, k_pe = cache["c_kv"].astype(c_kv.dtype), cache["k_pe"].astype(k_pe.dtype)
    if absorb is None:
      absorb = self._absorbed_flops(s, c_kv.shape[1]) < self._expanded_flops(s, c_kv.shape[1])
    with jax.named_scope("attend"):
      attend = self._attend_absorbed if absorb else self._attend_expanded
      out = attend(q_nope, q_pe, c_kv, k_pe, cache_mask)  # [B, S, H, A_v]
    return self.o_proj(out), cache

  def _attend_expanded(self, q_nope, q_pe, c_kv, k_pe, mask, causal=False):
    """Re-expand keys and values of every slot: c_kv [B, T, R_kv], k_pe [B, T, A_rope]; `causal`
    as in `dot_product_attention`."""
    b, t, _ = c_kv.shape
    kv = self.kv_b_proj(c_kv)  # [B, T, H, A_nope + A_v]
    k_nope, v = kv[..., : self.nope_dim], kv[..., self.nope_dim :]
    k_pe = jnp.broadcast_to(k_pe[:, :, None], (b, t, self.num_heads, self.rope_dim))
    q = jnp.concatenate([q_nope, q_pe.astype(q_nope.dtype)], axis=-1)  # [B, S, H, A_qk]
    k = jnp.concatenate([k_nope, k_pe.astype(k_nope.dtype)], axis=-1)  # [B, T, H, A_qk]
    return dot_product_attention(q, k, v, mask, scale=self.scale, causal=causal)  # [B, S, H, A_v]

  def _attend_absorbed(self, q_nope, q_pe, c_kv, k_pe, mask):
    """Attend in the latent space: W_UK folds into the query, W_UV into the output."""
    w = self.kv_b_proj.kernel[...].astype(self.dtype)  # [R_kv, H, A_nope + A_v]
    w_uk, w_uv = w[..., : self.nope_dim], w[..., self.nope_dim :]
    q_latent = jnp.einsum("bshn,rhn->bshr", q_nope, w_uk)  # [B, S, H, R_kv]
    scores = jnp.einsum("bshr,btr->bhst", q_latent, c_kv, preferred_element_type=jnp.float32)
    scores += jnp.einsum("bshp,btp->bhst", q_pe, k_pe, preferred_element_type=jnp.float32)
    scores = scores * self.scale  # [B, H, S, T]
    scores = jnp.where(mask[:, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)  # [B, H, S, T] float32
    out_latent = jnp.einsum("bhst,btr->bshr", probs.astype(c_kv.dtype), c_kv)  # [B, S, H, R_kv]
    return jnp.einsum("bshr,rhv->bshv", out_latent, w_uv)  # [B, S, H, A_v]

  def _expanded_flops(self, s: int, t: int) -> int:
    h, r = self.num_heads, self.kv_rank
    return t * r * h * (self.nope_dim + self.v_dim) + s * t * h * (
      self.nope_dim + self.rope_dim + self.v_dim
    )

  def _absorbed_flops(self, s: int, t: int) -> int:
    h, r = self.num_heads, self.kv_rank
    return s * h * r * (self.nope_dim + self.v_dim) + s * t * h * (2 * r + self.rope_dim)

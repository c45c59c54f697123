"""Rotary position embeddings (RoPE; Su et al. 2021, eq. 34), with YaRN context extension.

    cos, sin = rope_angles(positions, head_dim, theta, scaling=config.rope_scaling)   # [B, S, A]
    q = apply_rope(q, cos, sin, interleave=config.rope_interleave)                      # [B, S, H, A]

Frequencies. Dimension pair j < A/2 turns by p * inv_freq[j] at position p, inv_freq[j] =
theta^(-2j / A). `scaling` is Hugging Face's `rope_parameters` (`rope_scaling`) minus `rope_theta`,
as a mapping or a tuple of (key, value) pairs; its `rope_type` (alias `type`) is

- "default" (or no scaling): the plain frequencies above.
- "yarn" (Peng et al. 2023, "YaRN", eqs. 16-20; HF `_compute_yarn_parameters`): with s = `factor`
  and L = `original_max_position_embeddings`, pairs that turn fewer than `beta_slow` (default 1)
  times over L are interpolated (inv_freq / s), pairs that turn more than `beta_fast` (default 32)
  times keep their frequency, and a linear ramp over the pair index blends the two in between (the
  ramp's ends floored/ceiled unless `truncate` is False). cos and sin are multiplied by the
  `attention_factor` (default mscale(s, mscale) / mscale(s, mscale_all_dim) when both `mscale` and
  `mscale_all_dim` are set, else mscale(s)), mscale(s, m) = 0.1 m ln(s) + 1 for s > 1, else 1; q . k
  thus grows by attention_factor^2.
  DeepSeek-V2/V3 also multiply the softmax scale by mscale(s, mscale_all_dim)^2 (`yarn_apply_mscale`
  in their HF modeling files): `yarn_softmax_scale`, applied by multi-head latent attention only, as
  in HF (the GQA families use YaRN's cos/sin factor alone).

Layouts. "Rotate-half" (GPT-NeoX / Llama / Mixtral / Qwen / OLMoE in HF): dimension j pairs with
j + A/2. "Interleaved" (`interleave=True`; DeepSeek-V2's complex multiply, DeepSeek-V3 with
`rope_interleave`): dimension 2j pairs with 2j + 1. The interleaved rotation returns its pairs in the
rotate-half layout (real parts first), as HF DeepSeek-V3's `apply_rotary_pos_emb_interleave` does;
DeepSeek-V2's complex multiply returns them interleaved. q and k are permuted alike, so q . k and
attention outputs are the same either way.

Frequencies are computed in float32 (numpy, at trace time), angles, cos, sin and the rotation in float32.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Supported `rope_type`s, and the keys each one accepts besides rope_type / type.
ROPE_KEYS = {
  "default": frozenset(),
  "yarn": frozenset(
    {
      "factor",
      "original_max_position_embeddings",
      "attention_factor",
      "beta_fast",
      "beta_slow",
      "mscale",
      "mscale_all_dim",
      "truncate",
    }
  ),
}
_REQUIRED = {"default": (), "yarn": ("factor", "original_max_position_embeddings")}


def rope_type(scaling: Mapping | tuple | None) -> str:
  """The `rope_type` of a scaling mapping or items tuple ("default" when None or unset)."""
  scaling = dict(scaling or ())
  return scaling.get("rope_type", scaling.get("type", "default"))


def normalize_rope_scaling(scaling: Any) -> tuple[tuple[str, Any], ...] | None:
  """A mapping or (key, value) pairs -> a sorted tuple of items (hashable), or None.

  Raises ValueError (message without the field name) for an unsupported rope_type, unknown or
  missing keys, or invalid values.
  """
  if scaling is None:
    return None
  try:
    items = dict(scaling.items() if isinstance(scaling, Mapping) else scaling)
  except (TypeError, ValueError):
    raise ValueError("must be a mapping (HF rope_parameters minus rope_theta) or None") from None
  items.pop(
    "rope_theta", None
  )  # HF v5 keeps theta in rope_parameters; ours is ModelConfig.rope_theta
  kind = items.get("rope_type", items.get("type", "default"))
  if kind not in ROPE_KEYS:
    raise ValueError(f"rope_type {kind!r} is not supported; supported are {', '.join(ROPE_KEYS)}")
  unknown = sorted(set(items) - ROPE_KEYS[kind] - {"rope_type", "type"})
  if unknown:
    raise ValueError(
      f"keys {unknown} are not understood for rope_type {kind!r}; known: {sorted(ROPE_KEYS[kind])}"
    )
  missing = [k for k in _REQUIRED[kind] if items.get(k) is None]
  if missing:
    raise ValueError(f"rope_type {kind!r} needs {missing}")
  for k, v in items.items():
    if k in ("rope_type", "type", "truncate"):
      continue
    if v is not None and (
      isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0
    ):
      raise ValueError(f"{k}={v!r} must be a finite number >= 0 or None")
  if kind == "yarn" and (items["factor"] <= 0 or items["original_max_position_embeddings"] <= 0):
    raise ValueError("factor and original_max_position_embeddings must be > 0")
  return tuple(sorted(items.items()))


def _mscale(scale: float, mscale: float = 1.0) -> float:
  """YaRN's attention temperature (HF `get_mscale`, DeepSeek `yarn_get_mscale`)."""
  return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_frequencies(
  head_dim: int, theta: float = 10000.0, scaling: Mapping | tuple | None = None
) -> tuple[np.ndarray, float]:
  """(inv_freq [head_dim / 2] float32, attention_factor): see the module docstring.

  Mirrors HF's float32 arithmetic (`compute_default_rope_parameters`, `_compute_yarn_parameters`).
  """
  s = dict(scaling or ())
  dim = head_dim
  pos_freqs = np.float32(theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
  inv_freq = (np.float32(1.0) / pos_freqs).astype(np.float32)  # [A/2]
  kind = rope_type(s)
  if kind == "default":
    return inv_freq, 1.0
  if kind != "yarn":
    raise ValueError(f"rope_type {kind!r} is not supported; supported are {', '.join(ROPE_KEYS)}")
  factor = float(s["factor"])
  original_len = s["original_max_position_embeddings"]
  attention_factor = s.get("attention_factor")
  mscale, mscale_all_dim = s.get("mscale"), s.get("mscale_all_dim")
  if attention_factor is None:
    if mscale and mscale_all_dim:
      attention_factor = _mscale(factor, mscale) / _mscale(factor, mscale_all_dim)
    else:
      attention_factor = _mscale(factor)
  beta_fast = s.get("beta_fast") or 32  # `or`: HF reads 0 / None as the default
  beta_slow = s.get("beta_slow") or 1

  def correction_dim(rotations):  # the pair index that turns `rotations` times over original_len
    return dim * math.log(original_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

  low, high = correction_dim(beta_fast), correction_dim(beta_slow)
  if s.get("truncate", True):
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, dim - 1)
  if low == high:
    high += 0.001  # HF: avoid dividing by zero
  ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / np.float32(high - low), 0, 1)
  extrapolation = (np.float32(1) - ramp.astype(np.float32)).astype(np.float32)  # 1 = keep frequency
  interpolated = np.float32(1.0) / (np.float32(factor) * pos_freqs)
  inv_freq = interpolated * (1 - extrapolation) + inv_freq * extrapolation
  return inv_freq.astype(np.float32), float(attention_factor)


def yarn_softmax_scale(scaling: Mapping | tuple | None) -> float:
  """DeepSeek's extra softmax-scale factor mscale(factor, mscale_all_dim)^2 (1 without it)."""
  s = dict(scaling or ())
  if rope_type(s) == "default" or not s.get("mscale_all_dim"):
    return 1.0
  return _mscale(float(s["factor"]), s["mscale_all_dim"]) ** 2


def rope_angles(
  positions: jax.Array,
  head_dim: int,
  theta: float = 10000.0,
  *,
  scaling: Mapping | tuple | None = None,
) -> tuple[jax.Array, jax.Array]:
  """cos, sin [..., head_dim] (float32) of the rotary angles for integer `positions` [...].

  Angle of pair j (dimensions j and j + head_dim / 2 in the rotate-half layout) at position p:
  p * inv_freq[j], inv_freq = theta^(-2j / head_dim) unless `scaling` says otherwise; cos and sin
  carry the scaling's attention factor (1 without scaling).

  Positions given as a numpy array (known when tracing, e.g. the default 0..S-1) give numpy cos and
  sin, constants of the compiled program. Traced positions compute them in the program, where
  XLA:CPU fuses cos and sin into each consumer and so evaluates them once per head of q and of k,
  forward and backward: ~20 ms of a ~300 ms training step of the tiny Mixtral config, gone with
  constants.
  """
  xp = np if isinstance(positions, np.ndarray) else jnp
  inv_freq, attention_factor = rope_frequencies(head_dim, theta, scaling)
  angles = positions.astype(np.float32)[..., None] * inv_freq  # [..., A/2] float32
  angles = xp.concatenate([angles, angles], axis=-1)  # [..., A]
  cos, sin = xp.cos(angles), xp.sin(angles)
  if attention_factor != 1.0:
    cos, sin = cos * np.float32(attention_factor), sin * np.float32(attention_factor)
  return cos, sin


def apply_rope(
  x: jax.Array, cos: jax.Array, sin: jax.Array, *, interleave: bool = False
) -> jax.Array:
  """Rotate x [B, S, H, A] by the angles cos, sin [B or 1, S, A]; keeps x's dtype.

  Rotate-half: x * cos + rotate_half(x) * sin, rotate_half([x1, x2]) = [-x2, x1].
  Interleaved: pairs (x[2j], x[2j+1]) rotate by angle j; the result is in the rotate-half layout
  [x_even cos - x_odd sin, x_odd cos + x_even sin] (see the module docstring).

  The gradient is written out (the transposed rotation, `_rope_bwd`): differentiating the
  slices and the concatenation made XLA:CPU pad and add four [B, S, H, A] tensors per call, 30 ms a
  layer in the backward pass of the small Mixtral config against 3 ms forward.
  """
  shape = (*x.shape[:2], cos.shape[-1])
  return _rope(x, jnp.broadcast_to(cos, shape), jnp.broadcast_to(sin, shape), interleave)


def _rotate_half(x):
  """[x1, x2] -> [-x2, x1] on the last axis."""
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([-x2, x1], axis=-1)


def _rotate(xf, cos, sin, interleave):
  """The rotation in float32; cos, sin [B, S, 1, A]."""
  if interleave:
    half = xf.shape[-1] // 2
    x1, x2 = xf[..., 0::2], xf[..., 1::2]  # [B, S, H, A/2]
    c, s = cos[..., :half], sin[..., :half]
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)
  return xf * cos + _rotate_half(xf) * sin


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _rope(x, cos, sin, interleave):
  out = _rotate(x.astype(jnp.float32), cos[:, :, None, :], sin[:, :, None, :], interleave)
  return out.astype(x.dtype)


def _rope_fwd(x, cos, sin, interleave):
  return _rope(x, cos, sin, interleave), (x, cos, sin)


def _rope_bwd(interleave, residuals, dy):
  """The rotation is linear in x with diagonal cos, sin: dx is dy through the transposed map.

  Rotate-half: out = x c + R(x) s with R([x1, x2]) = [-x2, x1] and R^T = -R, so
  dx = dy c - R(dy s). Interleaved: out = [x1 c - x2 s, x2 c + x1 s] on the pairs' halves, so
  (dx1, dx2) = (dA c + dB s, dB c - dA s) for dy = [dA, dB], interleaved back. The cos and sin
  cotangents (summed over heads) are exact too; XLA drops them when positions are integers.
  """
  x, cos, sin = residuals
  xf, g = x.astype(jnp.float32), dy.astype(jnp.float32)
  c, s = cos[:, :, None, :], sin[:, :, None, :]
  if interleave:
    half = x.shape[-1] // 2
    c, s = c[..., :half], s[..., :half]
    da, db = g[..., :half], g[..., half:]
    x1, x2 = xf[..., 0::2], xf[..., 1::2]
    dx = jnp.stack([da * c + db * s, db * c - da * s], axis=-1).reshape(x.shape)
    zeros = jnp.zeros_like(cos[..., :half])
    dcos = jnp.concatenate([jnp.sum(da * x1 + db * x2, axis=2), zeros], axis=-1)
    dsin = jnp.concatenate([jnp.sum(db * x1 - da * x2, axis=2), zeros], axis=-1)
  else:
    dx = g * c - _rotate_half(g * s)
    dcos = jnp.sum(g * xf, axis=2)
    dsin = jnp.sum(g * _rotate_half(xf), axis=2)
  return dx.astype(x.dtype), dcos.astype(cos.dtype), dsin.astype(sin.dtype)


_rope.defvjp(_rope_fwd, _rope_bwd)

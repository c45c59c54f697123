"""RMSNorm (Zhang & Sennrich 2019) over one or more trailing axes."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx


class RMSNorm(nnx.Module):
  """x / sqrt(mean(x^2) + eps) * scale over the trailing axes of `scale`, computed in float32.

  `dim` is the width D (an int) or the shape of the normalised trailing axes (OLMoE's q/k norm
  covers a whole projection [H, A]); `logical_axes` names the scale's axes (sharding.py).
  """

  def __init__(
    self,
    dim: int | Sequence[int],
    *,
    eps: float = 1e-6,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    logical_axes: Sequence[str | None] = ("embed",),
  ):
    shape = (dim,) if isinstance(dim, int) else tuple(dim)
    if len(logical_axes) != len(shape):
      raise ValueError(f"logical_axes {tuple(logical_axes)} do not match the scale shape {shape}")
    self.scale = nnx.Param(jnp.ones(shape, param_dtype), logical_axes=tuple(logical_axes))
    self.eps = eps
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.scale[...].astype(jnp.float32)
    axes = tuple(range(-scale.ndim, 0))
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=axes, keepdims=True) + self.eps)
    return (xf * scale).astype(self.dtype)

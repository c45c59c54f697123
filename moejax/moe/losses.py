"""Auxiliary losses and routing metrics, computed from a `Routing` on unbiased probabilities.

Normalisation convention: both balance losses score exactly 1.0 for perfectly uniform routing (every
expert gets T*K/E assignments and mean probability 1/E) and grow as routing collapses, up to E for
everything on one expert. Hugging Face's `load_balancing_loss_func` does not divide by K, so its
uniform value is K: multiply ours by K to compare.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moejax.moe.router import Routing


def _token_mask(routing: Routing, token_mask: jax.Array | None) -> jax.Array:
  """Per-slot weights [T, K] in {0, 1}: used slots of real (non-padding) tokens."""
  slots = routing.mask.astype(jnp.float32)
  if token_mask is not None:
    slots = slots * token_mask.astype(jnp.float32)[:, None]
  return slots


def expert_counts(routing: Routing, token_mask: jax.Array | None = None) -> jax.Array:
  """Assignments per expert [E] (float32): how many token copies each expert receives before any
  capacity drop."""
  slots = _token_mask(routing, token_mask)  # [T, K]
  one_hot = jax.nn.one_hot(routing.expert_ids, routing.num_experts, dtype=jnp.float32)  # [T, K, E]
  return jnp.einsum("tk,tke->e", slots, one_hot)


def _normalised_probs(routing: Routing) -> jax.Array:
  """Router probabilities as a distribution over E per token (sigmoid scores are renormalised)."""
  p = routing.probs
  return p / jnp.sum(p, axis=-1, keepdims=True)


def load_balance_loss(routing: Routing, token_mask: jax.Array | None = None) -> jax.Array:
  """Switch/GShard load-balance loss  E * sum_e f_e * P_e  (Fedus et al. 2021, eq. 4).

  f_e: fraction of the used (token, slot) assignments that go to expert e (not differentiable);
  P_e: mean router probability of expert e over tokens. Uniform routing gives 1.0.
  """
  e = routing.num_experts
  counts = jax.lax.stop_gradient(expert_counts(routing, token_mask))  # [E]
  f = counts / jnp.maximum(jnp.sum(counts), 1.0)
  p = _normalised_probs(routing)  # [T, E]
  if token_mask is None:
    p_mean = jnp.mean(p, axis=0)
  else:
    m = token_mask.astype(jnp.float32)[:, None]
    p_mean = jnp.sum(p * m, axis=0) / jnp.maximum(jnp.sum(m), 1.0)
  return e * jnp.sum(f * p_mean)


def sequence_balance_loss(
  routing: Routing, seq_len: int, token_mask: jax.Array | None = None
) -> jax.Array:
  """DeepSeek-V3 complementary sequence-wise balance loss (DeepSeek-AI 2024, eqs. 17-20).

  Per sequence of `seq_len` tokens: f_i = E / (K * S) * #{t : i chosen by t}, P_i = mean_t s'_{t,i}
  with s' the scores normalised per token; loss = sum_i f_i P_i, averaged over sequences. Uniform
  routing gives 1.0 (multiply by the paper's alpha outside). Tokens are laid out [B * S] row-major.
  """
  t, k = routing.expert_ids.shape
  e = routing.num_experts
  b = t // seq_len
  slots = _token_mask(routing, token_mask).reshape(b, seq_len, k)  # [B, S, K]
  one_hot = jax.nn.one_hot(routing.expert_ids.reshape(b, seq_len, k), e)  # [B, S, K, E]
  counts = jax.lax.stop_gradient(jnp.einsum("bsk,bske->be", slots, one_hot))  # [B, E]
  p = _normalised_probs(routing).reshape(b, seq_len, e)  # [B, S, E]
  if token_mask is None:
    n_tokens = jnp.full((b, 1), float(seq_len))
    p_mean = jnp.mean(p, axis=1)  # [B, E]
  else:
    m = token_mask.astype(jnp.float32).reshape(b, seq_len, 1)
    n_tokens = jnp.maximum(jnp.sum(m, axis=1), 1.0)  # [B, 1]
    p_mean = jnp.sum(p * m, axis=1) / n_tokens
  f = counts * e / (k * n_tokens)  # [B, E]
  return jnp.mean(jnp.sum(f * p_mean, axis=-1))


def router_z_loss(routing: Routing, token_mask: jax.Array | None = None) -> jax.Array:
  """ST-MoE router z-loss  mean_t (logsumexp_e logits[t, e])^2  (Zoph et al. 2022, eq. 5)."""
  z = jax.nn.logsumexp(routing.logits, axis=-1) ** 2  # [T]
  if token_mask is None:
    return jnp.mean(z)
  m = token_mask.astype(jnp.float32)
  return jnp.sum(z * m) / jnp.maximum(jnp.sum(m), 1.0)


def router_entropy(routing: Routing) -> jax.Array:
  """Mean entropy (nats) of the per-token routing distribution; log(E) means no preference."""
  p = _normalised_probs(routing)
  return jnp.mean(-jnp.sum(p * jnp.log(jnp.maximum(p, 1e-30)), axis=-1))


def update_aux_free_bias(bias: jax.Array, counts: jax.Array, rate: float) -> jax.Array:
  """Auxiliary-loss-free balancing step (Wang et al. 2024; DeepSeek-V3 Sec. 2.1.2).

  b_e += rate * sign(mean_load - load_e): overloaded experts become less attractive to the router,
  underloaded ones more. `counts` [E] is the per-expert load of the step (`aux["expert_counts"]`,
  summed over layers' batches as the caller likes). The train step applies this outside the
  optimizer; the bias never receives a gradient.
  """
  # [..., E]: leading axes (stacked layers) update independently.
  counts = counts.astype(jnp.float32)
  step = rate * jnp.sign(jnp.mean(counts, axis=-1, keepdims=True) - counts)
  return (bias.astype(jnp.float32) + step).astype(bias.dtype)

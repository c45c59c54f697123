"""An independent per-expert reference for the MoE layer, written from the papers, not from moejax.

Two passes, so that gradients can be taken through the reference too:

1. `select(...)`: the discrete decisions -- which experts each token visits and which copies a full
   expert drops -- in float64 numpy with plain Python loops over tokens and experts.
2. `forward(...)`: given those decisions, the differentiable computation in float64 jax: router
   probabilities, combine weights as a dense [T, E] matrix, and a Python loop over experts that runs
   every expert on every token and keeps the weighted outputs. No sorting, no gathers, no capacity
   buffers, no grouped matmul.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def _np_softmax(z):
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def _capacity(cfg, t):
  return max(1, min(math.ceil(t * cfg.top_k / cfg.num_experts * cfg.capacity_factor), t))


def select(cfg, params, x, real=None):
  """Discrete routing decisions: `chosen` [T, E] bool (the token's copy reaches expert e).

  x [T, D] float64 numpy; `real` [T] bool marks real tokens (padding is never dispatched by
  token-choice routers). Returns (chosen, requested) where `requested` is before capacity drops.
  """
  x = np.asarray(x, np.float64)
  logits = x @ np.asarray(params["router.kernel"], np.float64)
  if "router.bias" in params:
    logits = logits + np.asarray(params["router.bias"], np.float64)
  t, e = logits.shape
  k = cfg.top_k
  bias = np.asarray(params.get("router.aux_free_bias", np.zeros(e)), np.float64)
  # The per-token choice of experts, as an ordered list (highest priority first).
  picks: list[list[int]] = []
  if cfg.router == "expert_choice":
    p = _np_softmax(logits)
    c = _capacity(cfg, t)
    requested = np.zeros((t, e), bool)
    for j in range(e):
      order = sorted(range(t), key=lambda i, j=j: -p[i, j])
      for i in order[:c]:
        requested[i, j] = True
    # Expert choice fixes its own capacity: nothing is ever dropped.
    return requested.copy(), requested
  for i in range(t):
    if cfg.router == "top_p":
      p = _np_softmax(logits[i])
      order = sorted(range(e), key=lambda j, p=p: -p[j])
      chosen, mass = [], 0.0
      for j in order[:k]:
        if mass >= cfg.top_p:
          break
        chosen.append(j)
        mass += p[j]
      picks.append(chosen)
      continue
    if cfg.router == "softmax_topk":
      score = _np_softmax(logits[i]) + bias
    elif cfg.router == "topk_softmax":
      score = logits[i] + bias
    elif cfg.router == "sigmoid":
      score = 1.0 / (1.0 + np.exp(-logits[i])) + bias
    else:
      raise ValueError(cfg.router)
    if cfg.num_groups > 1:
      # DeepSeek-V3 (sigmoid): a group scores its top-2 sum; DeepSeek-V2 (softmax): its maximum.
      top = 2 if cfg.router == "sigmoid" else 1
      size = e // cfg.num_groups
      group_score = [
        sum(sorted(score[g * size : (g + 1) * size], reverse=True)[:top])
        for g in range(cfg.num_groups)
      ]
      best = sorted(range(cfg.num_groups), key=lambda g, gs=group_score: -gs[g])
      allowed = set()
      for g in best[: cfg.topk_groups]:
        allowed.update(range(g * size, (g + 1) * size))
      score = np.array([score[j] if j in allowed else -np.inf for j in range(e)])
    picks.append(sorted(range(e), key=lambda j, s=score: -s[j])[:k])
  if real is not None:
    picks = [ps if real[i] else [] for i, ps in enumerate(picks)]
  requested = np.zeros((t, e), bool)
  for i, ps in enumerate(picks):
    requested[i, ps] = True
  if cfg.dispatch == "dropless":
    return requested.copy(), requested
  # GShard priority: every token's first choice in token order, then every second choice, ...
  c = _capacity(cfg, t)
  fill = [0] * e
  chosen = np.zeros((t, e), bool)
  for slot in range(k):
    for i in range(t):
      if slot < len(picks[i]):
        j = picks[i][slot]
        if fill[j] < c:
          chosen[i, j] = True
          fill[j] += 1
  return chosen, requested


def _act(name, up, gate):
  if name == "swiglu":
    return jax.nn.silu(gate) * up
  if name == "geglu":
    return jax.nn.gelu(gate, approximate=False) * up
  if name == "gelu":
    return jax.nn.gelu(up, approximate=False)
  if name == "relu":
    return jax.nn.relu(up)
  raise ValueError(name)


def forward(cfg, params, x, chosen, requested):
  """y [T, D] from x [T, D], given the decisions of `select`. Differentiable in x and params."""
  logits = x @ params["router.kernel"]
  if "router.bias" in params:
    logits = logits + params["router.bias"]
  requested = jnp.asarray(requested)
  if cfg.router == "sigmoid":
    scores = jax.nn.sigmoid(logits)
    w = jnp.where(requested, scores, 0.0)
    if cfg.norm_topk_prob:
      w = w / w.sum(-1, keepdims=True)
    w = w * cfg.routed_scaling_factor
  elif cfg.router == "topk_softmax":
    masked = jnp.where(requested, logits, -jnp.inf)
    w = jax.nn.softmax(masked, axis=-1) * cfg.routed_scaling_factor
  elif cfg.router == "expert_choice":
    w = jnp.where(requested, jax.nn.softmax(logits, axis=-1), 0.0)
  else:  # softmax_topk, top_p
    w = jnp.where(requested, jax.nn.softmax(logits, axis=-1), 0.0)
    if cfg.norm_topk_prob:
      w = w / w.sum(-1, keepdims=True)
    w = w * cfg.routed_scaling_factor
  # Capacity drops remove a copy's output but do not renormalise the survivors (GShard, Switch).
  w = jnp.where(jnp.asarray(chosen), w, 0.0)  # [T, E]

  y = jnp.zeros_like(x)
  for j in range(cfg.num_experts):
    up = x @ params["experts.w_up"][j]
    gate = x @ params["experts.w_gate"][j] if "experts.w_gate" in params else None
    y = y + w[:, j : j + 1] * (_act(cfg.activation, up, gate) @ params["experts.w_down"][j])
  if "shared_experts.w_up" in params:
    up = x @ params["shared_experts.w_up"]
    gate = x @ params["shared_experts.w_gate"] if "shared_experts.w_gate" in params else None
    s = _act(cfg.activation, up, gate) @ params["shared_experts.w_down"]
    if "shared_experts.gate" in params:
      s = s * jax.nn.sigmoid(x @ params["shared_experts.gate"])
    y = y + s
  return y

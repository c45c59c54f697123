"""AdamW with linear warmup and cosine decay, global-norm clipping and a weight-decay mask.

Decoupled weight decay (Loshchilov & Hutter 2019) applies to matrices only: RMSNorm scales and
biases (1-D parameters) are not decayed, as in GPT-2/3, LLaMA and MaxText.
"""

from __future__ import annotations

import jax
import optax


def learning_rate_schedule(train_config) -> optax.Schedule:
  """Linear warmup from 0 to `learning_rate`, then cosine decay to `learning_rate * min_lr_ratio`
  at `steps`."""
  t = train_config
  warmup = max(0, min(int(t.warmup_steps), int(t.steps)))
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=t.learning_rate,
    warmup_steps=warmup,
    decay_steps=max(int(t.steps), warmup + 1),
    end_value=t.learning_rate * t.min_lr_ratio,
  )


def decay_mask(params):
  """True for parameters that get weight decay: every array with two or more dimensions."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(train_config) -> tuple[optax.GradientTransformation, optax.Schedule]:
  t = train_config
  schedule = learning_rate_schedule(t)
  parts = []
  if t.grad_clip and t.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(t.grad_clip))
  parts.append(
    optax.adamw(schedule, b1=t.b1, b2=t.b2, eps=t.eps, weight_decay=t.weight_decay, mask=decay_mask)
  )
  return optax.chain(*parts), schedule

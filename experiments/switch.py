"""Switch-Transformer-style MoE LM: top-1 softmax routing with expert capacity, overflow tokens ride
the residual (Fedus et al. 2021, "Switch Transformers", Sec. 2.1-2.2).

python -m moejax.train --config experiments/switch.py:tiny --workdir runs/switch_tiny

Variants: `tiny` (CPU, minutes), `small`. `capacity_factor=1.0,1.25,2.0` reproduces the capacity
sweep, e.g. `--config experiments/switch.py:variant=tiny,capacity_factor=2.0`.
"""

from moejax.train.config import base_config, parse_arg

VARIANTS = ("tiny", "small")


def get_config(arg=None):
  arg = parse_arg(arg, variant="tiny", tiny=False, capacity_factor=1.25, experts=8)
  variant = "tiny" if arg.tiny else arg.variant
  config = base_config()
  m = config.model
  m.moe.router = "softmax_topk"
  m.moe.top_k = 1
  # Switch multiplies the expert output by the raw router probability (no renormalisation), which
  # is what gives the router a gradient with one expert.
  m.moe.norm_topk_prob = False
  m.moe.dispatch = "capacity"
  m.moe.capacity_factor = arg.capacity_factor
  m.moe.num_experts = arg.experts
  # Switch's aux-loss coefficient alpha = 0.01 and router z-loss off (z-loss came with ST-MoE).
  m.load_balance_coef = 0.01
  m.z_loss_coef = 0.0
  # Switch places MoE in every other FFN layer.
  m.moe_every = 2
  if variant == "tiny":
    m.d_model, m.num_layers, m.num_heads, m.num_kv_heads = 128, 4, 4, 4
    m.moe.expert_hidden_dim = 512
    m.dense_hidden_dim = 512
    config.train.steps = 500
  elif variant == "small":
    m.d_model, m.num_layers, m.num_heads, m.num_kv_heads = 512, 8, 8, 8
    m.moe.expert_hidden_dim = 2048
    m.dense_hidden_dim = 2048
    config.train.update(steps=20_000, batch_size=64, seq_len=512, learning_rate=1e-3)
  else:
    raise ValueError(f"switch: unknown variant {variant!r}; known: tiny, small")
  config.lock()
  return config

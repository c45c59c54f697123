"""DeepSeekMoE-style LM: fine-grained experts plus shared experts, sigmoid routing with the
auxiliary-loss-free bias and group-limited selection, a dense first layer (Dai et al. 2024,
"DeepSeekMoE"; DeepSeek-AI 2024, "DeepSeek-V3", Sec. 2.1.2).

python -m moejax.train --config experiments/deepseekmoe.py:tiny --workdir runs/dsmoe_tiny

Variants: `tiny` (CPU, minutes), `small`.
"""

from moejax.train.config import base_config, parse_arg

VARIANTS = ("tiny", "small")


def get_config(arg=None):
  arg = parse_arg(arg, variant="tiny", tiny=False)
  variant = "tiny" if arg.tiny else arg.variant
  config = base_config()
  m = config.model
  m.moe.router = "sigmoid"
  m.moe.norm_topk_prob = True
  m.moe.aux_free_bias = True
  m.moe.aux_free_bias_rate = 0.001
  m.first_k_dense = 1
  # The balance is kept by the bias; only DeepSeek-V3's tiny sequence-wise loss remains.
  m.load_balance_coef = 0.0
  m.seq_balance_coef = 0.0001
  if variant == "tiny":
    m.d_model, m.num_layers, m.num_heads, m.num_kv_heads = 128, 4, 4, 4
    # Fine-grained: 16 experts of width 64, 4 per token, in 4 groups (2 kept); 1 shared expert.
    m.moe.num_experts, m.moe.top_k, m.moe.expert_hidden_dim = 16, 4, 64
    m.moe.num_groups, m.moe.topk_groups = 4, 2
    m.moe.num_shared_experts = 1
    m.moe.shared_expert_hidden_dim = 128
    m.moe.routed_scaling_factor = 1.0
    m.dense_hidden_dim = 512
    config.train.steps = 500
  elif variant == "small":
    m.d_model, m.num_layers, m.num_heads, m.num_kv_heads = 512, 8, 8, 8
    m.moe.num_experts, m.moe.top_k, m.moe.expert_hidden_dim = 64, 6, 256
    m.moe.num_groups, m.moe.topk_groups = 8, 4
    m.moe.num_shared_experts = 2
    m.moe.routed_scaling_factor = 2.5
    m.dense_hidden_dim = 2048
    config.train.update(steps=20_000, batch_size=64, seq_len=512, learning_rate=1e-3)
  else:
    raise ValueError(f"deepseekmoe: unknown variant {variant!r}; known: tiny, small")
  config.lock()
  return config

"""Mixtral-style MoE LM: softmax router, top-2 of 8 SwiGLU experts, renormalised, dropless
(Jiang et al. 2024, "Mixtral of Experts").

python -m moejax.train --config experiments/mixtral.py:tiny --workdir runs/mixtral_tiny

Variants: `tiny` (trains on 2 CPU cores in minutes on the embedded stdlib corpus), `small`, `base`.
"""

from moejax.train.config import base_config, parse_arg

VARIANTS = ("tiny", "small", "base")


def get_config(arg=None):
  arg = parse_arg(arg, variant="tiny", tiny=False)
  variant = "tiny" if arg.tiny else arg.variant
  config = base_config()
  m = config.model
  m.moe.router = "softmax_topk"
  m.moe.norm_topk_prob = True
  m.moe.top_k = 2
  m.moe.num_experts = 8
  m.moe.dispatch = "dropless"
  # Switch's alpha = 0.01 on the load-balance loss normalised to 1.0 when uniform (transformers'
  # router_aux_loss_coef multiplies a loss top_k times larger).
  m.load_balance_coef = 0.01
  if variant in ("tiny", "small"):
    # Few layers: unrolled is faster on CPU than a scan, which copies every layer's saved
    # activations into stacked buffers and back (tiny train step: 404 -> 315 ms on 2 cores).
    m.scan_layers = False
  if variant == "tiny":
    m.d_model, m.num_layers, m.num_heads, m.num_kv_heads = 128, 4, 4, 2
    m.moe.expert_hidden_dim = 256
    m.dense_hidden_dim = 512
    # Two micro-batches of 8 sequences, which run side by side on a CPU's cores: ~20% more
    # tokens/s on 2 cores (see moejax.train.trainer). The load-balance loss is per micro-batch.
    config.train.update(steps=500, batch_size=16, seq_len=128, microbatches=2)
  elif variant == "small":
    m.d_model, m.num_layers, m.num_heads, m.num_kv_heads = 512, 8, 8, 4
    m.moe.expert_hidden_dim = 1024
    m.dense_hidden_dim = 2048
    config.train.update(steps=20_000, batch_size=64, seq_len=512, learning_rate=1e-3)
  elif variant == "base":
    m.d_model, m.num_layers, m.num_heads, m.num_kv_heads = 1024, 16, 16, 8
    m.moe.expert_hidden_dim = 2816
    m.dense_hidden_dim = 4096
    config.train.update(steps=100_000, batch_size=256, seq_len=1024, learning_rate=6e-4)
  else:
    raise ValueError(f"mixtral: unknown variant {variant!r}; known: tiny, small, base")
  config.lock()
  return config

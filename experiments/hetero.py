"""A heterogeneous MoE stack: MoE layers with their own number of experts and a dense layer, given
as one block spec per layer (`config.model.layers`; see moejax.models.config).

python -m moejax.train --config experiments/hetero.py:tiny --workdir runs/hetero_tiny

Variants: `tiny` (4 layers: MoE with 8, dense, MoE with 6, MoE with 4 experts; unscanned, trains on
2 CPU cores in minutes on the embedded stdlib corpus) and `repeat` (6 layers: dense, then the pair
(MoE 8, MoE 4) twice, then MoE 6; scanned: the repeated pair runs as one `nnx.scan`). Each layer's
`moe` dict overrides `config.model.moe` (Mixtral-style: softmax top-2, renormalised, dropless).
"""

from moejax.train.config import base_config, parse_arg

VARIANTS = ("tiny", "repeat")


def get_config(arg=None):
  arg = parse_arg(arg, variant="tiny", tiny=False)
  variant = "tiny" if arg.tiny else arg.variant
  config = base_config()
  m = config.model
  # The MoE block every layer's `moe` dict overrides.
  m.moe.router = "softmax_topk"
  m.moe.top_k = 2
  m.moe.num_experts = 8
  m.moe.expert_hidden_dim = 256
  m.d_model, m.num_heads, m.num_kv_heads, m.dense_hidden_dim = 128, 4, 2, 512
  m.load_balance_coef = 0.01
  experts = lambda e: {"moe": {"num_experts": e}}
  dense = {"moe": None}
  if variant == "tiny":
    m.num_layers = 4
    m.layers = (experts(8), dense, experts(6), experts(4))
    # Few layers: unrolled is faster on CPU than a scan (see experiments/mixtral.py).
    m.scan_layers = False
  elif variant == "repeat":
    m.num_layers = 6
    m.layers = (dense, experts(8), experts(4), experts(8), experts(4), experts(6))
    m.scan_layers = True  # prefix: the dense layer; scanned: (MoE 8, MoE 4) x 2; suffix: MoE 6
  else:
    raise ValueError(f"hetero: unknown variant {variant!r}; known: {', '.join(VARIANTS)}")
  # Two micro-batches of 8 sequences, as experiments/mixtral.py:tiny.
  config.train.update(steps=500, batch_size=16, seq_len=128, microbatches=2)
  config.lock()
  return config

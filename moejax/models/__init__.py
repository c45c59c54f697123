"""Language models built on the MoE layer: a decoder-only transformer with dense or MoE FFNs.

Attention is GQA (attention.py; QK norms, clip_qkv, RoPE/YaRN from rope.py) or multi-head latent
attention (mla.py), both with a KV cache for decoding (see transformer.py).
"""

from moejax.models.attention import (
  Attention,
  Projection,
  apply_rope,
  attention_mask,
  cache_attention_mask,
  dot_product_attention,
  rope_angles,
)
from moejax.models.config import BlockSpec, ModelConfig
from moejax.models.mla import MLA
from moejax.models.registry import block_class, block_kinds, register_block
from moejax.models.rope import rope_frequencies, yarn_softmax_scale
from moejax.models.transformer import (
  Block,
  DenseFFN,
  RMSNorm,
  Transformer,
  layer_layout,
  lm_loss,
  stack_layers,
  unstack_layers,
)

__all__ = [
  "MLA",
  "Attention",
  "Block",
  "BlockSpec",
  "DenseFFN",
  "ModelConfig",
  "Projection",
  "RMSNorm",
  "Transformer",
  "apply_rope",
  "attention_mask",
  "block_class",
  "block_kinds",
  "cache_attention_mask",
  "dot_product_attention",
  "layer_layout",
  "lm_loss",
  "register_block",
  "rope_angles",
  "rope_frequencies",
  "stack_layers",
  "unstack_layers",
  "yarn_softmax_scale",
]

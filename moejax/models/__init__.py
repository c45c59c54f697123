"""Language models built on the MoE layer: a decoder-only transformer with dense or MoE FFNs."""

from moejax.models.attention import (
  Attention,
  Projection,
  apply_rope,
  attention_mask,
  dot_product_attention,
  rope_angles,
)
from moejax.models.config import ModelConfig
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
  "Attention",
  "Block",
  "DenseFFN",
  "ModelConfig",
  "Projection",
  "RMSNorm",
  "Transformer",
  "apply_rope",
  "attention_mask",
  "dot_product_attention",
  "layer_layout",
  "lm_loss",
  "rope_angles",
  "stack_layers",
  "unstack_layers",
]

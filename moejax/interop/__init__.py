"""Checkpoint interoperability: Hugging Face transformers import (`load_hf`) and export (`save_hf`).

Needs the `hf` extra's `safetensors` (not torch or transformers).
"""

from moejax.interop.hf import load_hf, param_sources, save_hf
from moejax.interop.hf_config import (
  EXPORT_MODEL_TYPES,
  SUPPORTED_MODEL_TYPES,
  config_from_hf,
  config_to_hf,
)

__all__ = [
  "EXPORT_MODEL_TYPES",
  "SUPPORTED_MODEL_TYPES",
  "config_from_hf",
  "config_to_hf",
  "load_hf",
  "param_sources",
  "save_hf",
]

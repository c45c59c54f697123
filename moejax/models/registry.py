"""Block kinds: a name in `BlockSpec.kind` picks the module class that builds that layer.

    register_block("transformer", Block)      # the pre-norm block (transformer.py), registered first
    register_block("lorentz", LorentzBlock)   # e.g. a hyperbolic block: one more entry

A block class is built as `cls(config: ModelConfig, spec: BlockSpec, *, rngs)` (spec resolved: its
attention filled in, its `moe` an MoEConfig or None) and called like `transformer.Block`:
`block(x, positions, segment_ids, token_mask[, cache, cache_index=, cache_mask=], capture=...)`
-> (x, aux or None[, capture][, cache]), where `aux` is its MoE layer's aux dict (the keys of
`moejax.moe.stats.LAYER_STATS`) or None, and capture is returned only when `capture` is set.
"""

from __future__ import annotations

_BLOCKS: dict[str, type] = {}


def register_block(name: str, cls: type) -> type:
  """Registers block class `cls` under `name` (the value of `BlockSpec.kind`); returns `cls`."""
  if not isinstance(name, str) or not name:
    raise ValueError(f"register_block: name={name!r} must be a non-empty string")
  if name in _BLOCKS and _BLOCKS[name] is not cls:
    raise ValueError(f"register_block: {name!r} is already registered to {_BLOCKS[name].__name__}")
  _BLOCKS[name] = cls
  return cls


def block_class(name: str) -> type:
  """The class registered under `name`; ValueError naming the known kinds otherwise."""
  if name not in _BLOCKS:
    raise ValueError(f"BlockSpec.kind={name!r} is not registered; known: {', '.join(_BLOCKS)}")
  return _BLOCKS[name]


def block_kinds() -> tuple[str, ...]:
  """The registered block kinds, in registration order."""
  return tuple(_BLOCKS)

"""Reading routing out of a model: one call, whatever its layout (scanned or not).

    model.eval()                                   # no router jitter: the routing is reproducible
    for cap in capture_routing(model, tokens):     # one LayerCapture per MoE layer, in layer order
      cap.layer                                    # the layer index (ModelConfig.moe_layers)
      cap.routing.expert_ids                       # [T, K], T = B * S tokens in row-major order
    caps = capture_routing(model, tokens, capture_io=True)
    caps[0].inputs, caps[0].outputs                # [B, S, D]: what the MoE layer receives and returns

The model runs jitted with a static capture flag threaded through its blocks (and `nnx.scan`), so the
training path's trace is unchanged when nothing is captured. The routing is the one the layer
dispatched (`MoE.__call__(..., return_routing=True)`): after the padding mask and the post-routing
transforms. `moe_layer(model, i)` gives layer i's MoE module (a slice of the stacked variables for a
scanned layer), whose `router(x.reshape(-1, D))` recomputes a layer's routing from its captured input.
The model's state is not changed (router-noise RNG counters included).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
from flax import nnx

from moejax.models.transformer import Transformer, layer_layout
from moejax.moe.layer import MoE
from moejax.moe.router import Routing


@dataclasses.dataclass(frozen=True)
class LayerCapture:
  """What one MoE layer saw and chose in a forward pass."""

  # Index of the layer in the stack (0-based, over all layers, dense ones included).
  layer: int
  # The layer's Routing: expert_ids, weights, mask [T, K]; probs, logits [T, E_l].
  routing: Routing
  # With capture_io: the normed hidden state the MoE layer receives [B, S, D], and its output
  # [B, S, D] (before the residual add).
  inputs: jax.Array | None = None
  outputs: jax.Array | None = None


def capture_routing(
  model: Transformer,
  tokens: jax.Array,
  *,
  token_mask: jax.Array | None = None,
  positions: jax.Array | None = None,
  segment_ids: jax.Array | None = None,
  capture_io: bool = False,
) -> list[LayerCapture]:
  """Runs `model` on `tokens` [B, S] and returns each MoE layer's routing, in layer order.

  `token_mask`, `positions`, `segment_ids` are passed to the model as in `Transformer.__call__`.
  With `capture_io` each capture also holds the layer's input and output. Compiled once per model
  structure and flag.
  """
  graphdef, state = nnx.split(model)
  captured = _capture_fn(graphdef, "io" if capture_io else "routing")(
    state, tokens, token_mask, positions, segment_ids
  )
  layers = model.config.moe_layers
  assert len(captured) == len(layers), (len(captured), layers)
  return [
    LayerCapture(layer, c["routing"], c.get("inputs"), c.get("outputs"))
    for layer, c in zip(layers, captured, strict=True)
  ]


@functools.lru_cache(maxsize=16)
def _capture_fn(graphdef, capture: str):
  def run(state, tokens, token_mask, positions, segment_ids):
    model = nnx.merge(graphdef, state)
    _, _, captured = model(
      tokens, token_mask=token_mask, positions=positions, segment_ids=segment_ids, capture=capture
    )
    return [c for _, c in captured]

  return jax.jit(run)


def moe_layer(model: Transformer, layer: int) -> MoE:
  """The MoE module of layer `layer`; for a layer inside a scanned stack, a module holding that
  layer's slice of the stacked variables (a copy: updating it leaves the model alone)."""
  c = model.config
  if not 0 <= layer < c.num_layers or not c.is_moe_layer(layer):
    raise ValueError(f"layer={layer!r} is not an MoE layer; the MoE layers are {c.moe_layers}")
  if not c.scan_layers:
    return model.blocks[layer].moe
  prefix, period, units, _ = layer_layout(c)
  if layer < prefix:
    return model.prefix_blocks[layer].moe
  if layer >= prefix + period * units:
    return model.suffix_blocks[layer - prefix - period * units].moe
  u, j = divmod(layer - prefix, period)
  graphdef, state = nnx.split(model.scanned_blocks[j].moe)
  return nnx.merge(graphdef, jax.tree.map(lambda a: a[u], state))

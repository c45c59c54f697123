"""The FFN nonlinearities, by name: shared by the routed experts, the shared experts and dense FFNs.

`swiglu` (Shazeer 2020) and `geglu` are gated: act(x @ w_gate) * (x @ w_up); `gelu` and `relu` are
plain: act(x @ w_up).
"""

from __future__ import annotations

import jax

ACTIVATIONS = {
  "swiglu": jax.nn.silu,
  "geglu": lambda x: jax.nn.gelu(x, approximate=False),
  "gelu": lambda x: jax.nn.gelu(x, approximate=False),
  "relu": jax.nn.relu,
}
GATED = ("swiglu", "geglu")


def activate(activation: str, up: jax.Array, gate: jax.Array | None) -> jax.Array:
  """The FFN nonlinearity: act(gate) * up when gated, act(up) otherwise."""
  fn = ACTIVATIONS[activation]
  return fn(up) if gate is None else fn(gate) * up

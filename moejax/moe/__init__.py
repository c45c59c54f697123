"""The MoE layer and its swappable parts: routers, losses, experts, dispatch."""

from moejax.moe.config import ACTIVATIONS, DISPATCHES, ROUTERS, MoEConfig
from moejax.moe.dispatch import capacity_combine, capacity_dispatch, sort_combine, sort_dispatch
from moejax.moe.experts import Experts, SharedExperts
from moejax.moe.layer import AuxFreeBias, MoE, Router
from moejax.moe.losses import (
  expert_counts,
  load_balance_loss,
  router_entropy,
  router_z_loss,
  sequence_balance_loss,
  update_aux_free_bias,
)
from moejax.moe.router import (
  Routing,
  expert_choice,
  route,
  sigmoid_topk,
  softmax_topk,
  top_p,
  topk_softmax,
)

__all__ = [
  "ACTIVATIONS",
  "DISPATCHES",
  "ROUTERS",
  "AuxFreeBias",
  "Experts",
  "MoE",
  "MoEConfig",
  "Router",
  "Routing",
  "SharedExperts",
  "capacity_combine",
  "capacity_dispatch",
  "expert_choice",
  "expert_counts",
  "load_balance_loss",
  "route",
  "router_entropy",
  "router_z_loss",
  "sequence_balance_loss",
  "sigmoid_topk",
  "softmax_topk",
  "sort_combine",
  "sort_dispatch",
  "top_p",
  "topk_softmax",
  "update_aux_free_bias",
]

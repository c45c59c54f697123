"""The MoE layer and its swappable parts: routers, losses, experts, dispatch.

The seams are registries: `register_router` / `register_router_logits` (how tokens pick experts),
`register_post_routing` (edits of the routing before dispatch), `register_expert_kind` (what an
expert is); `MoEConfig` picks entries by name. See docs/extending.md.
"""

from moejax.moe.activations import ACTIVATIONS
from moejax.moe.config import MoEConfig
from moejax.moe.dispatch import (
  DISPATCHES,
  capacity_combine,
  capacity_dispatch,
  sort_combine,
  sort_dispatch,
)
from moejax.moe.ep_transport import EP_TRANSPORTS
from moejax.moe.experts import (
  EXPERT_KINDS,
  ExpertKind,
  Experts,
  SharedExperts,
  expert_kind,
  register_expert_kind,
)
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
  POST_ROUTING,
  ROUTER_LOGITS,
  ROUTERS,
  ParamSpec,
  RouterLogits,
  RouterSpec,
  Routing,
  expert_choice,
  post_route,
  register_post_routing,
  register_router,
  register_router_logits,
  route,
  sigmoid_topk,
  softmax_topk,
  top_p,
  topk_softmax,
)

__all__ = [
  "ACTIVATIONS",
  "DISPATCHES",
  "EP_TRANSPORTS",
  "EXPERT_KINDS",
  "POST_ROUTING",
  "ROUTERS",
  "ROUTER_LOGITS",
  "AuxFreeBias",
  "ExpertKind",
  "Experts",
  "MoE",
  "MoEConfig",
  "ParamSpec",
  "Router",
  "RouterLogits",
  "RouterSpec",
  "Routing",
  "SharedExperts",
  "capacity_combine",
  "capacity_dispatch",
  "expert_choice",
  "expert_counts",
  "expert_kind",
  "load_balance_loss",
  "post_route",
  "register_expert_kind",
  "register_post_routing",
  "register_router",
  "register_router_logits",
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

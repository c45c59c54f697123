"""The MoE statistics in a model's `aux`, each declared once.

Every key an MoE layer puts in its aux dict is a `Stat` below: its shape in one layer, how the model
reduces it over its MoE layers, how the trainer merges it over micro-batches, and the `ModelConfig`
coefficient (if any) that adds it to `aux["aux_loss"]`. The model's summary (`summarise`), the
trainer's micro-batch merge (`merge_microbatches`) and its load metrics (`load_imbalance`) read this
table, so a new statistic is one entry here; a key that is not declared is an error, never a silent
token-weighted mean.

Layer reductions:
    mean    averaged over the MoE layers into a scalar (the losses; aux_loss sums coef * per-layer
            value, i.e. L_moe * coef * mean)
    stack   a leading [L_moe] axis, rows in layer order (`ModelConfig.moe_layers`)

Micro-batch reductions (train.microbatches > 1):
    mean      token-weighted mean over micro-batches (each micro-batch's value, weighted by its
              share of the batch's tokens)
    sum       summed (counts, loads, bytes)
    fraction  recomputed from the merged `expert_counts` (each row normalised to sum to 1)

Per-expert statistics of a model whose MoE layers have different numbers of experts E_l stack as
[L_moe, E_max] with row l zero-padded past its E_l real experts (E_max = max E_l); the model's
`ModelConfig.moe_num_experts` gives each row's E_l, and what reads a row (the aux-free bias update,
`load_imbalance`, plots) uses only its first E_l columns. Zero padding leaves sums and maxima of
counts (which are >= 0) unchanged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp

SHAPES = ("scalar", "expert", "device")
LAYER_REDUCTIONS = ("mean", "stack")
MICROBATCH_REDUCTIONS = ("mean", "sum", "fraction")


@dataclasses.dataclass(frozen=True)
class Stat:
  """One statistic of an MoE layer's aux dict."""

  # The aux key.
  name: str
  # Shape in one layer: "scalar" [], "expert" [E], "device" [devices].
  shape: str
  # Over MoE layers: "mean" (a scalar) or "stack" (a leading [L_moe] axis).
  layers: str
  # Over micro-batches: "mean" (token-weighted), "sum", or "fraction" (from expert_counts).
  microbatches: str
  # The ModelConfig field whose value times this loss (summed over layers) enters aux_loss.
  loss_coef: str | None = None
  # What it measures.
  doc: str = ""

  def __post_init__(self):
    for field, allowed in (
      ("shape", SHAPES),
      ("layers", LAYER_REDUCTIONS),
      ("microbatches", MICROBATCH_REDUCTIONS),
    ):
      if getattr(self, field) not in allowed:
        raise ValueError(
          f"Stat({self.name!r}).{field}={getattr(self, field)!r} is invalid: allowed are "
          f"{', '.join(allowed)}"
        )
    if self.loss_coef is not None and (self.shape, self.layers) != ("scalar", "mean"):
      raise ValueError(f"Stat({self.name!r}): a loss (loss_coef) must be a scalar with layers=mean")


# The MoE layer's aux keys (moejax.moe.layer.MoE.__call__), in the order the model reports them.
LAYER_STATS: dict[str, Stat] = {
  s.name: s
  for s in (
    Stat(
      "load_balance_loss",
      "scalar",
      "mean",
      "mean",
      "load_balance_coef",
      "Switch load-balance loss (Fedus et al. 2021); 1.0 when uniform",
    ),
    Stat(
      "seq_balance_loss",
      "scalar",
      "mean",
      "mean",
      "seq_balance_coef",
      "DeepSeek-V3 sequence-wise balance loss",
    ),
    Stat("router_z_loss", "scalar", "mean", "mean", "z_loss_coef", "ST-MoE router z-loss"),
    Stat("router_entropy", "scalar", "stack", "mean", doc="mean entropy of the router probs"),
    Stat("experts_per_token", "scalar", "stack", "mean", doc="used slots per real token"),
    Stat("expert_counts", "expert", "stack", "sum", doc="assignments per expert"),
    Stat("expert_load", "expert", "stack", "fraction", doc="expert_counts as fractions"),
    Stat("dropped_fraction", "scalar", "stack", "mean", doc="token copies over capacity"),
    Stat("device_load", "device", "stack", "sum", doc="token copies each device computes"),
    Stat("native_device_load", "device", "stack", "sum", doc="the same without LLEP"),
    Stat("a2a_bytes", "scalar", "stack", "sum", doc="bytes a device sends through all_to_all"),
  )
}
# The model's total auxiliary loss: a scalar, a token-weighted mean over micro-batches.
AUX_LOSS = "aux_loss"
# The scalars a model's aux holds (aux_loss and the layer-averaged losses), in report order.
SCALARS = (AUX_LOSS, *(s.name for s in LAYER_STATS.values() if s.layers == "mean"))
# ModelConfig coefficient field of each loss.
LOSS_COEFS = {s.name: s.loss_coef for s in LAYER_STATS.values() if s.loss_coef is not None}


def check_layer_aux(aux: Mapping[str, jax.Array], where: str = "the MoE layer") -> None:
  """Raises ValueError when an MoE layer's aux keys differ from `LAYER_STATS`."""
  undeclared = sorted(set(aux) - set(LAYER_STATS))
  missing = sorted(set(LAYER_STATS) - set(aux))
  if undeclared or missing:
    raise ValueError(
      f"{where} returned aux keys that moejax.moe.stats.LAYER_STATS does not declare "
      f"({undeclared}) or lacks declared keys ({missing}); declare each statistic once in "
      "moejax/moe/stats.py with how it reduces over layers and micro-batches"
    )


def pad_experts(aux: Mapping[str, jax.Array], num_experts: int) -> dict[str, jax.Array]:
  """`aux` (one layer or a stack of layers) with every per-expert stat zero-padded on its last axis
  to `num_experts` (a no-op where it already has that width)."""
  out = dict(aux)
  for name, value in aux.items():
    if LAYER_STATS[name].shape == "expert" and value.shape[-1] != num_experts:
      pad = [(0, 0)] * (value.ndim - 1) + [(0, num_experts - value.shape[-1])]
      out[name] = jnp.pad(value, pad)
  return out


def empty(num_experts: int) -> dict[str, jax.Array]:
  """The aux of a model without MoE layers: zero scalars and [0, ...] stacks ([0, E] per expert,
  [0, 1] per device)."""
  zero = jnp.zeros((), jnp.float32)
  out = {AUX_LOSS: zero}
  for s in LAYER_STATS.values():
    if s.layers == "mean":
      out[s.name] = zero
    else:
      width = {"scalar": (), "expert": (num_experts,), "device": (1,)}[s.shape]
      out[s.name] = jnp.zeros((0, *width), jnp.float32)
  return out


def summarise(stacked: Mapping[str, jax.Array], coefs: Mapping[str, float]) -> dict[str, jax.Array]:
  """The model's aux from its MoE layers' stats stacked [L_moe, ...] in layer order.

  `coefs` maps each `loss_coef` field name to its value. aux_loss = sum over losses and layers of
  coef * loss; layer-"mean" stats become their average, "stack" stats stay stacked.
  """
  aux_loss = sum(coefs[s.loss_coef] * jnp.sum(stacked[k]) for k, s in _losses())
  out = {AUX_LOSS: aux_loss.astype(jnp.float32)}
  rest = dict(stacked)
  out |= {k: jnp.mean(rest.pop(k)) for k, s in LAYER_STATS.items() if s.layers == "mean"}
  return out | rest


def _losses():
  return [(k, s) for k, s in LAYER_STATS.items() if s.loss_coef is not None]


def merge_microbatches(
  auxes: Sequence[Mapping[str, jax.Array]], shares: Sequence[jax.Array]
) -> dict[str, jax.Array]:
  """One aux from the micro-batches' model auxes; `shares` are their fractions of the tokens.

  Each key reduces as declared: token-weighted mean (aux_loss too), sum, or an expert fraction
  recomputed from the merged expert_counts. An undeclared key is a ValueError.
  """
  mean = lambda *xs: sum(p * x for p, x in zip(shares, xs, strict=True))
  out = {}
  for k in auxes[0]:
    if k == AUX_LOSS:
      rule = "mean"
    elif k in LAYER_STATS:
      rule = LAYER_STATS[k].microbatches
    else:
      raise ValueError(
        f"aux key {k!r} is not declared in moejax.moe.stats.LAYER_STATS: declare how it merges "
        "over micro-batches (mean, sum or fraction) instead of letting it be averaged"
      )
    values = [a[k] for a in auxes]
    if rule == "mean":
      out[k] = mean(*values)
    elif rule == "sum":
      out[k] = sum(values)
  for k in auxes[0]:
    if k in LAYER_STATS and LAYER_STATS[k].microbatches == "fraction":
      out[k] = expert_fraction(out["expert_counts"])
  return {k: out[k] for k in auxes[0]}


def expert_fraction(counts: jax.Array) -> jax.Array:
  """expert_counts [..., E] -> each row as fractions of its assignments (zero rows stay zero)."""
  return counts / jnp.maximum(jnp.sum(counts, axis=-1, keepdims=True), 1.0)


def load_imbalance(counts: jax.Array, num_experts: Sequence[int] | None = None) -> jax.Array:
  """max / mean assignments per expert of each MoE layer: counts [L_moe, E_max] -> [L_moe].

  `num_experts` (each row's real E, `ModelConfig.moe_num_experts`) makes the mean count only a
  row's real experts; None reads every row as E_max wide.
  """
  if num_experts is None or all(e == counts.shape[-1] for e in num_experts):
    return jnp.max(counts, axis=-1) / jnp.maximum(jnp.mean(counts, axis=-1), 1e-9)
  real = jnp.asarray(num_experts, counts.dtype)  # [L_moe]
  mean = jnp.sum(counts, axis=-1) / real  # padding is zero: the sum is the real experts'
  return jnp.max(counts, axis=-1) / jnp.maximum(mean, 1e-9)

"""MoEConfig validation: each rule raises a ValueError naming the field, the value and what is allowed."""

import pytest

from moejax.moe import MoEConfig

BASE = dict(d_model=16, num_experts=8, top_k=2, expert_hidden_dim=32)


@pytest.mark.parametrize(
  "changes,match",
  [
    (dict(top_k=9), r"MoEConfig\.top_k=9 .*<= num_experts=8"),
    (dict(capacity_factor=0.0), r"MoEConfig\.capacity_factor=0\.0 .*> 0"),
    (dict(capacity_factor=-1.0), r"MoEConfig\.capacity_factor=-1\.0"),
    (dict(capacity_factor=float("inf")), r"MoEConfig\.capacity_factor=inf"),
    (dict(top_p=0.0), r"MoEConfig\.top_p=0\.0 .*\(0, 1\]"),
    (dict(top_p=1.5), r"MoEConfig\.top_p=1\.5 .*\(0, 1\]"),
    (dict(router="sigmoid", num_groups=3), r"MoEConfig\.num_groups=3 .*divide num_experts=8"),
    (
      dict(router="sinkhorn"),
      r"MoEConfig\.router='sinkhorn' .*softmax_topk, topk_softmax, sigmoid, expert_choice, top_p",
    ),
    (dict(dispatch="einsum"), r"MoEConfig\.dispatch='einsum' .*dropless, capacity"),
    (dict(activation="tanh"), r"MoEConfig\.activation='tanh' .*swiglu, geglu, gelu, relu"),
    (dict(gmm_backend="cuda"), r"MoEConfig\.gmm_backend='cuda' .*auto, reference, xla, blas"),
    (dict(num_experts=0), r"MoEConfig\.num_experts=0 .*positive integer"),
    (dict(d_model=2.5), r"MoEConfig\.d_model=2\.5 .*positive integer"),
    (
      dict(router="sigmoid", num_groups=4, topk_groups=5),
      r"MoEConfig\.topk_groups=5 .*<= num_groups",
    ),
    (
      dict(router="sigmoid", top_k=4, num_groups=4, topk_groups=1),
      r"MoEConfig\.topk_groups=1 .*fewer than top_k=4",
    ),
    (dict(router="top_p", num_groups=2), r"MoEConfig\.num_groups=2 .*router='sigmoid'"),
    (dict(shared_expert_gate=True), r"MoEConfig\.shared_expert_gate=True .*num_shared_experts"),
    (dict(jitter_noise=1.0), r"MoEConfig\.jitter_noise=1\.0"),
    (dict(router="top_p", aux_free_bias=True), r"MoEConfig\.aux_free_bias=True"),
    (dict(routed_scaling_factor=0.0), r"MoEConfig\.routed_scaling_factor=0\.0"),
    (dict(num_shared_experts=-1), r"MoEConfig\.num_shared_experts=-1"),
  ],
)
def test_invalid_configs_raise_naming_the_field(changes, match):
  with pytest.raises(ValueError, match=match):
    MoEConfig(**{**BASE, **changes})


def test_valid_configs_build():
  MoEConfig(**BASE)
  MoEConfig(
    **{**BASE, "router": "sigmoid", "num_groups": 4, "topk_groups": 2, "aux_free_bias": True}
  )
  MoEConfig(**{**BASE, "router": "top_p", "top_p": 1.0})
  MoEConfig(**{**BASE, "top_k": 8})


def test_capacity_formula():
  cfg = MoEConfig(**{**BASE, "capacity_factor": 1.25})
  assert cfg.capacity(64) == 20  # ceil(64 * 2 / 8 * 1.25)
  assert MoEConfig(**{**BASE, "capacity_factor": 100.0}).capacity(64) == 64  # never above T

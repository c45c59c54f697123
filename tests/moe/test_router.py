"""Hand-computed routing cases for the released models' routers."""

import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax.moe import (
  MoEConfig,
  SharedExperts,
  expert_choice,
  sigmoid_topk,
  softmax_topk,
  top_p,
  topk_softmax,
)


def logit(p):
  return np.log(np.asarray(p) / (1 - np.asarray(p)))


def assert_routing(r, ids, weights, mask=None):
  k = len(ids[0])
  np.testing.assert_array_equal(np.asarray(r.expert_ids)[:, :k], ids)
  np.testing.assert_allclose(np.asarray(r.weights)[:, :k], weights, rtol=1e-6, atol=1e-7)
  if mask is not None:
    np.testing.assert_array_equal(np.asarray(r.mask)[:, :k], mask)


LOGITS = jnp.array([[2.0, 1.0, 0.0, -1.0], [-1.0, 0.0, 3.0, 0.5]])
E2, E1, E0, EM1 = math.exp(2), math.exp(1), 1.0, math.exp(-1)


def test_mixtral_softmax_top2_renormalised():
  r = softmax_topk(LOGITS, top_k=2, norm_topk_prob=True)
  # Renormalised top-2 of a softmax = softmax of the two top logits: e^2 / (e^2 + e^1) = sigmoid(1).
  s1 = 1 / (1 + math.exp(-1))
  s25 = 1 / (1 + math.exp(-2.5))
  assert_routing(r, [[0, 1], [2, 3]], [[s1, 1 - s1], [s25, 1 - s25]])
  # Probabilities are the full softmax, for the losses.
  np.testing.assert_allclose(
    r.probs[0], np.array([E2, E1, E0, EM1]) / (E2 + E1 + E0 + EM1), rtol=1e-6
  )
  # topk_softmax is the same function, computed the other way round.
  r2 = topk_softmax(LOGITS, top_k=2)
  assert_routing(r2, [[0, 1], [2, 3]], [[s1, 1 - s1], [s25, 1 - s25]])


def test_qwen2_softmax_top2_not_renormalised():
  r = softmax_topk(LOGITS[:1], top_k=2, norm_topk_prob=False)
  z = E2 + E1 + E0 + EM1
  assert_routing(r, [[0, 1]], [[E2 / z, E1 / z]])  # 0.643914, 0.236883: sum < 1


def test_qwen2_gated_shared_expert():
  cfg = MoEConfig(
    d_model=2,
    num_experts=2,
    top_k=1,
    expert_hidden_dim=1,
    num_shared_experts=1,
    shared_expert_gate=True,
  )
  shared = SharedExperts(cfg, rngs=nnx.Rngs(0))
  shared.w_gate[...] = jnp.array([[1.0], [0.0]])
  shared.w_up[...] = jnp.array([[0.0], [1.0]])
  shared.w_down[...] = jnp.array([[1.0, -1.0]])
  shared.gate[...] = jnp.array([[0.5], [0.25]])
  y = shared(jnp.array([[1.0, 2.0]]))
  # silu(1) * 2 = 2 sigmoid(1); the gate is sigmoid([1, 2] . [0.5, 0.25]) = sigmoid(1).
  sig1 = 1 / (1 + math.exp(-1))
  expected = 2 * sig1 * sig1
  np.testing.assert_allclose(y, [[expected, -expected]], rtol=1e-6)


# DeepSeek-V3: 8 experts in 4 groups of 2, keep 2 groups, top-2, scaling 2.5.
DS_SCORES = np.array([[0.9, 0.1, 0.6, 0.55, 0.92, 0.01, 0.3, 0.2]])


def test_deepseek_v3_bias_selects_groups_limit_weights_unbiased():
  bias = jnp.array([0, 0, 0, 0.4, 0, 0, 0, 0], jnp.float32)
  r = sigmoid_topk(
    jnp.asarray(logit(DS_SCORES)),
    top_k=2,
    bias=bias,
    num_groups=4,
    topk_groups=2,
    routed_scaling_factor=2.5,
  )
  # Biased scores: expert 3 -> 0.95. Group scores (sum of top-2): g0 1.0, g1 1.55, g2 0.93, g3 0.5.
  # Groups g1 and g0 are kept, so expert 4 (0.92, alone in a weak group) is excluded; top-2 of
  # the biased scores there: 3 (0.95), 0 (0.9). Weights use the *unbiased* scores 0.55, 0.9.
  assert_routing(r, [[3, 0]], [[2.5 * 0.55 / 1.45, 2.5 * 0.9 / 1.45]])
  np.testing.assert_allclose(r.probs, DS_SCORES, rtol=1e-6)


def test_deepseek_v3_without_groups_and_without_bias():
  r = sigmoid_topk(jnp.asarray(logit(DS_SCORES)), top_k=2, routed_scaling_factor=2.5)
  assert_routing(r, [[4, 0]], [[2.5 * 0.92 / 1.82, 2.5 * 0.9 / 1.82]])


def test_deepseek_v3_dropped_groups_are_minus_inf_not_zero():
  # All biased scores negative: masking dropped groups with 0.0 (Hugging Face) would pick experts
  # from dropped groups; -inf (DeepSeek's reference code) keeps the choice inside the kept groups.
  r = sigmoid_topk(
    jnp.asarray(logit(DS_SCORES)),
    top_k=2,
    bias=jnp.full((8,), -2.0),
    num_groups=4,
    topk_groups=2,
    routed_scaling_factor=2.5,
  )
  assert_routing(r, [[0, 2]], [[1.5, 1.0]])


def test_deepseek_v2_group_limited_greedy_scores_groups_by_their_max():
  # Softmax probabilities in 4 groups of 2. By max: g2 (0.3), g0 (0.2) are kept; by top-2 sum
  # (V3's rule) g1 (0.15 + 0.15 = 0.3) would beat g0 (0.2 + 0.0). Top-2 inside g2 and g0: 6, 0.
  probs = np.array([[0.2, 0.0, 0.15, 0.15, 0.05, 0.05, 0.3, 0.1]]) + 1e-9
  probs = probs / probs.sum()
  r = softmax_topk(
    jnp.asarray(np.log(probs)),
    top_k=2,
    norm_topk_prob=False,
    num_groups=4,
    topk_groups=2,
    routed_scaling_factor=16.0,
  )
  assert_routing(r, [[6, 0]], [[16.0 * probs[0, 6], 16.0 * probs[0, 0]]])


def test_expert_choice_each_expert_takes_its_top_c_tokens():
  probs = np.array(
    [
      [0.4, 0.3, 0.3],
      [0.6, 0.35, 0.05],
      [0.5, 0.05, 0.45],
      [0.1, 0.5, 0.4],
    ]
  )
  r = expert_choice(jnp.asarray(np.log(probs)), capacity=2)
  chosen = np.asarray(r.mask)
  # Expert 0: tokens 1, 2; expert 1: tokens 3, 1; expert 2: tokens 2, 3. Token 0 is chosen by none.
  np.testing.assert_array_equal(
    chosen, [[False, False, False], [True, True, False], [True, False, True], [False, True, True]]
  )
  np.testing.assert_allclose(np.asarray(r.weights), np.where(chosen, probs, 0.0), rtol=1e-6)
  assert r.capacity == 2
  np.testing.assert_array_equal(chosen.sum(0), [2, 2, 2])


def test_top_p_adds_experts_until_mass_reaches_p():
  probs = np.array([[0.5, 0.3, 0.15, 0.05], [0.2, 0.22, 0.28, 0.3]])
  lg = jnp.asarray(np.log(probs))
  r = top_p(lg, top_p=0.7, top_k=4)
  # Token 0: mass before each sorted expert 0, 0.5, 0.8 -> experts 0 and 1.
  # Token 1: sorted 3 (0.3), 2 (0.28), 1 (0.22): mass before 0, 0.3, 0.58 -> three experts.
  assert_routing(
    r,
    [[0, 1, 2], [3, 2, 1]],
    [[0.5, 0.3, 0.0], [0.3, 0.28, 0.22]],
    mask=[[True, True, False], [True, True, True]],
  )
  # The cap: never more than top_k.
  r = top_p(lg, top_p=0.99, top_k=2)
  assert np.asarray(r.mask).sum(-1).tolist() == [2, 2]
  # The first expert is always used.
  r = top_p(lg, top_p=0.01, top_k=4)
  assert np.asarray(r.mask).sum(-1).tolist() == [1, 1]
  # Renormalised over the chosen experts when asked.
  r = top_p(lg, top_p=0.7, top_k=4, norm_topk_prob=True)
  np.testing.assert_allclose(np.asarray(r.weights)[0, :2], [0.5 / 0.8, 0.3 / 0.8], rtol=1e-6)


def test_router_math_is_float32_for_bf16_logits():
  r = softmax_topk(LOGITS.astype(jnp.bfloat16), top_k=2)
  assert r.weights.dtype == jnp.float32 and r.probs.dtype == jnp.float32


@pytest.mark.parametrize("bias_first", [True, False])
def test_bias_changes_selection_not_weights(bias_first):
  lg = jnp.asarray(np.log([[0.4, 0.35, 0.25]]))
  bias = jnp.array([0.0, 0.0, 1.0]) if bias_first else jnp.zeros(3)
  r = softmax_topk(lg, top_k=1, norm_topk_prob=False, bias=bias)
  expected = (2, 0.25) if bias_first else (0, 0.4)
  assert_routing(r, [[expected[0]]], [[expected[1]]])

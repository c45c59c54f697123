"""Auxiliary losses against their formulas, and the aux-loss-free bias update in closed loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.moe import (
  Routing,
  load_balance_loss,
  router_z_loss,
  sequence_balance_loss,
  softmax_topk,
  update_aux_free_bias,
)
from moejax.moe.router import sigmoid_topk


def _routing(ids, probs, logits=None):
  ids = jnp.asarray(ids, jnp.int32)
  probs = jnp.asarray(probs, jnp.float32)
  logits = jnp.log(probs) if logits is None else logits
  return Routing(ids, jnp.ones(ids.shape), jnp.ones(ids.shape, bool), probs, logits)


@pytest.mark.parametrize("e,k", [(4, 1), (8, 2), (16, 4)])
def test_uniform_routing_scores_one_collapsed_scores_more(e, k):
  t = 4 * e
  uniform_ids = [[(i + j) % e for j in range(k)] for i in range(t)]
  uniform = _routing(uniform_ids, np.full((t, e), 1 / e))
  np.testing.assert_allclose(load_balance_loss(uniform), 1.0, rtol=1e-6)
  np.testing.assert_allclose(sequence_balance_loss(uniform, seq_len=e), 1.0, rtol=1e-6)

  # Everything on experts 0..k-1, all probability there.
  p = np.zeros((t, e))
  p[:, :k] = 1 / k
  collapsed = _routing([list(range(k))] * t, p + 1e-12)
  assert float(load_balance_loss(collapsed)) == pytest.approx(e / k, rel=1e-5)
  assert float(sequence_balance_loss(collapsed, seq_len=e)) == pytest.approx(e / k, rel=1e-5)


def _np_switch_loss(ids, probs, e):
  t, k = ids.shape
  f = np.zeros(e)
  for row in ids:
    for j in row:
      f[j] += 1
  f /= t * k
  return e * np.sum(f * probs.mean(0))


def test_load_balance_loss_matches_formula_and_gradient_flows_to_probs():
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(32, 8)), jnp.float32)
  r = softmax_topk(logits, top_k=2)
  expected = _np_switch_loss(np.asarray(r.expert_ids), np.asarray(r.probs, np.float64), 8)
  np.testing.assert_allclose(load_balance_loss(r), expected, rtol=1e-6)
  g = jax.grad(lambda z: load_balance_loss(softmax_topk(z, top_k=2)))(logits)
  assert np.abs(np.asarray(g)).max() > 0


def test_load_balance_loss_times_k_equals_transformers():
  torch = pytest.importorskip("torch")
  mixtral = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(2 * 16, 8)).astype(np.float32)
  ours = float(load_balance_loss(softmax_topk(jnp.asarray(logits), top_k=2)))
  theirs = mixtral.load_balancing_loss_func((torch.from_numpy(logits),), num_experts=8, top_k=2)
  np.testing.assert_allclose(2 * ours, float(theirs), rtol=1e-5)


def test_sequence_balance_loss_matches_deepseek_v3_formula():
  rng = np.random.default_rng(2)
  b, s, e, k = 3, 10, 8, 3
  logits = jnp.asarray(rng.normal(size=(b * s, e)), jnp.float32)
  r = sigmoid_topk(logits, top_k=k)
  ids = np.asarray(r.expert_ids).reshape(b, s, k)
  scores = np.asarray(r.probs, np.float64).reshape(b, s, e)
  losses = []
  for i in range(b):
    f = np.array([e / (k * s) * sum(j in ids[i, t] for t in range(s)) for j in range(e)])
    p = (scores[i] / scores[i].sum(-1, keepdims=True)).mean(0)
    losses.append(np.sum(f * p))
  np.testing.assert_allclose(sequence_balance_loss(r, seq_len=s), np.mean(losses), rtol=1e-6)


def test_z_loss_matches_formula():
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(16, 8)) * 3
  r = softmax_topk(jnp.asarray(logits, jnp.float32), top_k=2)
  lse = np.log(np.exp(logits).sum(-1))
  np.testing.assert_allclose(router_z_loss(r), np.mean(lse**2), rtol=1e-5)
  # Padding tokens are left out.
  mask = jnp.asarray(np.arange(16) < 10)
  np.testing.assert_allclose(router_z_loss(r, mask), np.mean(lse[:10] ** 2), rtol=1e-5)


def test_padding_is_left_out_of_load_balance_loss():
  rng = np.random.default_rng(4)
  logits = jnp.asarray(rng.normal(size=(20, 4)), jnp.float32)
  r = softmax_topk(logits, top_k=2)
  mask = jnp.asarray(np.arange(20) < 12)
  r12 = softmax_topk(logits[:12], top_k=2)
  np.testing.assert_allclose(load_balance_loss(r, mask), load_balance_loss(r12), rtol=1e-6)


def test_bias_update_direction():
  bias = update_aux_free_bias(jnp.zeros(4), jnp.array([9.0, 1.0, 5.0, 5.0]), rate=0.1)
  np.testing.assert_allclose(bias, [-0.1, 0.1, 0.0, 0.0])


@pytest.mark.parametrize("router", ["sigmoid", "softmax"])
def test_bias_update_balances_a_skewed_router_over_steps(router):
  rng = np.random.default_rng(5)
  e, t, k = 8, 256, 2
  # A router that strongly prefers the first experts.
  logits = jnp.asarray(rng.normal(size=(t, e)) + np.linspace(3.0, 0.0, e), jnp.float32)

  def load(bias):
    if router == "sigmoid":
      r = sigmoid_topk(logits, top_k=k, bias=bias)
    else:
      r = softmax_topk(logits, top_k=k, bias=bias)
    return jnp.bincount(r.expert_ids.reshape(-1), length=e).astype(jnp.float32)

  def imbalance(counts):
    return float(counts.max() / counts.mean())

  bias = jnp.zeros(e)
  start = imbalance(load(bias))
  history = []
  for _ in range(300):
    counts = load(bias)
    history.append(imbalance(counts))
    bias = update_aux_free_bias(bias, counts, rate=0.003)
  assert start > 2.0
  assert np.mean(history[-50:]) < 1.2
  # Overloaded experts ended with the lowest bias.
  assert float(bias[0]) < float(bias[-1])

"""An imported checkpoint is an ordinary moejax model: it shards over a mesh with expert parallelism
(same logits as transformers) and trains (an AdamW step lowers its loss on a batch)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from moejax import sharding
from moejax.interop import load_hf
from moejax.models import lm_loss
from tests.interop.test_hf import assert_logits_close, hf_logits, saved, tokens  # noqa: F401

pytest.importorskip("torch")


@pytest.mark.parametrize("name", ["mixtral", "deepseek_v3"])
def test_imported_model_runs_expert_parallel_on_a_mesh(name, saved):  # noqa: F811
  directory, hf = saved(name)
  model, config = load_hf(directory)
  toks = tokens(hf.config.vocab_size)
  graphdef, state = nnx.split(model)
  mesh = sharding.make_mesh({"data": 2, "expert": 4})
  with jax.set_mesh(mesh), sharding.use_rules(sharding.LOGICAL_RULES):
    state = jax.device_put(state, sharding.state_shardings(state, mesh))
    x = jax.device_put(jnp.asarray(toks), sharding.batch_sharding(mesh))
    logits, aux = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))(state, x)
  assert aux["device_load"].shape[-1] == 8  # the MoE layers really ran expert parallel
  assert_logits_close(np.asarray(logits), hf_logits(hf, toks))


def test_imported_model_trains(saved):  # noqa: F811
  directory, hf = saved("qwen2_moe")
  model, _ = load_hf(directory)
  model.train()
  toks = jnp.asarray(tokens(hf.config.vocab_size))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = optax.adamw(1e-2)
  opt_state = tx.init(params)

  def loss_fn(params):
    logits, aux = nnx.merge(graphdef, params, rest)(toks[:, :-1])
    loss, _ = lm_loss(logits, toks[:, 1:])
    return loss + aux["aux_loss"], loss

  @jax.jit
  def step(params, opt_state):
    (_, loss), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  losses = []
  for _ in range(4):
    params, opt_state, loss = step(params, opt_state)
    losses.append(float(loss))
  assert np.isfinite(losses).all() and losses[-1] < losses[0] - 0.1, losses

"""An imported checkpoint is an ordinary moejax model: it shards over a mesh with expert parallelism
(same logits as transformers), trains (AdamW steps lower its loss), and the training CLI starts from
it (`config.train.init_from_hf`)."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from moejax import sharding
from moejax.interop import load_hf
from moejax.models import lm_loss
from moejax.train.trainer import load_run
from tests.interop.test_hf import (  # noqa: F401  (saved: a fixture)
  T,
  _randomize,
  assert_logits_close,
  hf_logits,
  params,
  saved,
  tokens,
)

pytest.importorskip("torch")


@pytest.mark.parametrize("name", ["mixtral", pytest.param("deepseek_v3", marks=pytest.mark.slow)])
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


@pytest.mark.slow  # a CLI training run
def test_train_cli_starts_from_a_hf_checkpoint(tmp_path):
  """`--config.train.init_from_hf=DIR`: the run trains the checkpoint's model; with a zero learning
  rate its saved parameters are exactly the checkpoint's."""
  config = T.MixtralConfig(
    vocab_size=300,  # >= the byte tokenizer's 264
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_local_experts=4,
  )
  hf = T.AutoModelForCausalLM.from_config(config)
  _randomize(hf)
  hf.save_pretrained(tmp_path / "hf")
  repo = Path(__file__).resolve().parents[2]
  env = dict(os.environ, XLA_FLAGS="--xla_cpu_parallel_codegen_split_count=1", JAX_PLATFORMS="cpu")
  env["MOEJAX_CACHE"] = str(tmp_path / "cache")
  cmd = [
    sys.executable,
    "-m",
    "moejax.train",
    f"--config={repo / 'experiments' / 'mixtral.py'}:tiny",
    f"--workdir={tmp_path / 'run'}",
    f"--config.train.init_from_hf={tmp_path / 'hf'}",
    "--config.train.steps=2",
    "--config.train.learning_rate=0.0",
    "--config.train.batch_size=4",
    "--config.train.seq_len=16",
    "--config.train.eval_batches=1",
    "--config.train.progress_bar=False",
    "--config.train.plots=False",
    "--config.data.max_bytes=200000",
  ]
  out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  trained, model_config, _ = load_run(tmp_path / "run")
  loaded, loaded_config = load_hf(tmp_path / "hf")
  assert model_config == loaded_config
  got, want = params(trained), params(loaded)
  assert got.keys() == want.keys()
  for name in want:
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)

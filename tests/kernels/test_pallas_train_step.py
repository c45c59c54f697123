"""One training step of a tiny MoE LM with each Pallas grouped-matmul backend, in interpret mode on
CPU, equals the same step on the `xla` backend (ragged_dot): the loss, the gradient (its norm and
every parameter after the AdamW step, which reads the gradient) and the routing statistics.

The tiles are the backends' (8, 128)-sized small ones: the model is tiny (D=128, F=128, E=4), so
the interpreter's per-tile loop stays short.
"""

import jax
import numpy as np
import pytest

from moejax import sharding
from moejax.testing import tiny_batch, tiny_experiment_config
from moejax.train.trainer import Trainer, build_model_config

VOCAB = 264
PALLAS = {
  "pallas_tpu": (("interpret", True), ("tk", 128), ("tm", 8), ("tn", 128)),
  "pallas_gpu": (("bk", 32), ("bm", 16), ("bn", 32), ("interpret", True)),
}


def _step(backend: str, options=()):
  config = tiny_experiment_config(
    {
      "model.d_model": 128,
      "model.num_heads": 2,
      "model.moe.expert_hidden_dim": 128,
      "model.moe.gmm_backend": backend,
      "model.moe.gmm_options": tuple(options),
      "train.batch_size": 2,
      "train.seq_len": 16,
    }
  )
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  trainer = Trainer(config, build_model_config(config, VOCAB), mesh)
  params, rest, opt_state = trainer.init()
  batch = tiny_batch(batch=2, seq_len=16, vocab_size=VOCAB)
  params, _, _, metrics = trainer.train_step(params, rest, opt_state, batch)
  return jax.device_get(params), jax.device_get(metrics)


@pytest.fixture(scope="module")
def xla_step():
  return _step("xla")


@pytest.mark.slow
@pytest.mark.parametrize("backend", sorted(PALLAS))
def test_a_training_step_with_a_pallas_backend_equals_xla(backend, xla_step):
  params, metrics = _step(backend, PALLAS[backend])
  ref_params, ref = xla_step
  np.testing.assert_allclose(metrics["loss"], ref["loss"], rtol=1e-6)
  np.testing.assert_allclose(metrics["grad_norm"], ref["grad_norm"], rtol=1e-5)
  np.testing.assert_allclose(metrics["expert_load"], ref["expert_load"], rtol=0, atol=0)
  for (path, a), b in zip(
    jax.tree.leaves_with_path(params), jax.tree.leaves(ref_params), strict=True
  ):
    # One AdamW step moves each weight by about the learning rate; the two backends' gradients
    # differ by float32 rounding only, so the weights agree to well inside that step.
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6, err_msg=jax.tree_util.keystr(path))

"""moejax.testing: the shared tiny configs build, keep their documented shapes and take overrides."""

import ml_collections
import numpy as np
import pytest

from moejax import testing


def test_tiny_moe_and_model_configs():
  moe = testing.tiny_moe_config(router="sigmoid")
  assert (moe.d_model, moe.num_experts, moe.top_k, moe.expert_hidden_dim) == (32, 4, 2, 16)
  assert moe.router == "sigmoid"
  model = testing.tiny_model_config()
  assert (model.vocab_size, model.d_model, model.num_layers) == (64, 32, 2)
  assert model.moe == testing.tiny_moe_config() and model.moe_layers == (1,)
  wide = testing.tiny_model_config(d_model=48, num_heads=4)
  assert wide.moe.d_model == 48  # the default MoE layer follows d_model
  assert testing.tiny_model_config(moe=None).moe_layers == ()


def test_tiny_experiment_config_is_locked_and_takes_dotted_overrides():
  config = testing.tiny_experiment_config({"train.steps": 6, "model.moe.router": "sigmoid"})
  assert config.train.steps == 6 and config.model.moe.router == "sigmoid"
  assert config.model.d_model == 32 and config.train.progress_bar is False
  with pytest.raises(AttributeError, match="stpes"):
    config.train.stpes = 3
  with pytest.raises(AttributeError, match="stpes"):
    testing.tiny_experiment_config({"train.stpes": 3})
  unlocked = testing.tiny_experiment_config(lock=False)
  unlocked.train.extra = 1  # an unlocked config takes new fields
  assert isinstance(unlocked, ml_collections.ConfigDict)


def test_experiment_flags_and_tiny_batch():
  assert testing.experiment_flags({"train.steps": 6, "train.plots": False}) == [
    "--config.train.steps=6",
    "--config.train.plots=False",
  ]
  batch = testing.tiny_batch(batch=3, seq_len=5, vocab_size=10, seed=1)
  assert {k: v.shape for k, v in batch.items()} == {
    k: (3, 5) for k in ("inputs", "targets", "mask")
  }
  np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
  assert batch["inputs"].dtype == np.int32 and batch["inputs"].max() < 10

"""Tiny real models for tests and notebooks: the smallest configs that still take every code path.

Tests build their models from these instead of each re-declaring its own shapes, so a shape change
is made once and the tiny sizes stay the ones CPU tests are tuned for (XLA:CPU compiles these in
about a second; the 2-core CI machine runs hundreds of them). Big configs are checked with
`jax.eval_shape` / `nnx.eval_shape` instead, which allocates nothing.

    moe = tiny_moe_config(router="sigmoid")              # D=32, E=4, K=2, F=16
    model_config = tiny_model_config(num_layers=3)       # V=64, D=32, H=4 (2 kv), layer 0 dense
    config = tiny_experiment_config({"train.steps": 6})  # an experiment ConfigDict for the trainer
    batch = tiny_batch(batch=2, seq_len=8)               # {"inputs", "targets", "mask"}

The command-line form of the same experiment, for tests that run `python -m moejax.train`:
`experiment_flags(TINY_EXPERIMENT)` (on top of `experiments/mixtral.py:tiny`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import ml_collections
import numpy as np

from moejax.models.config import ModelConfig
from moejax.moe.config import MoEConfig
from moejax.train.config import base_config

# The tiny MoE layer: D=32, E=4, K=2, F=16.
TINY_MOE = dict(d_model=32, num_experts=4, top_k=2, expert_hidden_dim=16)
# The tiny decoder: V=64, D=32, L=2, H=4 query and 2 key/value heads (GQA), dense FFN width 48.
TINY_MODEL = dict(
  vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, dense_hidden_dim=48
)
# An experiment config shrunk to a few seconds per run on a CPU: dotted paths into `base_config()`
# (or into an experiment file's `tiny` variant, through `experiment_flags`).
TINY_EXPERIMENT = {
  "model.num_layers": 2,
  "model.d_model": 32,
  "model.num_heads": 2,
  "model.num_kv_heads": 2,
  "model.dense_hidden_dim": 64,
  "model.moe.expert_hidden_dim": 32,
  "model.moe.num_experts": 4,
  "train.batch_size": 8,
  "train.seq_len": 32,
  "train.log_every": 1,
  "train.eval_batches": 2,
  "train.progress_bar": False,
  "data.max_bytes": 400_000,
}


def tiny_moe_config(**overrides: Any) -> MoEConfig:
  """`MoEConfig(d_model=32, num_experts=4, top_k=2, expert_hidden_dim=16)`, fields overridable."""
  return MoEConfig(**{**TINY_MOE, **overrides})


def tiny_model_config(**overrides: Any) -> ModelConfig:
  """A two-layer tiny LM (TINY_MODEL), fields overridable.

  Without a `moe` override, layer 0 is dense and the rest are `tiny_moe_config()` MoE layers
  (`first_k_dense=1`); `moe=None` gives a dense model and `moe=<MoEConfig>` yours (with
  ModelConfig's own `first_k_dense` default, 0, unless given).
  """
  fields = {**TINY_MODEL, **overrides}
  if "moe" not in overrides:
    fields["moe"] = tiny_moe_config(d_model=fields["d_model"])
    fields.setdefault("first_k_dense", 1)
  return ModelConfig(**fields)


def _set(config: ml_collections.ConfigDict, path: str, value: Any) -> None:
  *parents, leaf = path.split(".")
  node = config
  for name in parents:
    node = getattr(node, name)
  setattr(node, leaf, value)  # AttributeError with a "did you mean" on a locked config


def tiny_experiment_config(
  overrides: Mapping[str, Any] | None = None, *, lock: bool = True
) -> ml_collections.ConfigDict:
  """`moejax.train.config.base_config()` shrunk by TINY_EXPERIMENT for a few CPU steps.

  Four steps, an evaluation, a checkpoint and no plots at the end, unscanned layers (faster to
  compile for two layers). `overrides` maps dotted paths to values (`{"train.steps": 6,
  "model.moe.router": "sigmoid"}`), applied last, to a locked config, so a misspelt path fails
  with a hint; `lock=False` unlocks the result for adding fields.
  """
  config = base_config()
  config.lock()
  config.model.scan_layers = False
  config.train.update(steps=4, eval_every=4, checkpoint_every=4, plots=False)
  for path, value in {**TINY_EXPERIMENT, **(overrides or {})}.items():
    _set(config, path, value)
  if not lock:
    config.unlock()
  return config


def experiment_flags(overrides: Mapping[str, Any]) -> list[str]:
  """`{"train.steps": 6}` -> `["--config.train.steps=6"]`: the same overrides on the command line."""
  return [f"--config.{path}={value}" for path, value in overrides.items()]


def tiny_batch(
  batch: int = 2, seq_len: int = 8, *, vocab_size: int = TINY_MODEL["vocab_size"], seed: int = 0
) -> dict[str, np.ndarray]:
  """A training batch of random tokens in the trainer's format (numpy, int32 tokens).

  `inputs` and `targets` [B, S] are one sequence shifted by a token; `mask` [B, S] is all ones.
  """
  tokens = np.random.default_rng(seed).integers(0, vocab_size, (batch, seq_len + 1), np.int32)
  return {
    "inputs": tokens[:, :-1],
    "targets": tokens[:, 1:],
    "mask": np.ones((batch, seq_len), np.float32),
  }

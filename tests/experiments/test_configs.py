"""Every experiment file and variant loads, is locked, and builds its model under eval_shape."""

import importlib.util
from pathlib import Path

import jax
import pytest
from flax import nnx

from moejax.models import Transformer
from moejax.train.trainer import build_model_config

EXPERIMENTS = sorted((Path(__file__).resolve().parents[2] / "experiments").glob("*.py"))
BYTE_VOCAB = 264


def _load(path):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


CASES = [(p, v) for p in EXPERIMENTS for v in _load(p).VARIANTS]


def test_every_experiment_file_is_covered():
  assert {p.stem for p, _ in CASES} >= {"mixtral", "switch", "deepseekmoe"}
  assert all(("tiny" in _load(p).VARIANTS) for p in EXPERIMENTS)


@pytest.mark.parametrize("path,variant", CASES, ids=[f"{p.stem}:{v}" for p, v in CASES])
def test_config_loads_and_model_builds_abstractly(path, variant):
  module = _load(path)
  assert module.__doc__ and "python -m moejax.train" in module.__doc__
  config = module.get_config(variant)
  with pytest.raises(AttributeError):
    config.train.not_a_field = 1  # locked: typos fail
  for field in (
    "steps",
    "batch_size",
    "seq_len",
    "learning_rate",
    "checkpoint_every",
    "eval_every",
    "seed",
  ):
    assert field in config.train
  model_config = build_model_config(config, BYTE_VOCAB)
  model = nnx.eval_shape(lambda: Transformer(model_config, rngs=nnx.Rngs(0)))
  params = nnx.state(model, nnx.Param)
  leaves = jax.tree.leaves(params)
  assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
  n_params = sum(x.size for x in leaves)
  assert n_params > 0


def test_variant_arg_parsing():
  module = _load(EXPERIMENTS[0])
  with pytest.raises(ValueError, match="unknown variant"):
    module.get_config("variant=colossal")
  with pytest.raises(ValueError):
    module.get_config("no_such_flag=3")

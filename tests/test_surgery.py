"""Checkpoint surgery: canonical values are layout-free, `fill` inverts `canonical`, and a run starts
from another run (`init_from=run:DIR`) or from a surgery function (`init_from=module:function`)."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from moejax import surgery
from moejax.models import Transformer, stack_layers
from moejax.testing import tiny_experiment_config, tiny_model_config
from moejax.train.trainer import load_run, train_and_evaluate


def _model(seed=0, **kw):
  return Transformer(tiny_model_config(**kw), rngs=nnx.Rngs(seed))


def test_canonical_values_do_not_depend_on_the_layout():
  unscanned = _model(num_layers=4, first_k_dense=1)
  config = unscanned.config.replace(scan_layers=True)
  scanned = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(1)))
  nnx.update(scanned, stack_layers(nnx.state(unscanned), config))
  a, b = surgery.canonical(unscanned), surgery.canonical(scanned)
  assert a.keys() == b.keys() and "blocks.3.moe.experts.w_up" in a
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_fill_inverts_canonical_in_both_layouts():
  for scan in (False, True):
    source = _model(num_layers=4, first_k_dense=1, scan_layers=scan)
    target = _model(1, num_layers=4, first_k_dense=1, scan_layers=scan)
    values = surgery.canonical(source)
    assert any(not np.array_equal(values[k], v) for k, v in surgery.canonical(target).items())
    surgery.fill(target, values)
    for k, v in surgery.canonical(target).items():
      np.testing.assert_array_equal(v, values[k], err_msg=k)


def test_fill_names_what_does_not_fit():
  model = _model()
  values = surgery.canonical(model)
  with pytest.raises(ValueError, match=r"none for \['blocks.1.moe.experts.w_up'\]"):
    surgery.fill(model, {k: v for k, v in values.items() if k != "blocks.1.moe.experts.w_up"})
  bad = dict(values, **{"blocks.1.moe.experts.w_up": values["blocks.1.moe.experts.w_up"][:1]})
  with pytest.raises(ValueError, match=r"blocks.1.moe.experts.w_up has shape \(1,"):
    surgery.fill(model, bad)
  # Not strict: only what is given changes.
  partial = {"final_norm.scale": np.full_like(values["final_norm.scale"], 2.0)}
  surgery.fill(model, partial, strict=False)
  np.testing.assert_array_equal(surgery.canonical(model)["final_norm.scale"], 2.0)


def test_init_kind_reads_prefixes_and_directories(tmp_path):
  (tmp_path / "hf").mkdir()
  (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "mixtral"}))
  (tmp_path / "run").mkdir()
  assert surgery.init_kind(f"hf:{tmp_path}") == ("hf", str(tmp_path))
  assert surgery.init_kind(str(tmp_path / "hf")) == ("hf", str(tmp_path / "hf"))
  assert surgery.init_kind(str(tmp_path / "run")) == ("run", str(tmp_path / "run"))
  assert surgery.init_kind("tests.test_surgery:upcycle") == (
    "function",
    "tests.test_surgery:upcycle",
  )
  with pytest.raises(ValueError, match="init_from='nowhere'"):
    surgery.init_kind("nowhere")


def upcycle(values, config):
  """A surgery function (sparse upcycling, Komatsuzaki et al. 2023): every expert of every MoE
  layer starts as a copy of expert 0, and the router starts at zero (uniform routing)."""
  out = dict(values)
  for name, value in values.items():
    if ".moe.experts." in name:
      out[name] = np.broadcast_to(value[:1], value.shape).copy()
    if name.endswith(".moe.router.kernel"):
      out[name] = np.zeros_like(value)
  return out


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("first")
  train_and_evaluate(tiny_experiment_config({"train.steps": 2}), workdir)
  return workdir


def _initial(workdir, config):
  """The canonical values a run of `config` starts from (a zero learning rate keeps them)."""
  train_and_evaluate(config, workdir)
  model, _, _ = load_run(workdir)
  return surgery.canonical(model)


# The tests that use `first_run` train it and then start a second run from it (~50 s on 2 cores):
# slow tier. The surgery function test below is the fast tier's init_from check.
@pytest.mark.slow
def test_a_run_starts_from_another_run(tmp_path, first_run):
  config = tiny_experiment_config(
    {"train.steps": 1, "train.learning_rate": 0.0, "train.init_from": f"run:{first_run}"}
  )
  got = _initial(tmp_path / "second", config)
  model, _, _ = load_run(first_run)
  want = surgery.canonical(model)
  assert got.keys() == want.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_a_run_starts_from_a_surgery_function(tmp_path):
  config = tiny_experiment_config(
    {"train.steps": 1, "train.learning_rate": 0.0, "train.init_from": "tests.test_surgery:upcycle"}
  )
  got = _initial(tmp_path / "upcycled", config)
  w = got["blocks.0.moe.experts.w_up"]  # [E, D, F]
  assert np.abs(w[0]).max() > 0
  for e in range(1, w.shape[0]):
    np.testing.assert_array_equal(w[e], w[0])
  np.testing.assert_array_equal(got["blocks.1.moe.router.kernel"], 0.0)


@pytest.mark.slow
def test_init_from_a_run_of_another_shape_fails_naming_the_paths(tmp_path, first_run):
  config = tiny_experiment_config(
    {"train.steps": 1, "model.moe.num_experts": 2, "train.init_from": f"run:{first_run}"}
  )
  with pytest.raises(ValueError, match=r"does not fit the model: .*wrong shapes"):
    train_and_evaluate(config, tmp_path / "bad")


def test_canonical_of_a_jitted_state_is_on_the_host():
  values = surgery.canonical(_model())
  assert all(isinstance(v, np.ndarray) for v in values.values())
  assert not any(isinstance(v, jax.Array) for v in values.values())

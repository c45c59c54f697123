"""A heterogeneous MoE model from an experiment config, end to end: MoE layers with 8, 6 and 4
experts and a dense layer build from experiments/hetero.py, train with the real trainer, resume from
a checkpoint to the very same run, and their routing read-out (`moejax.analysis.capture_routing`)
equals the routing each layer's router computes from the layer's captured input."""

import importlib.util
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax import sharding
from moejax.analysis import capture_routing, moe_layer
from moejax.models import Transformer, unstack_layers
from moejax.train.checkpoint import Checkpointer
from moejax.train.trainer import build_model_config, load_run, train_and_evaluate

EXPERIMENT = Path(__file__).resolve().parents[2] / "experiments" / "hetero.py"
VOCAB = 264  # the byte tokenizer's


def _config(variant="tiny", steps=4):
  spec = importlib.util.spec_from_file_location("hetero", EXPERIMENT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(variant)
  # The real config, shrunk: a few seconds per step on a CPU.
  m = config.model
  m.update(d_model=32, num_heads=2, num_kv_heads=2, dense_hidden_dim=64)
  m.moe.expert_hidden_dim = 32
  m.moe.aux_free_bias = True  # every layer's bias moves by its own layer's counts
  config.train.update(
    steps=steps,
    batch_size=8,
    seq_len=32,
    log_every=1,
    eval_every=2,
    eval_batches=2,
    checkpoint_every=2,
    progress_bar=False,
  )
  config.data.max_bytes = 400_000
  return config


@pytest.fixture
def one_device(monkeypatch, tmp_path):
  """Runs the trainer on one CPU device, as the command line does (the test process has 8)."""
  make_mesh = sharding.make_mesh
  monkeypatch.setattr(
    sharding, "make_mesh", lambda mesh, devices=None: make_mesh(mesh, jax.devices()[:1])
  )
  monkeypatch.setenv("MOEJAX_CACHE", str(tmp_path / "cache"))


def _records(workdir):
  return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def _flat(state):
  return {".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(state)}


class _Interrupted(Exception):
  pass


@pytest.mark.slow  # three short trainings: ~90 s on 2 cores
def test_hetero_builds_trains_resumes_exactly_and_reads_out_routing(
  tmp_path, monkeypatch, one_device
):
  config = _config()
  model_config = build_model_config(config, VOCAB)
  assert model_config.moe_layers == (0, 2, 3)
  assert model_config.moe_num_experts == (8, 6, 4) and not model_config.is_moe_layer(1)

  # 4 steps in one go, and a run interrupted after its step-2 checkpoint, then resumed to 4 (the
  # same config: the learning-rate schedule spans train.steps).
  ref, run = tmp_path / "ref", tmp_path / "run"
  train_and_evaluate(_config(steps=4), ref)
  with monkeypatch.context() as patch:
    save = Checkpointer.save

    def save_then_stop(self, step, *args, **kwargs):
      save(self, step, *args, **kwargs)
      if step == 2:
        self.close()
        raise _Interrupted

    patch.setattr(Checkpointer, "save", save_then_stop)
    with pytest.raises(_Interrupted):
      train_and_evaluate(_config(steps=4), run)
  assert sorted(r["step"] for r in _records(run) if "loss" in r) == [1, 2]
  train_and_evaluate(_config(steps=4), run)
  ref_records, run_records = _records(ref), _records(run)
  losses = lambda records, key: {r["step"]: r[key] for r in records if key in r}
  assert sorted(losses(ref_records, "loss")) == [1, 2, 3, 4]
  assert losses(run_records, "loss") == losses(ref_records, "loss")
  assert losses(run_records, "eval_loss") == losses(ref_records, "eval_loss")
  trained, _, _ = load_run(ref)
  resumed, _, _ = load_run(run)
  a, b = _flat(nnx.state(trained)), _flat(nnx.state(resumed))
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(b[k], a[k], err_msg=k)

  # Each layer's own experts: parameters, aux-free bias, and the padded per-expert metrics.
  for layer, e in zip((0, 2, 3), (8, 6, 4), strict=True):
    assert a[f"blocks.{layer}.moe.router.kernel"].shape == (32, e)
    bias = a[f"blocks.{layer}.moe.router.aux_free_bias"]
    assert bias.shape == (e,) and np.abs(bias).max() > 0
  last = [r for r in ref_records if "loss" in r][-1]
  load = np.asarray(last["expert_load"])
  assert load.shape == (3, 8)
  np.testing.assert_allclose(load.sum(axis=-1), 1.0, rtol=1e-6)
  assert not load[1, 6:].any() and not load[2, 4:].any()
  assert len(last["load_imbalance"]) == 3 and min(last["load_imbalance"]) >= 1.0
  assert ref_records[0]["step"] == 0 and ref_records[0]["moe_num_experts"] == [8, 6, 4]
  assert (ref / "plots" / "expert_load.png").stat().st_size > 1000

  # The routing read-out of the trained model.
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (2, 16)), jnp.int32)
  _check_read_out(trained, tokens)


def _check_read_out(model, tokens):
  """capture_routing returns [T, K] ids per MoE layer equal to the routing recomputed from each
  layer's captured input by that layer's router; returns the captures."""
  c = model.config
  captures = capture_routing(model, tokens, capture_io=True)
  assert [cap.layer for cap in captures] == list(c.moe_layers)
  t, d = tokens.size, c.d_model
  for cap, e in zip(captures, c.moe_num_experts, strict=True):
    ids = np.asarray(cap.routing.expert_ids)
    assert ids.shape == (t, c.layer_moe(cap.layer).top_k) and ids.min() >= 0 and ids.max() < e
    assert cap.routing.probs.shape == (t, e) and cap.inputs.shape == cap.outputs.shape == (2, 16, d)
    moe = moe_layer(model, cap.layer)
    recomputed = moe.router(cap.inputs.reshape(t, d))
    np.testing.assert_array_equal(ids, np.asarray(recomputed.expert_ids), err_msg=cap.layer)
    y, _ = moe(cap.inputs)
    np.testing.assert_allclose(cap.outputs, y, rtol=1e-5, atol=1e-6, err_msg=cap.layer)
  # Without capture_io: the same routing, no activations.
  plain = capture_routing(model, tokens)
  for cap, full in zip(plain, captures, strict=True):
    assert cap.inputs is None and cap.outputs is None
    np.testing.assert_array_equal(cap.routing.expert_ids, full.routing.expert_ids)
  return captures


def test_hetero_scanned_read_out_matches_unscanned():
  # Dense | (MoE 8, MoE 4) x 2 scanned | MoE 6.
  model_config = build_model_config(_config("repeat"), VOCAB)
  assert model_config.scan_layers and model_config.moe_num_experts == (8, 4, 8, 4, 6)
  scanned = Transformer(model_config, rngs=nnx.Rngs(0))
  scanned.eval()
  assert len(scanned.prefix_blocks) == 1 and len(scanned.scanned_blocks) == 2
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, VOCAB, (2, 16)), jnp.int32)
  captures = _check_read_out(scanned, tokens)
  # The unscanned model holding the same variables routes every layer the same way.
  flat_config = model_config.replace(scan_layers=False)
  unscanned = nnx.eval_shape(lambda: Transformer(flat_config, rngs=nnx.Rngs(0)))
  nnx.update(unscanned, unstack_layers(nnx.state(scanned), model_config))
  unscanned.eval()
  for cap, ref in zip(captures, capture_routing(unscanned, tokens, capture_io=True), strict=True):
    assert cap.layer == ref.layer
    np.testing.assert_array_equal(cap.routing.expert_ids, ref.routing.expert_ids)
    np.testing.assert_allclose(cap.inputs, ref.inputs, rtol=1e-5, atol=1e-6)

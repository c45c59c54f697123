"""plot_run and load_heatmap_data on metrics written by the real MetricsWriter."""

import numpy as np
import pytest

from moejax.train import plots
from moejax.train.metrics import MetricsWriter, read_metrics
from moejax.train.plots import load_heatmap_data, plot_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _fake_run(workdir, num_steps=12, num_layers=2, num_experts=4):
  """A run whose expert 0 of each layer slowly takes over; counts, not fractions, as load."""
  with MetricsWriter(workdir, total_steps=num_steps, progress_bar=False, tensorboard=False) as w:
    for step in range(1, num_steps + 1):
      metrics = {"loss": 5.0 / step}
      if num_layers:
        load = np.ones((num_layers, num_experts))
        load[:, 0] += step
        metrics["expert_load"] = load
      w.write(step, metrics)
      if step % 4 == 0:
        w.write(step, {"eval_loss": 6.0 / step})


def _assert_png(path):
  assert path.read_bytes()[:8] == PNG_MAGIC
  assert path.stat().st_size > 5_000


def test_plot_run_writes_loss_and_expert_load(tmp_path):
  _fake_run(tmp_path)
  paths = plot_run(tmp_path)
  assert paths == [tmp_path / "plots" / "loss.png", tmp_path / "plots" / "expert_load.png"]
  for path in paths:
    _assert_png(path)


def test_plot_run_dense_model_plots_only_loss(tmp_path):
  _fake_run(tmp_path, num_layers=0)
  assert plot_run(tmp_path, log_y=True) == [tmp_path / "plots" / "loss.png"]
  _assert_png(tmp_path / "plots" / "loss.png")


def test_plot_run_caps_layers(tmp_path, monkeypatch):
  monkeypatch.setattr(plots, "MAX_HEATMAP_LAYERS", 2)  # Drawing 8 subplots takes seconds.
  _fake_run(tmp_path, num_steps=3, num_layers=5, num_experts=3)
  (_, path) = plot_run(tmp_path)
  _assert_png(path)


def test_plot_run_without_metrics_writes_nothing(tmp_path):
  assert plot_run(tmp_path) == []


def test_load_heatmap_data_normalises_counts(tmp_path):
  _fake_run(tmp_path, num_steps=5, num_layers=2, num_experts=4)
  steps, load = load_heatmap_data(read_metrics(tmp_path))
  np.testing.assert_array_equal(steps, [1, 2, 3, 4, 5])
  assert load.shape == (5, 2, 4)
  np.testing.assert_allclose(load.sum(-1), 1.0)
  np.testing.assert_allclose(load[0, 1], [2 / 5, 1 / 5, 1 / 5, 1 / 5])


def test_load_heatmap_data_dense_and_mismatched():
  steps, load = load_heatmap_data([{"step": 1, "loss": 1.0}, {"step": 2, "expert_load": []}])
  assert steps.shape == (0,) and load.shape == (0, 0, 0)
  records = [{"step": 1, "expert_load": [[1.0, 0.0]]}, {"step": 2, "expert_load": [[1.0, 0, 0]]}]
  with pytest.raises(ValueError, match="changes shape"):
    load_heatmap_data(records)


def test_plot_run_per_layer_experts(tmp_path):
  # MoE layers of 8, 6 and 4 experts: expert_load rows zero-padded to 8, the E_l logged at step 0.
  experts = [8, 6, 4]
  with MetricsWriter(tmp_path, total_steps=3, progress_bar=False, tensorboard=False) as w:
    w.write(0, {"eval_loss": 6.0, "moe_num_experts": experts})
    for step in range(1, 4):
      load = np.zeros((3, 8))
      for row, e in enumerate(experts):
        load[row, :e] = 1.0 / e
      w.write(step, {"loss": 5.0 / step, "expert_load": load})
  records = read_metrics(tmp_path)
  np.testing.assert_array_equal(plots.layer_num_experts(records, 3, 8), experts)
  # Without the record every row counts as the full width.
  np.testing.assert_array_equal(plots.layer_num_experts(records[1:], 3, 8), [8, 8, 8])
  (_, path) = plot_run(tmp_path)
  _assert_png(path)

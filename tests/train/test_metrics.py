"""MetricsWriter: the jsonl record, resume truncation, array conversion, TensorBoard and the bar."""

import json
import struct

import jax.numpy as jnp
import numpy as np
import pytest

from moejax.train.metrics import MetricsWriter, read_metrics, to_json_value


def _writer(workdir, **kwargs):
  kwargs = {"total_steps": 100, "progress_bar": False, "tensorboard": False, **kwargs}
  return MetricsWriter(workdir, **kwargs)


def _write_steps(workdir, steps, eval_every=5, **kwargs):
  with _writer(workdir, **kwargs) as writer:
    for step in steps:
      writer.write(step, {"loss": 10.0 - step})
      if step % eval_every == 0:
        writer.write(step, {"eval_loss": 11.0 - step})


def test_to_json_value_converts_scalars_and_arrays():
  assert to_json_value("a", 3) == 3.0 and isinstance(to_json_value("a", 3), float)
  assert to_json_value("a", True) == 1.0
  assert to_json_value("a", np.float32(0.5)) == 0.5
  assert to_json_value("a", jnp.asarray(2.5, jnp.bfloat16)) == 2.5
  assert to_json_value("a", np.int64(7)) == 7.0
  # ndim >= 1 stays a list even with one element: a per-layer metric of a one-layer model.
  assert to_json_value("a", np.asarray([0.25])) == [0.25]
  assert to_json_value("a", jnp.arange(3)) == [0.0, 1.0, 2.0]
  assert to_json_value("a", jnp.eye(2)) == [[1.0, 0.0], [0.0, 1.0]]
  assert to_json_value("a", (1, 2)) == [1.0, 2.0]
  assert to_json_value("a", "warmup") == "warmup"


def test_to_json_value_rejects_other_types():
  with pytest.raises(TypeError, match="'cfg'.*dict"):
    to_json_value("cfg", {"a": 1})
  with pytest.raises(TypeError, match="'names'.*dtype"):
    to_json_value("names", np.asarray(["a", "b"]))


def test_write_appends_flushed_json_lines(tmp_path):
  load = jnp.asarray([[0.5, 0.25, 0.25, 0.0], [0.25, 0.25, 0.25, 0.25]])
  with _writer(tmp_path) as writer:
    writer.write(1, {"loss": jnp.asarray(3.5), "grad_norm": np.float32(1.5), "lr": 1e-3})
    # Visible before close: a crash loses nothing already written.
    first = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert first == {"step": 1, "loss": 3.5, "grad_norm": 1.5, "lr": 1e-3}
    writer.write(2, {"expert_load": load, "load_imbalance": np.asarray([2.0, 1.0])})
    writer.write(2, {"eval_loss": 3.25, "eval_perplexity": float(np.exp(3.25))})
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert len(lines) == 3
  records = read_metrics(tmp_path)
  assert records[1] == {"step": 2, "expert_load": load.tolist(), "load_imbalance": [2.0, 1.0]}
  assert records[2]["eval_loss"] == 3.25
  assert read_metrics(tmp_path / "metrics.jsonl") == records


def test_write_rejects_step_in_metrics(tmp_path):
  with _writer(tmp_path) as writer, pytest.raises(ValueError, match="'step'"):
    writer.write(1, {"step": 1})


def test_non_finite_values_round_trip(tmp_path):
  with _writer(tmp_path) as writer:
    writer.write(1, {"loss": float("nan"), "grad_norm": np.inf})
  (record,) = read_metrics(tmp_path)
  assert np.isnan(record["loss"]) and record["grad_norm"] == np.inf


def test_resume_drops_lines_after_start_step(tmp_path):
  _write_steps(tmp_path, range(1, 13))  # Killed at step 12; last checkpoint at step 10.
  _write_steps(tmp_path, range(11, 16), start_step=10)
  records = read_metrics(tmp_path)
  train = [r["step"] for r in records if "loss" in r]
  evals = [r["step"] for r in records if "eval_loss" in r]
  assert train == list(range(1, 16))
  assert evals == [5, 10, 15]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # No temp file left.


def test_fresh_start_clears_an_old_file(tmp_path):
  _write_steps(tmp_path, range(0, 4))  # A run killed before its first checkpoint.
  _write_steps(tmp_path, range(0, 2))
  assert [r["step"] for r in read_metrics(tmp_path) if "loss" in r] == [0, 1]


def test_resume_with_nothing_to_drop_keeps_the_file(tmp_path):
  _write_steps(tmp_path, range(1, 11))
  before = (tmp_path / "metrics.jsonl").stat().st_ino
  _writer(tmp_path, start_step=10).close()
  assert (tmp_path / "metrics.jsonl").stat().st_ino == before
  assert len(read_metrics(tmp_path)) == 12


def test_truncated_last_line_is_skipped(tmp_path):
  _write_steps(tmp_path, range(1, 4))
  with (tmp_path / "metrics.jsonl").open("a") as f:
    f.write('{"step": 4, "lo')
  with pytest.warns(UserWarning, match="truncated last line"):
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
  with pytest.warns(UserWarning, match="truncated last line"):
    _write_steps(tmp_path, [4], start_step=3)
  assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4]


def test_read_metrics_of_missing_file_is_empty(tmp_path):
  assert read_metrics(tmp_path) == []


def _read_tfrecords(path):
  """Events of a TensorBoard event file (TFRecord framing: length, crc, data, crc)."""
  from tensorboardX.proto import event_pb2

  data, events, offset = path.read_bytes(), [], 0
  while offset < len(data):
    (length,) = struct.unpack("<Q", data[offset : offset + 8])
    events.append(event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length]))
    offset += 12 + length + 4
  return events


def test_tensorboard_scalars(tmp_path):
  with _writer(tmp_path, tensorboard=True) as writer:
    writer.write(3, {"loss": 2.0, "load_imbalance": [1.5, 1.25], "expert_load": np.ones((2, 4))})
  (event_file,) = (tmp_path / "tensorboard").iterdir()
  assert event_file.name.startswith("events.out.tfevents")
  scalars = {
    (v.tag, e.step): v.simple_value for e in _read_tfrecords(event_file) for v in e.summary.value
  }
  assert scalars == {
    ("loss", 3): 2.0,
    ("load_imbalance/layer_0", 3): 1.5,
    ("load_imbalance/layer_1", 3): 1.25,
  }


def test_progress_bar_shows_postfix(tmp_path, capsys):
  with _writer(tmp_path, progress_bar=True, start_step=0, total_steps=4) as writer:
    writer.update(2, {"loss": "ignored"})
    writer.update(4, {"loss": 3.14159, "tok/s": 123456.0})
  err = capsys.readouterr().err
  assert "4/4" in err and "loss=3.1416" in err and "tok/s=1.23e+05" in err

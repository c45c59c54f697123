"""Smoke test of bench/moe_layer.py: its `main` runs end to end on tiny shapes and writes its rows."""

import importlib.util
import json
import pathlib

import pytest

_BENCH = pathlib.Path(__file__).resolve().parents[2] / "bench" / "moe_layer.py"
_HAS_HF = all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers"))
_TINY = ["--tokens", "64", "--d-model", "16", "--hidden", "32", "--experts", "4"]
_TINY += ["--repeats", "1", "--warmup", "0"]
_SETTINGS = ("tokens", "d_model", "hidden", "top_k", "dispatch", "backend", "threads", "repeats")
_TIMES = ("moejax_ms", "dense_ms", "capacity_ms") + (("hf_ms", "torch_dense_ms") if _HAS_HF else ())


def _load_bench():
  """bench/ is a folder of scripts, not a package: load the file itself."""
  spec = importlib.util.spec_from_file_location("bench_moe_layer", _BENCH)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_main_writes_rows(tmp_path, capsys):
  out = tmp_path / "rows.json"
  returned = _load_bench().main(_TINY + ["--out", str(out)] + ([] if _HAS_HF else ["--skip-hf"]))

  rows = json.loads(out.read_text())
  assert rows == returned
  assert [row["E"] for row in rows] == [4]
  (row,) = rows
  for key in ("E", "moejax_ms", "dense_ms", "hf_ms", "capacity_ms", *_SETTINGS):
    assert key in row, key
  assert (row["tokens"], row["d_model"], row["hidden"], row["top_k"]) == (64, 16, 32, 2)
  for key in _TIMES:
    assert row[key] > 0, key
  assert row["moejax_over_dense"] == pytest.approx(row["moejax_ms"] / row["dense_ms"])
  if _HAS_HF:
    # Same weights, so the same routing: transformers' Mixtral block computes the same function.
    assert row["hf_max_abs_diff"] < 1e-5
  else:
    assert row["hf_ms"] is None
  assert "| E | moejax_ms | dense_ms | hf_ms |" in capsys.readouterr().out

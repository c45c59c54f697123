"""Smoke test of bench/train_step.py: its `main` runs end to end on a shrunken tiny config."""

import importlib.util
import json
import pathlib

import pytest

_BENCH = pathlib.Path(__file__).resolve().parents[2] / "bench" / "train_step.py"
_HAS_HF = all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers"))
# One layer of the tiny config; batch 16: its two micro-batches of 8 rows split over the 8 CPU
# devices of tests/conftest.py.
_TINY = ["--configs", "experiments/mixtral.py:tiny", "--set", "model.num_layers=1"]
_TINY += ["--batch-size", "16", "--seq-len", "16", "--repeats", "1", "--warmup", "0"]
_SIDES = ("moejax",) + (("hf",) if _HAS_HF else ())


def _load_bench():
  """bench/ is a folder of scripts, not a package: load the file itself."""
  spec = importlib.util.spec_from_file_location("bench_train_step", _BENCH)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.slow  # benchmark smoke test: train steps compiled and timed
def test_main_writes_rows(tmp_path, capsys):
  out = tmp_path / "rows.json"
  returned = _load_bench().main(_TINY + ["--out", str(out)] + ([] if _HAS_HF else ["--skip-hf"]))

  rows = json.loads(out.read_text())
  assert rows == returned
  (row,) = rows
  assert row["config"] == "mixtral:tiny"
  assert (row["batch"], row["seq_len"], row["tokens_per_step"]) == (16, 16, 256)
  assert not row["batch_reduced"]
  assert row["overrides"] == ["model.num_layers=1"]
  for side in _SIDES:
    assert row[f"{side}_ms"] > 0, side
    assert row[f"{side}_params"] > 0, side
    assert row[f"{side}_tokens_per_s"] == pytest.approx(256 / row[f"{side}_ms"] * 1e3)
    # Random tokens over V = 264: the loss of a freshly initialised model is near ln(264) = 5.58.
    assert 4.0 < row[f"{side}_lm_loss"] < 7.0, side
  if _HAS_HF:
    # The same shapes give the same parameters, one for one.
    assert row["hf_params"] == row["moejax_params"]
    assert row["moejax_over_hf"] == pytest.approx(
      row["moejax_tokens_per_s"] / row["hf_tokens_per_s"]
    )
    assert row["hf_attention"] == "sdpa"
  else:
    assert row["hf_tokens_per_s"] is None
  assert "| config | batch | seq | model | params moejax | params hf |" in capsys.readouterr().out


def test_batch_shrinks_to_max_tokens():
  bench = _load_bench()
  config = bench.load_config("experiments/mixtral.py:variant=small")  # 64 x 512
  assert bench.step_shapes(config, None, None, 4096) == (8, 512, True)
  assert bench.step_shapes(config, None, None, 0) == (64, 512, False)
  assert bench.step_shapes(config, 4, 128, 4096) == (4, 128, False)


def test_bad_override_names_the_field():
  bench = _load_bench()
  config = bench.load_config("experiments/mixtral.py:tiny")
  with pytest.raises(KeyError, match="model.num_layerz"):
    bench.apply_overrides(config, ["model.num_layerz=1"])

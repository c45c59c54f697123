"""Smoke tests of bench/moe_layer.py: its `main` runs end to end on tiny shapes, writes its rows and
its time-vs-E plot."""

import importlib.util
import json
import math
import pathlib

import pytest

_BENCH = pathlib.Path(__file__).resolve().parents[2] / "bench" / "moe_layer.py"
_HAS_HF = all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers"))
_TINY = ["--tokens", "64", "--d-model", "16", "--hidden", "32", "--repeats", "1", "--warmup", "0"]
_SKIP_HF = [] if _HAS_HF else ["--skip-hf"]
_SETTINGS = ("tokens", "d_model", "hidden", "top_k", "dispatch", "backend", "threads", "repeats")
_TIMES = ("moejax_ms", "dense_ms", "capacity_ms") + (("hf_ms", "torch_dense_ms") if _HAS_HF else ())
_PEAKS = ("moejax_peak_mib", "dense_peak_mib", "capacity_peak_mib")
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _load_bench():
  """bench/ is a folder of scripts, not a package: load the file itself."""
  spec = importlib.util.spec_from_file_location("bench_moe_layer", _BENCH)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _assert_png(path: pathlib.Path) -> None:
  assert path.is_file(), path
  data = path.read_bytes()
  assert data.startswith(_PNG_MAGIC) and len(data) > 1000, (path, len(data))


@pytest.mark.slow  # eight layer compiles (2 dtypes x 2 E x dropless/capacity) and PyTorch: ~1 min
def test_main_writes_rows_and_plot(tmp_path, capsys):
  out = tmp_path / "rows.json"
  returned = _load_bench().main(_TINY + ["--experts", "4,8", "--out", str(out)] + _SKIP_HF)

  rows = json.loads(out.read_text())
  assert rows == returned
  assert [(row["dtype"], row["E"]) for row in rows] == [
    ("float32", 4),
    ("float32", 8),
    ("bfloat16", 4),
    ("bfloat16", 8),
  ]
  for row in rows:
    for key in ("E", "dtype", "moejax_ms", "dense_ms", "hf_ms", "capacity_ms", *_SETTINGS):
      assert key in row, key
    assert (row["tokens"], row["d_model"], row["hidden"], row["top_k"]) == (64, 16, 32, 2)
    for key in _TIMES + _PEAKS:
      assert row[key] > 0, (row["dtype"], row["E"], key)
    assert row["moejax_over_dense"] == pytest.approx(row["moejax_ms"] / row["dense_ms"])
    assert row["moejax_peak_over_dense_peak"] == pytest.approx(
      row["moejax_peak_mib"] / row["dense_peak_mib"]
    )
    if not _HAS_HF:
      assert row["hf_ms"] is None and row["hf_max_abs_diff"] is None
    elif row["dtype"] == "float32":
      # Same weights, so the same routing: transformers' Mixtral block computes the same function.
      assert row["hf_max_abs_diff"] < 1e-5
    else:
      # bfloat16: Mixtral's bfloat16 router logits may break a near-tie another way (docstring).
      assert math.isfinite(row["hf_max_abs_diff"])
  # More experts at the same active FLOPs: more parameters and gradients live in the step. (Not
  # bfloat16 < float32: at these tiny shapes the float32 router math and int32 dispatch indices
  # outweigh the halved parameters.)
  by_key = {(row["dtype"], row["E"]): row for row in rows}
  for dtype in ("float32", "bfloat16"):
    assert by_key[dtype, 8]["moejax_peak_mib"] > by_key[dtype, 4]["moejax_peak_mib"]

  printed = capsys.readouterr()
  assert "| E | dtype | moejax_ms | dense_ms | hf_ms |" in printed.out
  assert "float32, bfloat16, T=64 D=16 F=32 top-2" in printed.out
  _assert_png(tmp_path / "rows.png")  # the plot defaults to --out's path with .png
  assert str(tmp_path / "rows.png") in printed.err


@pytest.mark.slow  # benchmark smoke test
def test_main_plot_none_one_dtype(tmp_path, capsys):
  out = tmp_path / "rows.json"
  argv = _TINY + ["--experts", "4", "--dtypes", "bfloat16", "--skip-hf", "--skip-capacity"]
  (row,) = _load_bench().main(argv + ["--out", str(out), "--plot", "none"])

  assert json.loads(out.read_text()) == [row]
  assert list(tmp_path.iterdir()) == [out]  # no PNG
  assert (row["E"], row["dtype"]) == (4, "bfloat16")
  assert row["moejax_peak_mib"] > 0 and row["dense_peak_mib"] > 0
  assert row["capacity_ms"] is None and row["capacity_peak_mib"] is None
  assert "plot:" not in capsys.readouterr().err


def test_plot_scaling_draws_every_dtype(tmp_path):
  """The plot alone, on made-up rows: skipped columns (None) are left out, E need not be sorted."""
  rows = [
    {
      "E": e,
      "dtype": dtype,
      "moejax_ms": 1.0 + e / 64,
      "dense_ms": 1.0,
      "hf_ms": None if dtype == "bfloat16" else 2.0 + e / 16,
      "capacity_ms": None,
      "torch_dense_ms": None if dtype == "bfloat16" else 1.5,
      "tokens": 64,
      "d_model": 16,
      "hidden": 32,
      "top_k": 2,
      "dispatch": "dropless",
      "capacity_factor": 1.0,
      "hf_experts": "grouped_mm",
      "platform": "cpu",
      "threads": 2,
    }
    for dtype in ("float32", "bfloat16")
    for e in (256, 8, 32)
  ]
  path = tmp_path / "sub" / "scaling.png"
  _load_bench().plot_scaling(rows, path)
  _assert_png(path)


def test_parse_args_plot_and_dtypes():
  parse = _load_bench().parse_args
  assert parse([]).experts == "8,32,128,256"
  assert parse([]).dtypes == ["float32", "bfloat16"]
  assert parse([]).plot is None  # no --out, no plot unless asked
  assert parse(["--out", "r/x.json"]).plot == "r/x.png"
  assert parse(["--out", "r/x.json", "--plot", "p.png"]).plot == "p.png"
  assert parse(["--out", "r/x.json", "--plot", "none"]).plot is None
  assert parse([]).isolate and not parse(["--no-isolate"]).isolate  # a process per row by default
  with pytest.raises(SystemExit):
    parse(["--dtypes", "float16"])

"""Smoke test of bench/ep.py: its `main` runs end to end on tiny shapes and writes its rows."""

import importlib.util
import json
import pathlib

import pytest

_BENCH = pathlib.Path(__file__).resolve().parents[2] / "bench" / "ep.py"
_MESHES = "data=2,expert=4;data=2,expert=2,tensor=2"
_TINY = ["--tokens", "64", "--d-model", "16", "--hidden", "16", "--experts", "8"]
_TINY += ["--meshes", _MESHES, "--skew", "--repeats", "1", "--warmup", "0"]
_KEYS = (
  "mesh", "E", "tokens", "d_model", "hidden", "top_k", "dispatch", "llep", "step_ms",
  "a2a_bytes_per_step", "max_device_load", "mean_device_load", "device_imbalance",
  "native_max_device_load", "y_max_abs_diff", "y_max_rel_diff", "grad_max_rel_diff",
)  # fmt: skip
RTOL = 1e-5


def _load_bench():
  """bench/ is a folder of scripts, not a package: load the file itself."""
  spec = importlib.util.spec_from_file_location("bench_ep", _BENCH)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.slow  # benchmark smoke test: the layer compiled on several meshes
def test_main_writes_rows(tmp_path, capsys):
  out = tmp_path / "rows.json"
  returned = _load_bench().main(_TINY + ["--out", str(out)])

  rows = json.loads(out.read_text())
  assert rows == returned
  assert [(row["mesh"], row["llep"]) for row in rows] == [
    ("single", False),
    ("data2xexpert4", False),
    ("data2xexpert4", True),
    ("data2xexpert2xtensor2", False),
    ("data2xexpert2xtensor2", True),
  ]
  for row in rows:
    for key in _KEYS:
      assert key in row, key
    shapes = (row["E"], row["tokens"], row["d_model"], row["hidden"], row["top_k"])
    assert shapes == (8, 64, 16, 16, 2)
    assert row["step_ms"] > 0
    # Every mesh computes the single-device layer's function, forward and backward.
    assert row["y_max_rel_diff"] <= RTOL and row["grad_max_rel_diff"] <= RTOL, row["mesh"]
    assert sum(row["device_load"]) == 64 * 2  # every copy computed once (dropless)
    imbalance = row["max_device_load"] / row["mean_device_load"]
    assert row["device_imbalance"] == pytest.approx(imbalance)
  assert rows[0]["a2a_bytes_per_step"] == 0 and rows[0]["y_max_abs_diff"] == 0
  for ep, llep in (rows[1:3], rows[3:5]):
    assert ep["a2a_bytes_per_step"] > 0
    assert llep["native_device_load"] == ep["device_load"]  # the same routing
    assert llep["max_device_load"] <= ep["max_device_load"]
  # --skew sends most copies to the first EP device; LLEP spills them to the others.
  assert rows[1]["device_imbalance"] > 2.0
  assert rows[2]["max_device_load"] < rows[1]["max_device_load"]
  printed = capsys.readouterr().out
  assert "| mesh | llep | step_ms | a2a MiB/step | max load |" in printed
  assert "| data2xexpert4 | True |" in printed


def test_meshes_flag_is_checked():
  bench = _load_bench()
  assert bench.parse_meshes("data=2,expert=4; data=8") == [dict(data=2, expert=4), dict(data=8)]
  assert bench.mesh_label(dict(data=2, fsdp=2, expert=2)) == "data2xfsdp2xexpert2"
  with pytest.raises(ValueError, match="uses 4 devices"):
    bench.parse_meshes("data=2,expert=2")
  with pytest.raises(ValueError, match="'pipe=8'"):
    bench.parse_meshes("pipe=8")

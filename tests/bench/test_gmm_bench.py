"""Smoke tests of bench/gmm.py: on CPU its `main` prints the correctness table (Pallas backends in
interpret mode and xla against a float64 loop) and the lowering table (pallas_tpu for tpu,
pallas_gpu for cuda); its accelerator table's code runs on CPU with the xla backend."""

import importlib.util
import json
import pathlib

import pytest

_BENCH = pathlib.Path(__file__).resolve().parents[2] / "bench" / "gmm.py"
_BACKENDS = ("pallas_tpu", "pallas_gpu", "xla")
_OPS = ("gmm", "gmm_transpose_rhs", "tgmm")


def _load_bench():
  """bench/ is a folder of scripts, not a package: load the file itself."""
  spec = importlib.util.spec_from_file_location("bench_gmm", _BENCH)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.slow  # six interpret-mode forward+backward compiles and six lowerings: ~10 s
def test_cpu_tables_mixtral(tmp_path, capsys):
  out = tmp_path / "rows.json"
  rows = _load_bench().main(["--shapes", "mixtral", "--out", str(out)])
  assert json.loads(out.read_text()) == rows

  correct = [r for r in rows if r["table"] == "correctness"]
  assert [(r["dtype"], r["backend"]) for r in correct] == [
    (dtype, backend) for dtype in ("float32", "bfloat16") for backend in _BACKENDS
  ]
  for r in correct:
    assert r["shape"] == "mixtral" and (r["M"], r["D"], r["F"], r["E"]) == (64, 64, 224, 8)
    assert r["group_sizes"][1] == 0 and r["group_sizes"][-1] == 0  # empty groups
    assert sum(r["group_sizes"]) < r["M"]  # rows past the groups
    assert r["past_groups_zero"]
    tol = 1e-5 if r["dtype"] == "float32" else 2.0**-7  # bf16: output rounding of f32 sums
    for op in ("fwd", "dlhs", "drhs"):
      assert 0 <= r[f"{op}_err"] < tol, (r["dtype"], r["backend"], op, r[f"{op}_err"])

  lowered = [r for r in rows if r["table"] == "lowering"]
  assert [(r["backend"], r["platform"], r["op"]) for r in lowered] == [
    (backend, platform, op)
    for backend, platform in (("pallas_tpu", "tpu"), ("pallas_gpu", "cuda"))
    for op in _OPS
  ]
  for r in lowered:
    assert r["lowered"] and r["error"] is None, r
    assert (r["M"], r["D"], r["F"], r["E"]) == (4096 * 2, 4096, 14336, 8)
    assert r["seconds"] > 0

  printed = capsys.readouterr().out
  assert "| mixtral | float32 | pallas_tpu | interpret |" in printed
  assert "| mixtral | pallas_gpu | cuda | tgmm |" in printed
  assert "Timings need an accelerator" in printed


def test_accelerator_table_code_on_cpu(monkeypatch, tmp_path, capsys):
  """The timing path at a tiny shape, with the xla backend standing in for the platform's."""
  bench = _load_bench()
  monkeypatch.setattr(bench, "SHAPES", {"tiny": bench.Shape(d=32, f=48, e=4, top_k=2)})
  monkeypatch.setitem(bench.PLATFORM_BACKENDS, "cpu", ("xla",))
  out = tmp_path / "rows.json"
  argv = ["--tokens", "16", "--repeats", "2", "--warmup", "0", "--peak-tflops", "1"]
  rows = bench.main(argv + ["--out", str(out)])

  assert json.loads(out.read_text()) == rows
  assert [(r["dtype"], r["op"], r["backend"]) for r in rows] == [
    (dtype, op, backend)
    for dtype in ("float32", "bfloat16")
    for op in ("fwd", "dlhs", "drhs")
    for backend in ("dense", "xla")
  ]
  for r in rows:
    assert r["M"] == 32 and r["ms"] > 0
    assert r["tflops"] == pytest.approx(2 * 32 * 32 * 48 / (r["ms"] * 1e-3) / 1e12)
    assert r["mfu"] == pytest.approx(r["tflops"])  # peak 1 TFLOP/s
    assert r["over_xla"] is None if r["backend"] == "dense" else r["over_xla"] == 1.0
  assert "| tiny | float32 | fwd | dense |" in capsys.readouterr().out


def test_routed_group_sizes():
  bench = _load_bench()
  sizes = bench.routed_group_sizes(4096, 256, 8, seed=0)
  assert sizes.sum() == 4096 * 8 and sizes.max() <= 4096  # distinct experts per token
  assert sizes.max() > 4 * sizes.mean()  # skewed
  assert (bench.routed_group_sizes(4096, 256, 8, seed=0) == sizes).all()  # seeded
  empty = bench.routed_group_sizes(28, 8, 2, seed=1, empty=(1, 7))
  assert empty[1] == empty[7] == 0 and empty.sum() == 56

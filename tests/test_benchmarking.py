"""moejax.benchmarking's timers, on a fake clock."""

import pytest

from moejax import benchmarking


def test_time_interleaved_warms_each_then_takes_turns(monkeypatch):
  clock = [0.0]
  monkeypatch.setattr(benchmarking.time, "perf_counter", lambda: clock[0])
  calls = []

  def fn(name, seconds):
    def run():
      calls.append(name)
      clock[0] += seconds.pop(0) if isinstance(seconds, list) else seconds

    return run

  # "a" slows down over time (a drifting machine); "b" always takes 5 ms.
  a_times = [1.0, 1.0] + [0.002, 0.003, 0.010]
  ms = benchmarking.time_interleaved(
    {"a": fn("a", a_times), "b": fn("b", 0.005)}, repeats=3, warmup=1
  )
  assert calls == ["a", "a", "b", "b"] + ["a", "b"] * 3  # first + warm-up each, then turns
  assert ms.keys() == {"a", "b"}
  assert abs(ms["a"] - 3.0) < 1e-9 and abs(ms["b"] - 5.0) < 1e-9  # medians, in ms


def test_time_interleaved_lead_calls_precede_each_timed_call(monkeypatch):
  clock = [0.0]
  monkeypatch.setattr(benchmarking.time, "perf_counter", lambda: clock[0])
  calls = []

  def fn(name, lead_seconds, timed_seconds):
    count = [0]

    def run():
      calls.append(name)
      count[0] += 1
      # first call, then alternately a lead call and a timed call
      clock[0] += lead_seconds if count[0] == 1 or count[0] % 2 == 0 else timed_seconds

    return run

  ms = benchmarking.time_interleaved(
    {"a": fn("a", 1.0, 0.002), "b": fn("b", 1.0, 0.004)}, repeats=2, warmup=0, lead=1
  )
  assert calls == ["a", "b"] + ["a", "a", "b", "b"] * 2  # first each, then lead + timed per turn
  assert abs(ms["a"] - 2.0) < 1e-9 and abs(ms["b"] - 4.0) < 1e-9  # the lead calls are not timed


@pytest.mark.parametrize(
  ("field", "value", "allowed"),
  [("repeats", 0, ">= 1"), ("warmup", -1, ">= 0"), ("lead", -1, ">= 0"), ("lead", 1.5, ">= 0")],
)
def test_time_interleaved_rejects_bad_counts(field, value, allowed):
  counts = {"repeats": 1, "warmup": 0, "lead": 0, field: value}
  with pytest.raises(ValueError, match=rf"{field}={value!r}; allowed: an int {allowed}"):
    benchmarking.time_interleaved({"a": lambda: None}, **counts)

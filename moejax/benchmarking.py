"""Small helpers shared by the benchmarks in bench/: timing, thread counts, markdown tables.

Speed goals live in benchmarks run by hand (bench/*.py print a table and write JSON), never in
timed test assertions.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any


def cpu_count() -> int:
  """The cores this process may run on: the size of XLA:CPU's intra-op thread pool."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return os.cpu_count() or 1


def cpu_name() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def time_call(fn: Callable[[], Any], *, repeats: int, warmup: int) -> tuple[float, Any]:
  """(median wall time of `fn()` in milliseconds, the last call's result).

  `fn` must block until its results are ready. The first call (compilation for a jitted step) and
  `warmup` more calls are not timed. Only the latest result is kept alive: holding every call's
  outputs would grow memory by one step's outputs per call (at E=128 an MoE layer's weight
  gradients alone are 805 MB) and make every call fault in fresh pages, which the timings would
  then include.
  """
  result = None
  for _ in range(1 + warmup):
    result = None  # freed before the next call allocates its outputs
    result = fn()
  times = []
  for _ in range(repeats):
    result = None
    start = time.perf_counter()
    result = fn()
    times.append((time.perf_counter() - start) * 1e3)
  return statistics.median(times), result


def keep_latest(step: Callable[[], Any]) -> tuple[Callable[[], None], Callable[[], Any]]:
  """(run, latest): `run()` calls `step()` and keeps only its return value, dropping the previous
  one before the call (see `time_call`); `latest()` is that value."""
  kept = [None]

  def run():
    kept[0] = None  # freed before the next call allocates its outputs
    kept[0] = step()

  return run, lambda: kept[0]


def time_interleaved(
  fns: Mapping[str, Callable[[], Any]], *, repeats: int, warmup: int, lead: int = 0
) -> dict[str, float]:
  """{name: median wall time of fns[name]() in ms}, the calls of all `fns` taken in turns.

  Each function's first call and `warmup` more are not timed; then every round times one call of
  each, in order. A shared machine whose speed drifts (a VM on a busy host: 20-30% within an hour
  on ours) then slows every contender alike, where timing one after the other would credit the
  drift to whichever ran in the faster stretch. `fns` must block until their results are ready and
  keep only their latest result alive (see `time_call`).

  With `lead` > 0, each turn first makes `lead` untimed calls, so that the timed call follows a
  call of its own, as it does in a loop of it (a training run), and not the previous contender's.
  What a call leaves behind is then charged to its own function: PyTorch's OpenMP workers spin
  for a while after its last parallel region, on the cores the next call needs (the Mixtral tiny
  train step, moejax: 230 ms right after a transformers step, 217 right after one of its own;
  transformers: 278 and 274).
  """
  for name, value in (("repeats", repeats), ("warmup", warmup), ("lead", lead)):
    if isinstance(value, bool) or not isinstance(value, int) or value < (name == "repeats"):
      allowed = "an int >= 1" if name == "repeats" else "an int >= 0"
      raise ValueError(f"time_interleaved: {name}={value!r}; allowed: {allowed}")
  for fn in fns.values():
    for _ in range(1 + warmup):
      fn()
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      for _ in range(lead):
        fn()
      start = time.perf_counter()
      fn()
      times[name].append((time.perf_counter() - start) * 1e3)
  return {name: statistics.median(t) for name, t in times.items()}


@contextlib.contextmanager
def torch_threads(threads: int):
  """Runs PyTorch's intra-op pool with `threads` threads, then restores the previous setting."""
  import torch

  previous = torch.get_num_threads()
  torch.set_num_threads(threads)
  try:
    yield
  finally:
    torch.set_num_threads(previous)


def markdown_table(
  rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]], header: str
) -> str:
  """`header`, a blank line, then a markdown table; columns are (title, row key, format spec)."""

  def cell(v: Any, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)

  lines = [header, ""]
  lines.append("| " + " | ".join(title for title, _, _ in columns) + " |")
  lines.append("|" + "---|" * len(columns))
  for row in rows:
    lines.append("| " + " | ".join(cell(row[key], fmt) for _, key, fmt in columns) + " |")
  return "\n".join(lines)


def write_rows(path: str | None, rows: Sequence[dict[str, Any]]) -> None:
  """Writes a benchmark's rows as a JSON list to `path` (creating its folder); None writes nothing."""
  if not path:
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as fh:
    json.dump(list(rows), fh, indent=2)

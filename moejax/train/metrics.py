"""Training metrics: one JSON line per write in `workdir/metrics.jsonl`, TensorBoard scalars, a bar.

`metrics.jsonl` is the record of a run that plots and notebooks read. Each line is one call to
`MetricsWriter.write`: `{"step": 100, "loss": 3.1, "expert_load": [[...], ...], ...}`. Training and
evaluation lines are told apart by their keys (`loss` vs `eval_loss`), so a step may have one line of
each kind. Values are floats, or nested lists of floats for arrays (`expert_load` is [L_moe, E],
`load_imbalance` is [L_moe]). A diverged run writes `NaN`/`Infinity`, which Python's `json` reads back
but strict JSON parsers reject.

Several processes (`jax.distributed`): only process 0 writes the file, TensorBoard and the bar; on
the others the writer checks and converts what it is given, then drops it. Every process must still
fetch the metrics (they are global arrays) and call the writer the same way.

Resuming: a run killed after its last checkpoint at step S has already written lines for steps > S,
and the resumed run writes them again. Opening the writer with `start_step=S` drops those lines first,
so the file holds one line per step and kind; a fresh run (`start_step=0`) starts an empty file.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import tqdm

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"

JsonValue = float | str | list


def to_json_value(name: str, value: Any) -> JsonValue:
  """Converts one metric to what `metrics.jsonl` stores.

  Python and numpy scalars and 0-d numpy/jax arrays become floats; arrays with ndim >= 1 become nested
  lists of floats, even with a single element, so a per-layer metric of a one-layer model keeps its
  shape; strings pass through.

  Args:
    name: the metric's name, for the error message.
    value: the metric.

  Returns:
    A float, a string, or a (nested) list of floats.

  Raises:
    TypeError: for values that are neither numbers, arrays nor strings.
  """
  if isinstance(value, str):
    return value
  if isinstance(value, bool | int | float | np.generic):
    return float(value)
  if hasattr(value, "__array__") or isinstance(value, list | tuple):
    array = np.asarray(value)
    if array.dtype.kind in "OSUMm":  # Objects, strings, dates: not metrics. (bfloat16 is kind "V".)
      raise TypeError(f"Metric {name!r}: expected a numeric array, got dtype {array.dtype}.")
    array = array.astype(np.float64)
    return float(array) if array.ndim == 0 else array.tolist()
  raise TypeError(
    f"Metric {name!r}: expected a number, a numpy/jax array or a string, got {type(value).__name__}."
  )


def read_metrics(workdir: str | os.PathLike) -> list[dict[str, Any]]:
  """Loads `workdir/metrics.jsonl` (or a .jsonl path given directly) as a list of dicts.

  A last line cut short by a crash is skipped with a warning; a missing file reads as no records.
  """
  path = Path(workdir)
  if path.is_dir():
    path = path / METRICS_FILE
  if not path.exists():
    return []
  return _parse_lines(path.read_text().splitlines(), path)


def _parse_lines(lines: list[str], path: Path) -> list[dict[str, Any]]:
  records = []
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError as e:
      if i != len(lines) - 1:
        raise ValueError(f"{path}:{i + 1}: not a JSON line: {line[:80]!r}") from e
      warnings.warn(
        f"{path}: skipping a truncated last line (the run was killed mid-write).", stacklevel=3
      )
  return records


def _truncate_after(path: Path, start_step: int) -> None:
  """Rewrites `path` atomically, keeping the records a run resumed at `start_step` will not redo."""
  if not path.exists():
    return
  text = path.read_text()
  records = _parse_lines(text.splitlines(), path)
  kept = [r for r in records if start_step > 0 and r["step"] <= start_step]
  if len(kept) == len(text.splitlines()) and (text.endswith("\n") or not text):
    return  # Nothing to drop, not even a line cut short.
  with tempfile.NamedTemporaryFile(
    "w", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False
  ) as f:
    f.writelines(json.dumps(r) + "\n" for r in kept)
    f.flush()
    os.fsync(f.fileno())
  os.chmod(f.name, path.stat().st_mode & 0o777)  # NamedTemporaryFile makes it owner-only.
  os.replace(f.name, path)


def _format_postfix(value: Any) -> str:
  if isinstance(value, str):
    return value
  value = float(value)
  if math.isfinite(value) and abs(value) >= 1e4:
    return f"{value:.3g}"
  return f"{value:.4f}" if abs(value) < 100 else f"{value:.1f}"


class MetricsWriter:
  """Writes a run's metrics to `workdir/metrics.jsonl`, TensorBoard and a tqdm progress bar.

  Usage:
    with MetricsWriter(workdir, total_steps=1000, start_step=step) as writer:
      for step in range(step + 1, 1001):
        ...
        writer.write(step, jax.device_get(metrics))
        writer.update(step, {"loss": metrics["loss"], "tok/s": tokens_per_s})

  TensorBoard gets every scalar as `name`, every 1-D array as `name/layer_i`, and skips 2-D arrays
  (`expert_load`), which live in the jsonl and its plots. A write of a dict of jax arrays fetches each
  array separately: pass `jax.device_get(metrics)` to fetch them in one transfer.
  """

  def __init__(
    self,
    workdir: str | os.PathLike,
    *,
    total_steps: int,
    start_step: int = 0,
    progress_bar: bool = True,
    tensorboard: bool = True,
    primary: bool | None = None,
  ):
    """Opens the run's metrics, dropping lines a resumed run will write again.

    Args:
      workdir: the run directory; created if missing.
      total_steps: the step training stops at, the progress bar's total.
      start_step: the step training resumes from (0 for a fresh run). Lines with a larger step (from a
        run killed after its last checkpoint) are removed; a fresh run removes every line.
      progress_bar: show a tqdm bar on stderr.
      tensorboard: also write scalars to `workdir/tensorboard` (imports tensorboardX, which imports
        torch when it is installed: about 2 s).
      primary: whether this process writes anything. None: only process 0 (`jax.process_index()`);
        the others touch no file and show no bar.
    """
    if primary is None:
      import jax  # Deferred: reading metrics (plots, notebooks) needs no jax.

      primary = jax.process_index() == 0
    self.primary = primary
    self.workdir = Path(workdir)
    self.path = self.workdir / METRICS_FILE
    self._file = None
    self._tb = None
    if primary:
      self.workdir.mkdir(parents=True, exist_ok=True)
      _truncate_after(self.path, start_step)
      self._file = self.path.open("a")
    if tensorboard and primary:
      from tensorboardX import SummaryWriter  # Deferred: the import pulls in torch when installed.

      # purge_step hides events at steps >= purge_step from earlier event files, as the jsonl does.
      self._tb = SummaryWriter(
        str(self.workdir / TENSORBOARD_DIR), purge_step=start_step + 1 if start_step > 0 else 0
      )
    self._bar = tqdm.tqdm(
      total=total_steps,
      initial=start_step,
      disable=not (progress_bar and primary),
      file=sys.stderr,
      unit="step",
      dynamic_ncols=True,
    )

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    """Appends `{"step": step, **metrics}` as one flushed line, and scalars to TensorBoard."""
    if "step" in metrics:
      raise ValueError("metrics must not contain 'step': it is the `step` argument.")
    record = {"step": int(step)}
    record.update((name, to_json_value(name, value)) for name, value in metrics.items())
    if self._file is None:
      return
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    if self._tb is not None:
      for name, value in record.items():
        if name == "step" or isinstance(value, str):
          continue
        if isinstance(value, float):
          self._tb.add_scalar(name, value, step)
        elif value and not isinstance(value[0], list):  # 1-D: one curve per layer.
          for i, v in enumerate(value):
            self._tb.add_scalar(f"{name}/layer_{i}", v, step)

  def update(self, step: int, postfix: Mapping[str, Any] | None = None) -> None:
    """Moves the progress bar to `step` and shows `postfix` (e.g. loss, tokens/s) beside it."""
    if postfix:
      self._bar.set_postfix({k: _format_postfix(v) for k, v in postfix.items()}, refresh=False)
    self._bar.update(step - self._bar.n)

  def flush(self) -> None:
    if self._file is not None:
      self._file.flush()
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    """Flushes and closes the file, TensorBoard writer and bar; safe to call twice."""
    if self._file is not None and not self._file.closed:
      self._file.close()
    if self._tb is not None:
      self._tb.close()
      self._tb = None
    self._bar.close()

  def __enter__(self) -> MetricsWriter:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

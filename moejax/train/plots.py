"""Plots of a run's `metrics.jsonl`: loss curves and per-layer expert-load heatmaps.

    python -c "from moejax.train.plots import plot_run; print(plot_run('runs/quickstart'))"

Figures are drawn with matplotlib's object-oriented API (`Figure`, saved through Agg), so plotting
needs no display and leaves pyplot's global state, and a notebook's backend, alone.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from moejax.train.metrics import read_metrics

PLOTS_DIR = "plots"
MAX_HEATMAP_LAYERS = 8
# Wider heatmaps are subsampled: more columns than this add no visible detail, only drawing time.
MAX_HEATMAP_COLUMNS = 1000


def load_heatmap_data(records: Sequence[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
  """Expert load over training from the records that carry `expert_load`.

  Args:
    records: metrics records, as `read_metrics` returns them.

  Returns:
    steps: [N] int64, the steps of the records with a non-empty `expert_load`, in file order.
    load: [N, L, E] float64, the fraction of each MoE layer's routed tokens sent to each expert (rows
      are normalised to sum to 1, so counts and fractions read the same; uniform is 1/E). Empty
      arrays of shapes [0] and [0, 0, 0] for a dense model.

  Raises:
    ValueError: if the records' `expert_load` shapes differ.
  """
  # A dense model logs an empty `expert_load` (no MoE layers), or none at all.
  rows = [(r["step"], r["expert_load"]) for r in records if r.get("expert_load")]
  if not rows:
    return np.zeros((0,), np.int64), np.zeros((0, 0, 0), np.float64)
  steps = np.asarray([step for step, _ in rows], np.int64)
  try:
    load = np.asarray([np.asarray(x, np.float64).reshape(-1, np.shape(x)[-1]) for _, x in rows])
  except ValueError as e:
    shapes = sorted({np.shape(x) for _, x in rows})
    raise ValueError(f"expert_load changes shape between records: {shapes}") from e
  total = load.sum(axis=-1, keepdims=True)  # [N, L, 1]
  return steps, load / np.where(total > 0, total, 1.0)


def layer_num_experts(records: Sequence[dict[str, Any]], num_layers: int, width: int) -> np.ndarray:
  """[L] experts of each MoE layer: the run's `moe_num_experts` record (written at step 0 by a model
  whose MoE layers have different E; their `expert_load` rows are zero-padded to the widest), else
  `width` for every layer."""
  for r in records:
    if r.get("moe_num_experts") is not None:
      experts = np.asarray(r["moe_num_experts"], np.int64)
      if experts.shape == (num_layers,) and experts.max() <= width:
        return experts
  return np.full((num_layers,), width, np.int64)


def _cell_edges(x: np.ndarray) -> np.ndarray:
  """[N] centres -> [N + 1] edges halfway between them, so uneven step intervals draw correctly."""
  if len(x) == 1:
    return np.asarray([x[0] - 0.5, x[0] + 0.5])
  mid = (x[1:] + x[:-1]) / 2
  return np.concatenate([[2 * x[0] - mid[0]], mid, [2 * x[-1] - mid[-1]]])


def _plot_loss(records: Sequence[dict[str, Any]], path: Path, log_y: bool) -> bool:
  train = [(r["step"], r["loss"]) for r in records if "loss" in r]
  evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
  if not train and not evals:
    return False
  fig = Figure(figsize=(7, 4), layout="constrained")
  ax = fig.add_subplot()
  if train:
    ax.plot(*zip(*train, strict=True), label="train", linewidth=1)
  if evals:
    ax.plot(*zip(*evals, strict=True), "o-", label="eval", markersize=4)
  if log_y:
    ax.set_yscale("log")
  ax.set(xlabel="step", ylabel="loss (nats/token)", title="Loss")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.savefig(path, dpi=120)
  return True


def _plot_expert_load(records: Sequence[dict[str, Any]], path: Path) -> bool:
  steps, load = load_heatmap_data(records)  # [N], [N, L, E]
  if not len(steps):
    return False
  stride = -(-len(steps) // MAX_HEATMAP_COLUMNS)
  steps, load = steps[::stride], load[::stride]
  num_layers, num_experts = load.shape[1:]
  experts = layer_num_experts(records, num_layers, num_experts)  # [L]
  layers = np.unique(np.linspace(0, num_layers - 1, min(num_layers, MAX_HEATMAP_LAYERS)).round())
  layers = layers.astype(int)
  layer_height = min(0.6 + 0.03 * num_experts, 1.6)  # inches
  fig = Figure(figsize=(8, 1.0 + layer_height * len(layers)), layout="constrained")
  axes = fig.subplots(len(layers), 1, sharex=True, squeeze=False)[:, 0]
  x_edges = _cell_edges(steps.astype(np.float64))
  y_edges = np.arange(num_experts + 1) - 0.5
  vmax = float(load[:, layers].max())
  for ax, layer in zip(axes, layers, strict=True):
    e = int(experts[layer])  # the layer's real experts; the padded rows past them are not drawn
    mesh = ax.pcolormesh(
      x_edges, y_edges[: e + 1], load[:, layer, :e].T, vmin=0.0, vmax=vmax, cmap="viridis"
    )
    ax.set_ylim(-0.5, e - 0.5)
    ax.set_ylabel(f"MoE layer {layer}\nexpert" + (f" (E={e})" if e != num_experts else ""))
  axes[-1].set_xlabel("step")
  uniform = "/".join(f"1/{e}" for e in sorted({int(experts[i]) for i in layers}, reverse=True))
  fig.colorbar(mesh, ax=list(axes), label=f"fraction of tokens (uniform = {uniform})")
  title = "Expert load per MoE layer"
  if len(layers) < num_layers:
    title += f" ({len(layers)} of {num_layers} layers shown, evenly spaced)"
  fig.suptitle(title)
  fig.savefig(path, dpi=120)
  return True


def plot_run(workdir: str | os.PathLike, *, log_y: bool = False) -> list[Path]:
  """Writes `plots/loss.png` and, for MoE runs, `plots/expert_load.png` under `workdir`.

  Args:
    workdir: the run directory holding `metrics.jsonl`.
    log_y: draw the loss on a log scale.

  Returns:
    The paths written: none without metrics, no expert-load plot for a dense model.
  """
  records = read_metrics(workdir)
  out = Path(workdir) / PLOTS_DIR
  out.mkdir(parents=True, exist_ok=True)
  written = []
  if _plot_loss(records, out / "loss.png", log_y):
    written.append(out / "loss.png")
  if _plot_expert_load(records, out / "expert_load.png"):
    written.append(out / "expert_load.png")
  return written

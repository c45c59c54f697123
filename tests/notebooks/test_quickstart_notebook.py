"""Executes notebooks/01_quickstart.ipynb on a fake finished run written by the real writers."""

import sys
from pathlib import Path

import ml_collections
import nbformat
import numpy as np
import pytest
from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
from nbclient import NotebookClient

from moejax.train.metrics import MetricsWriter
from moejax.train.run_info import write_run_info

NOTEBOOK = Path(__file__).parents[2] / "notebooks" / "01_quickstart.ipynb"
# jupyter_client runs these argv[0]s as sys.executable, so the kernel sees this environment's moejax.
_SAME_INTERPRETER = {"python", f"python{sys.version_info[0]}", sys.executable}


def _fake_run(workdir, num_steps=20, num_layers=2, num_experts=4):
  config = ml_collections.ConfigDict({"model": {"num_layers": 4, "moe": {"num_experts": 4}}})
  config.train = ml_collections.ConfigDict({"steps": num_steps, "log_every": 1})
  write_run_info(workdir, config)
  rng = np.random.default_rng(0)
  with MetricsWriter(workdir, total_steps=num_steps, progress_bar=False, tensorboard=False) as w:
    w.write(0, {"eval_loss": 6.0, "eval_perplexity": float(np.exp(6.0))})
    for step in range(1, num_steps + 1):
      load = rng.dirichlet(np.ones(num_experts), size=num_layers)  # [L, E]
      w.write(
        step,
        {
          "loss": 6.0 - 0.1 * step,
          "expert_load": load,
          "load_imbalance": load.max(-1) / load.mean(-1),
          "dropped_fraction": 0.01,
        },
      )
      if step % 5 == 0:
        w.write(step, {"eval_loss": 6.1 - 0.1 * step})


def run_notebook(workdir, tmp_path, monkeypatch) -> list:
  """Executes the notebook on the run in `workdir`; returns the code cells' outputs."""
  try:
    spec = KernelSpecManager().get_kernel_spec("python3")
  except NoSuchKernel:
    pytest.fail("no 'python3' Jupyter kernel: `pip install ipykernel` provides it")
  if spec.argv[0] not in _SAME_INTERPRETER:
    pytest.fail(f"the 'python3' kernel spec runs {spec.argv[0]}, not {sys.executable}")
  monkeypatch.setenv("MOEJAX_NOTEBOOK_WORKDIR", str(workdir))
  monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "jupyter_runtime"))
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  client = NotebookClient(
    notebook, kernel_name="python3", timeout=120, resources={"metadata": {"path": str(tmp_path)}}
  )
  client.execute()  # Raises CellExecutionError, with the traceback, if any cell fails.
  outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  return outputs


def test_quickstart_notebook_runs(tmp_path, monkeypatch):
  workdir = tmp_path / "run"
  _fake_run(workdir)
  outputs = run_notebook(workdir, tmp_path, monkeypatch)
  images = [o for o in outputs if "image/png" in o.get("data", {})]
  assert len(images) == 3  # Loss, expert-load heatmaps, load imbalance + dropped fraction.
  text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
  assert "20 training and 5 evaluation records" in text
  assert "[model]" in text and 'moe = {"num_experts": 4}' in text
  assert "revision:" in text

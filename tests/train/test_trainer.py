"""The training job end to end: a short real run, crash + resume equality, bad overrides."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from moejax.testing import TINY_EXPERIMENT, experiment_flags, tiny_experiment_config
from moejax.train.trainer import train_and_evaluate
from tests.notebooks.test_quickstart_notebook import run_notebook

REPO = Path(__file__).resolve().parents[2]

# A shrunken tiny config: the real code path, a few seconds per run.
SMALL = experiment_flags(TINY_EXPERIMENT)


def _env(tmp_path):
  env = dict(os.environ)
  env["MOEJAX_CACHE"] = str(tmp_path / "cache")
  # One CPU device: the run must not depend on the test process's 8 fake devices.
  env["XLA_FLAGS"] = "--xla_cpu_parallel_codegen_split_count=1"
  env["JAX_PLATFORMS"] = "cpu"
  return env


def _cmd(config, workdir, *extra):
  return [
    sys.executable,
    "-m",
    "moejax.train",
    f"--config={REPO / 'experiments' / config}",
    f"--workdir={workdir}",
    *SMALL,
    *extra,
  ]


def _losses(workdir):
  lines = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
  train = {r["step"]: r["loss"] for r in lines if "loss" in r}
  steps = [r["step"] for r in lines if "loss" in r]
  assert len(steps) == len(set(steps)), "a step was logged twice"
  return train, lines


def test_short_run_writes_everything(tmp_path, monkeypatch):
  workdir = tmp_path / "run"
  out = subprocess.run(
    _cmd(
      "deepseekmoe.py:tiny",
      workdir,
      "--config.train.steps=6",
      "--config.train.eval_every=3",
      "--config.train.checkpoint_every=3",
      "--config.model.moe.num_experts=8",
      "--config.model.moe.num_groups=4",
    ),
    env=_env(tmp_path),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  for name in ("metrics.jsonl", "config.json", "versions.json", "revision.txt"):
    assert (workdir / name).is_file(), name
  assert list((workdir / "tensorboard").iterdir()), "no TensorBoard events"
  assert (workdir / "plots" / "loss.png").stat().st_size > 1000
  assert (workdir / "plots" / "expert_load.png").stat().st_size > 1000
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [
    "3",
    "6",
  ]
  train, lines = _losses(workdir)
  assert sorted(train) == [1, 2, 3, 4, 5, 6]
  evals = [r for r in lines if "eval_loss" in r]
  assert [r["step"] for r in evals] == [0, 3, 6]
  last = [r for r in lines if "loss" in r][-1]
  for key in ("learning_rate", "grad_norm", "tokens_per_s", "perplexity", "load_imbalance"):
    assert key in last, key
  # Two layers, the first dense (first_k_dense=1): one MoE layer.
  assert np.asarray(last["expert_load"]).shape == (1, 8)
  assert json.loads((workdir / "config.json").read_text())["model"]["moe"]["router"] == "sigmoid"
  # The quickstart notebook reads this real run: its loss and routing plots all render.
  outputs = run_notebook(workdir, tmp_path, monkeypatch)
  assert len([o for o in outputs if "image/png" in o.get("data", {})]) == 3
  # The trained checkpoint generates text from the command line.
  gen = [sys.executable, "-m", "moejax.generate", f"--checkpoint={workdir}", "--prompt=def "]
  out = subprocess.run(
    [*gen, "--max_new_tokens=12"], env=_env(tmp_path), capture_output=True, text=True, timeout=300
  )
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.startswith("def ") and len(out.stdout) > len("def ")


@pytest.mark.slow  # three CLI runs, one killed mid-run; the fast tier resumes in-process below
def test_sigkill_then_resume_reproduces_the_uninterrupted_run(tmp_path):
  steps = [
    "--config.train.steps=10",
    "--config.train.checkpoint_every=4",
    "--config.train.eval_every=5",
  ]
  env = _env(tmp_path)
  # jitter noise on, so the router RNG is part of what must be restored
  extra = [*steps, "--config.model.moe.jitter_noise=0.01"]

  ref = tmp_path / "reference"
  out = subprocess.run(
    _cmd("mixtral.py:tiny", ref, *extra), env=env, capture_output=True, text=True, timeout=600
  )
  assert out.returncode == 0, out.stderr[-3000:]
  ref_losses, _ = _losses(ref)

  run = tmp_path / "killed"
  proc = subprocess.Popen(
    _cmd("mixtral.py:tiny", run, *extra),
    env=env,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
    start_new_session=True,
  )
  try:
    deadline = time.time() + 600
    while not (run / "checkpoints" / "4").is_dir():
      assert proc.poll() is None, "the run ended before its first checkpoint"
      assert time.time() < deadline, "no checkpoint within 600 s"
      time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
  finally:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)
  killed_losses, _ = _losses(run)
  assert max(killed_losses) < 10, "the run finished before it was killed"

  out = subprocess.run(
    _cmd("mixtral.py:tiny", run, *extra), env=env, capture_output=True, text=True, timeout=600
  )
  assert out.returncode == 0, out.stderr[-3000:]
  resumed, _ = _losses(run)
  assert sorted(resumed) == list(range(1, 11))
  for step in range(1, 11):
    np.testing.assert_allclose(resumed[step], ref_losses[step], rtol=1e-6, atol=0, err_msg=step)


def test_resume_in_process_continues_the_run_exactly(tmp_path, monkeypatch):
  """`train_and_evaluate` in this process: a run that lost its last checkpoint resumes from the one
  before and retrains the lost steps to the same losses (the fast tier's resume check; the SIGKILL
  one above runs the CLI twice)."""
  monkeypatch.setenv("MOEJAX_CACHE", str(tmp_path / "cache"))
  # jitter noise on, so the router RNG is part of what must be restored
  config = tiny_experiment_config(
    {"train.checkpoint_every": 2, "train.eval_batches": 1, "model.moe.jitter_noise": 0.01}
  )
  workdir = tmp_path / "run"
  train_and_evaluate(config, workdir)
  uninterrupted, _ = _losses(workdir)
  assert sorted(uninterrupted) == [1, 2, 3, 4]
  shutil.rmtree(workdir / "checkpoints" / "4")  # as if the run had died before saving step 4

  train_and_evaluate(config, workdir)
  resumed, _ = _losses(workdir)
  assert sorted(resumed) == [1, 2, 3, 4]
  for step in (3, 4):
    np.testing.assert_allclose(resumed[step], uninterrupted[step], rtol=1e-6, atol=0, err_msg=step)


@pytest.mark.parametrize(
  "override,message",
  [
    ("--config.train.stpes=3", "stpes"),
    # Each case starts a process; two of the four kinds of mistake in the fast tier.
    pytest.param("--config.model.moe.num_experts=many", "num_experts", marks=pytest.mark.slow),
    ("--config.model.moe.router=sinkhorn", "MoEConfig.router='sinkhorn'"),
    pytest.param("--config.data.source=web", "data.source", marks=pytest.mark.slow),
  ],
)
def test_bad_overrides_fail_fast(tmp_path, override, message):
  start = time.time()
  out = subprocess.run(
    _cmd("mixtral.py:tiny", tmp_path / "bad", override),
    env=_env(tmp_path),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert out.returncode != 0
  assert message in out.stderr, out.stderr[-2000:]
  assert not (tmp_path / "bad" / "checkpoints").exists()
  assert time.time() - start < 120

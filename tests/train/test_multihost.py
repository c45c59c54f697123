"""Training across devices and hosts: expert parallelism on a data x expert mesh trains the same
steps as one device; 2 processes x 4 CPU devices on 127.0.0.1 (`jax.distributed`) train the same
steps as 1 process x 8 devices; a process whose peer never comes fails instead of hanging.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from moejax.train import distributed
from moejax.train.metrics import METRICS_FILE, MetricsWriter

REPO = Path(__file__).resolve().parents[2]

# The 8-device mesh: expert parallelism (4 experts' devices per group) inside data parallelism; in the
# pair, each process holds one data row of the mesh.
MESH = ("--config.mesh.data=2", "--config.mesh.expert=4")
STEPS = 10
# mixtral.py:tiny shrunk to the smallest shapes the mesh allows (8 experts, 16 sequences): compiles,
# not steps, take the time. Evaluation, checkpoint and plots once, at the end.
OVERRIDES = (
  f"--config.train.steps={STEPS}",
  "--config.train.log_every=1",
  "--config.train.eval_every=10",
  "--config.train.eval_batches=1",
  "--config.train.checkpoint_every=10",
  "--config.train.plots=False",
  "--config.train.progress_bar=False",
  "--config.train.batch_size=16",
  "--config.train.seq_len=32",
  "--config.model.num_layers=2",
  "--config.model.d_model=32",
  "--config.model.num_heads=2",
  "--config.model.num_kv_heads=2",
  "--config.model.dense_hidden_dim=64",
  "--config.model.moe.expert_hidden_dim=32",
  "--config.data.max_bytes=400000",
)
# Measured on the loaded 2-core machine: ~40 s for the 8-device process, ~70 s for the pair.
RUN_TIMEOUT_S = 600
# How long a process waits for its peers to connect (--distributed_timeout) in the pair.
CONNECT_TIMEOUT_S = 120
_DISTRIBUTED_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def _env(tmp_path: Path, num_devices: int) -> dict[str, str]:
  env = {
    k: v
    for k, v in os.environ.items()
    # No proxy for 127.0.0.1 (gRPC honours http_proxy), no distributed settings of our own.
    if "_proxy" not in k.lower() and k not in (*_DISTRIBUTED_ENV, "JAX_LOCAL_DEVICE_IDS")
  }
  env["MOEJAX_CACHE"] = str(tmp_path / "cache")
  env["JAX_PLATFORMS"] = "cpu"
  env["XLA_FLAGS"] = (
    f"--xla_force_host_platform_device_count={num_devices} --xla_cpu_parallel_codegen_split_count=1"
  )
  return env


def _cmd(workdir: Path, *extra: str, overrides=OVERRIDES, mesh=MESH) -> list[str]:
  return [
    sys.executable,
    "-m",
    "moejax.train",
    f"--config={REPO / 'experiments' / 'mixtral.py'}:tiny",
    f"--workdir={workdir}",
    *overrides,
    *mesh,
    *extra,
  ]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _tail(path: Path, chars: int = 3000) -> str:
  text = path.read_text(errors="replace") if path.exists() else "<no output>"
  return text[-chars:]


def _run_all(runs: dict[str, tuple[list[str], dict[str, str]]], logs: Path, timeout: float) -> None:
  """Runs the commands side by side; fails (naming each one's stderr tail) unless all exit 0.

  One process that fails fails the test at once: its peers would only wait for it. Every process is
  killed and reaped on the way out, whatever happened.
  """
  procs = {}
  try:
    for name, (cmd, env) in runs.items():
      with (logs / f"{name}.stdout").open("w") as out, (logs / f"{name}.stderr").open("w") as err:
        # A session of its own, so that the kill below takes anything it started with it.
        procs[name] = subprocess.Popen(
          cmd, env=env, cwd=REPO, stdout=out, stderr=err, start_new_session=True
        )
    deadline = time.monotonic() + timeout
    while True:
      codes = {name: p.poll() for name, p in procs.items()}
      failed = {name: code for name, code in codes.items() if code not in (None, 0)}
      problem = None
      if failed:
        problem = f"exited with {failed}"
      elif all(code == 0 for code in codes.values()):
        return
      elif time.monotonic() > deadline:
        problem = f"did not finish within {timeout:.0f} s (exit codes so far: {codes})"
      if problem:
        tails = "\n".join(
          f"--- {name} stderr ---\n{_tail(logs / f'{name}.stderr')}" for name in runs
        )
        pytest.fail(f"{', '.join(runs)}: {problem}\n{tails}")
      time.sleep(0.2)
  finally:
    for p in procs.values():
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
    for p in procs.values():
      p.wait(timeout=60)


def _records(workdir: Path) -> tuple[dict[int, float], dict[int, float]]:
  """(step -> training loss, step -> eval loss), checking that no step was written twice."""
  lines = [json.loads(line) for line in (workdir / METRICS_FILE).read_text().splitlines()]
  train = [(r["step"], r["loss"]) for r in lines if "loss" in r]
  evals = [(r["step"], r["eval_loss"]) for r in lines if "eval_loss" in r]
  for kind, pairs in (("loss", train), ("eval_loss", evals)):
    steps = [s for s, _ in pairs]
    assert len(steps) == len(set(steps)), f"{workdir}: a step's {kind} was written twice: {steps}"
  return dict(train), dict(evals)


@pytest.mark.slow
def test_expert_parallel_training_equals_one_device(tmp_path):
  """The unshrunk tiny config, 20 steps: one device vs a 2 (data) x 4 (expert) mesh."""
  steps = 20
  overrides = (
    f"--config.train.steps={steps}",
    "--config.train.log_every=1",
    f"--config.train.eval_every={steps}",
    "--config.train.eval_batches=1",
    f"--config.train.checkpoint_every={steps}",
    "--config.train.plots=False",
    "--config.train.progress_bar=False",
  )
  one, ep = tmp_path / "one", tmp_path / "ep"
  runs = {
    "one_device": (
      _cmd(one, overrides=overrides, mesh=("--config.mesh.data=1",)),
      _env(tmp_path, 1),
    ),
    "data2_expert4": (_cmd(ep, overrides=overrides), _env(tmp_path, 8)),
  }
  _run_all(runs, tmp_path, RUN_TIMEOUT_S)
  one_train, one_eval = _records(one)
  ep_train, ep_eval = _records(ep)
  assert sorted(one_train) == sorted(ep_train) == list(range(1, steps + 1))
  for step in range(1, steps + 1):
    np.testing.assert_allclose(ep_train[step], one_train[step], rtol=1e-4, err_msg=f"step {step}")
  np.testing.assert_allclose(ep_eval[steps], one_eval[steps], rtol=1e-4)
  # The EP run reports what its devices did: 8 devices' loads per MoE layer, bytes moved.
  last = [json.loads(line) for line in (ep / METRICS_FILE).read_text().splitlines()]
  last = [r for r in last if r.get("step") == steps and "loss" in r][0]
  assert np.shape(last["device_load"]) == (4, 8)
  assert last["a2a_bytes"] > 0 and min(last["device_imbalance"]) >= 1.0


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path):
  start = time.monotonic()
  single, multi = tmp_path / "single", tmp_path / "multi"
  # The 8-device run first: it fills the token cache the pair then reads.
  _run_all({"single": (_cmd(single), _env(tmp_path, 8))}, tmp_path, RUN_TIMEOUT_S)
  port = _free_port()
  runs = {}
  for i in range(2):
    env = _env(tmp_path, 4)
    env["JAX_COORDINATOR_BIND_ADDRESS"] = f"127.0.0.1:{port}"  # not every interface, as by default
    cmd = _cmd(
      multi,
      f"--coordinator_address=127.0.0.1:{port}",
      "--num_processes=2",
      f"--process_id={i}",
      f"--distributed_timeout={CONNECT_TIMEOUT_S}",
    )
    runs[f"process_{i}"] = (cmd, env)
  _run_all(runs, tmp_path, RUN_TIMEOUT_S)
  print(f"1 x 8 devices, then 2 x 4 devices: {time.monotonic() - start:.0f} s")

  single_train, single_eval = _records(single)
  multi_train, multi_eval = _records(multi)
  assert sorted(single_train) == sorted(multi_train) == list(range(1, STEPS + 1))
  assert sorted(single_eval) == sorted(multi_eval) == [0, STEPS]
  for step in range(1, STEPS + 1):
    np.testing.assert_allclose(
      multi_train[step], single_train[step], rtol=1e-4, atol=0, err_msg=f"step {step}"
    )
  for step in (0, STEPS):
    np.testing.assert_allclose(
      multi_eval[step], single_eval[step], rtol=1e-4, atol=0, err_msg=f"eval at step {step}"
    )
  versions = json.loads((multi / "versions.json").read_text())
  assert (versions["process_count"], versions["device_count"]) == (2, 8)
  assert versions["local_device_count"] == 4
  # Both processes took part in the checkpoint; orbax committed it once.
  assert (multi / "checkpoints" / str(STEPS) / "commit_success.txt").is_file()


@pytest.mark.slow
def test_a_process_whose_peer_never_connects_fails_instead_of_hanging(tmp_path):
  port = _free_port()
  env = _env(tmp_path, 4)
  env["JAX_COORDINATOR_BIND_ADDRESS"] = f"127.0.0.1:{port}"
  cmd = _cmd(
    tmp_path / "alone",
    f"--coordinator_address=127.0.0.1:{port}",
    "--num_processes=2",
    "--process_id=0",
    "--distributed_timeout=5",
  )
  start = time.monotonic()
  try:
    out = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
  except subprocess.TimeoutExpired as e:
    pytest.fail(f"process 0 still waited for process 1 after 120 s: {str(e.stderr)[-3000:]}")
  # JAX aborts the process (SIGABRT) once the coordinator's deadline passes.
  assert out.returncode != 0, out.stderr[-3000:]
  assert "DEADLINE_EXCEEDED" in out.stderr, out.stderr[-3000:]
  assert time.monotonic() - start < 120
  assert not (tmp_path / "alone" / METRICS_FILE).exists()


@pytest.fixture
def no_distributed_env(monkeypatch):
  for name in _DISTRIBUTED_ENV:
    monkeypatch.delenv(name, raising=False)


def test_initialize_without_a_coordinator_is_a_single_process(no_distributed_env):
  assert distributed.initialize() is False
  assert distributed.initialize(mode="off") is False


@pytest.mark.parametrize(
  "kwargs,env,message",
  [
    (dict(num_processes=2, process_id=0), {}, "--num_processes=2 --process_id=0 given without"),
    ({}, {"JAX_NUM_PROCESSES": "2"}, "$JAX_NUM_PROCESSES=2 given without --coordinator_address"),
    (dict(coordinator_address="10.0.0.1:1234"), {}, "also needs --num_processes"),
    (dict(coordinator_address="10.0.0.1", num_processes=2, process_id=0), {}, "host:port"),
    (
      dict(coordinator_address="10.0.0.1:1234", num_processes=2, process_id=2),
      {},
      "--process_id=2 is invalid: it must be in [0, --num_processes=2)",
    ),
    (
      dict(coordinator_address="10.0.0.1:1234"),
      {"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "-1"},
      "$JAX_PROCESS_ID=-1 is invalid",
    ),
    ({}, {"JAX_NUM_PROCESSES": "two"}, "$JAX_NUM_PROCESSES='two' is invalid"),
    (dict(process_id=0, mode="off"), {}, "--distributed=off contradicts --process_id=0"),
    (dict(mode="slurm"), {}, "--distributed='slurm' is invalid"),
  ],
)
def test_initialize_rejects_inconsistent_input(
  no_distributed_env, monkeypatch, kwargs, env, message
):
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  with pytest.raises(ValueError) as e:
    distributed.initialize(**kwargs)
  assert message in str(e.value)


def test_metrics_writer_of_other_processes_writes_nothing(tmp_path, capsys):
  (tmp_path / METRICS_FILE).write_text('{"step": 1, "loss": 2.0}\n')
  with MetricsWriter(tmp_path, total_steps=4, start_step=0, primary=False) as writer:
    writer.write(1, {"loss": np.float32(1.5)})
    writer.update(1, {"loss": 1.5})
    writer.flush()
    with pytest.raises(ValueError, match="step"):
      writer.write(2, {"step": 2})  # Checked on every process, so all of them fail alike.
  assert (tmp_path / METRICS_FILE).read_text() == '{"step": 1, "loss": 2.0}\n'
  assert sorted(p.name for p in tmp_path.iterdir()) == [METRICS_FILE]
  assert capsys.readouterr().err == ""

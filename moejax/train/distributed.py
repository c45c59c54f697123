"""One process per host: JAX's multi-controller runtime (`jax.distributed`) for the training CLI.

Every host runs the same command; the processes find each other through a coordinator (process 0's
address and a free port), then each drives its own devices and `jax.devices()` lists all of them:

    # host 0                                            # host 1
    python -m moejax.train ... --coordinator_address=10.0.0.1:1234 --num_processes=2 --process_id=0
    python -m moejax.train ... --coordinator_address=10.0.0.1:1234 --num_processes=2 --process_id=1

`initialize` starts the runtime when

  (a) a coordinator address is given as an argument, or in `$JAX_COORDINATOR_ADDRESS` (with
      `$JAX_NUM_PROCESSES` and `$JAX_PROCESS_ID`, which this module reads: JAX itself reads only the
      address, `$JAX_LOCAL_DEVICE_IDS`, `$JAX_COORDINATOR_BIND_ADDRESS` and `$JAX_PARTITION_INDEX`), or
  (b) `mode="auto"`: JAX detects the cluster (SLURM, Open MPI, Cloud TPU, Kubernetes) and fills in
      whatever was not given.

Otherwise it does nothing: one process, its local devices only. It must run before anything asks
JAX for devices. Cross-process collectives on CPU go through gloo, JAX's default
(`jax_cpu_collectives_implementation`); on GPU and TPU through the accelerator's own.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax
from absl import logging

# off: never start the runtime. manual: start it when a coordinator address is given (argument or
# $JAX_COORDINATOR_ADDRESS). auto: also let JAX detect a cluster (SLURM, Open MPI, TPU, Kubernetes).
MODES = ("off", "manual", "auto")
# jax.distributed.initialize's default: how long processes wait for each other to connect.
DEFAULT_INITIALIZATION_TIMEOUT_S = 300


def _env_int(name: str) -> int | None:
  value = os.environ.get(name)
  if value is None or not value.strip():
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"${name}={value!r} is invalid: expected an integer") from None


def _check_address(name: str, address: str) -> None:
  host, sep, port = address.rpartition(":")
  if not (sep and host and port.isdigit() and 0 < int(port) < 65536):
    raise ValueError(f"{name}={address!r} is invalid: expected host:port, e.g. 10.0.0.1:1234")


def initialize(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  local_device_ids: int | Sequence[int] | None = None,
  *,
  mode: str = "manual",
  initialization_timeout: int = DEFAULT_INITIALIZATION_TIMEOUT_S,
) -> bool:
  """Starts `jax.distributed` when the arguments, the environment or the cluster ask for it.

  Args:
    coordinator_address: `host:port` of process 0's coordinator; every process passes the same one.
      None: `$JAX_COORDINATOR_ADDRESS`, or (mode="auto") the cluster's.
    num_processes: processes in the job. None: `$JAX_NUM_PROCESSES`, or the cluster's.
    process_id: this process's index in [0, num_processes). None: `$JAX_PROCESS_ID`, or the
      cluster's.
    local_device_ids: restrict this process to these local (GPU) devices. None: all of them, or
      `$JAX_LOCAL_DEVICE_IDS`.
    mode: one of `MODES`: "off" (single process, whatever the environment says), "manual" (start the
      runtime only for a given coordinator address) or "auto" (also detect a cluster).
    initialization_timeout: seconds to wait for all processes to connect before failing.

  Returns:
    True if the distributed runtime was started, False for a single process.

  Raises:
    ValueError: naming the flag (or environment variable) and value, for inconsistent input.
    RuntimeError: if JAX already initialized its backend (something asked for devices first).
  """
  if mode not in MODES:
    raise ValueError(f"--distributed={mode!r} is invalid; allowed: {', '.join(MODES)}")
  if initialization_timeout <= 0:
    raise ValueError(
      f"--distributed_timeout={initialization_timeout} is invalid: it must be a positive number "
      "of seconds"
    )
  if isinstance(local_device_ids, int):
    local_device_ids = [local_device_ids]
  if mode == "off":
    given = {
      "--coordinator_address": coordinator_address,
      "--num_processes": num_processes,
      "--process_id": process_id,
      "--local_device_ids": local_device_ids,
    }
    named = [f"{flag}={value}" for flag, value in given.items() if value is not None]
    if named:
      raise ValueError(f"--distributed=off contradicts {' '.join(named)}")
    logging.info("Single process (--distributed=off).")
    return False

  # Where each value came from, for error messages: the flag, or the environment variable.
  source = {
    "address": "--coordinator_address",
    "count": "--num_processes",
    "id": "--process_id",
  }
  if coordinator_address is None and os.environ.get("JAX_COORDINATOR_ADDRESS"):
    coordinator_address = os.environ["JAX_COORDINATOR_ADDRESS"]
    source["address"] = "$JAX_COORDINATOR_ADDRESS"
  if num_processes is None and (num_processes := _env_int("JAX_NUM_PROCESSES")) is not None:
    source["count"] = "$JAX_NUM_PROCESSES"
  if process_id is None and (process_id := _env_int("JAX_PROCESS_ID")) is not None:
    source["id"] = "$JAX_PROCESS_ID"

  if coordinator_address is not None:
    _check_address(source["address"], coordinator_address)
  if num_processes is not None and num_processes < 1:
    raise ValueError(f"{source['count']}={num_processes} is invalid: it must be at least 1")
  if process_id is not None and process_id < 0:
    raise ValueError(f"{source['id']}={process_id} is invalid: it must be non-negative")
  if None not in (num_processes, process_id) and process_id >= num_processes:
    raise ValueError(
      f"{source['id']}={process_id} is invalid: it must be in "
      f"[0, {source['count']}={num_processes})"
    )

  if mode == "manual":
    if coordinator_address is None:
      named = [
        f"{source[key]}={value}"
        for key, value in (("count", num_processes), ("id", process_id))
        if value is not None
      ]
      if local_device_ids is not None:
        named.append(f"--local_device_ids={','.join(map(str, local_device_ids))}")
      if named:
        raise ValueError(
          f"{' '.join(named)} given without --coordinator_address (or $JAX_COORDINATOR_ADDRESS); "
          "pass it, or --distributed=auto to let JAX detect the cluster"
        )
      logging.info("Single process: no --coordinator_address or $JAX_COORDINATOR_ADDRESS.")
      return False
    missing = [
      f"{flag} (or ${env})"
      for flag, env, value in (
        ("--num_processes", "JAX_NUM_PROCESSES", num_processes),
        ("--process_id", "JAX_PROCESS_ID", process_id),
      )
      if value is None
    ]
    if missing:
      raise ValueError(
        f"{source['address']}={coordinator_address} also needs {' and '.join(missing)}; "
        "or pass --distributed=auto on a cluster JAX detects (SLURM, Open MPI, TPU)"
      )

  logging.info(
    "Starting jax.distributed (%s): coordinator %s, process %s of %s.",
    mode,
    coordinator_address or "<detected>",
    "<detected>" if process_id is None else process_id,
    "<detected>" if num_processes is None else num_processes,
  )
  try:
    jax.distributed.initialize(
      coordinator_address,
      num_processes,
      process_id,
      local_device_ids,
      # manual: exactly what was given; auto detection could still change local_device_ids.
      cluster_detection_method=None if mode == "auto" else "deactivate",
      initialization_timeout=initialization_timeout,
    )
  except ValueError as e:
    if mode != "auto":
      raise
    raise ValueError(
      f"--distributed=auto found no cluster to take the missing values from ({e}); pass "
      "--coordinator_address, --num_processes and --process_id"
    ) from e
  logging.info(
    "jax.distributed: process %d of %d, %d local of %d devices (%s), CPU collectives: %s.",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
    jax.default_backend(),
    jax.config.jax_cpu_collectives_implementation,
  )
  return True

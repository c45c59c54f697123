"""Train an MoE language model from an experiment config.

    python -m moejax.train --config experiments/mixtral.py:tiny --workdir runs/mixtral_tiny \
        [--config.train.steps=200 --config.model.moe.num_experts=16 ...]

Rerunning the same command resumes from the latest checkpoint in --workdir. The config is locked:
an override naming an unknown field, or of the wrong type, fails here before anything compiles.

Several hosts (one process each, JAX's multi-controller runtime): run the same command on every
host, with the same --workdir on a shared filesystem, adding

    --coordinator_address=HOST0:PORT --num_processes=N --process_id=I      # I = 0 .. N-1

(or $JAX_COORDINATOR_ADDRESS, $JAX_NUM_PROCESSES, $JAX_PROCESS_ID). On SLURM, Open MPI or a Cloud
TPU pod, `--distributed=auto` lets JAX detect all three. `--config.mesh` spans the devices of all
processes, `--config.train.batch_size` is the global batch, and only process 0 writes metrics,
plots and run info. See moejax/train/distributed.py.
"""

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Experiment config: path/to/file.py[:arg].", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and plots.")
flags.mark_flags_as_required(["config", "workdir"])

_DISTRIBUTED = flags.DEFINE_enum(
  "distributed",
  "manual",
  ["off", "manual", "auto"],
  "Multi-process runtime (jax.distributed). manual: start it when --coordinator_address or "
  "$JAX_COORDINATOR_ADDRESS is set, else run as one process. auto: also let JAX detect a cluster "
  "(SLURM, Open MPI, Cloud TPU). off: one process, whatever the environment says.",
)
_COORDINATOR_ADDRESS = flags.DEFINE_string(
  "coordinator_address",
  None,
  "host:port of process 0, the same on every process (default: $JAX_COORDINATOR_ADDRESS).",
)
_NUM_PROCESSES = flags.DEFINE_integer(
  "num_processes", None, "Processes in the job (default: $JAX_NUM_PROCESSES).", lower_bound=1
)
_PROCESS_ID = flags.DEFINE_integer(
  "process_id", None, "This process's index in [0, num_processes) (default: $JAX_PROCESS_ID)."
)
_LOCAL_DEVICE_IDS = flags.DEFINE_list(
  "local_device_ids",
  None,
  "Comma-separated local GPU ids this process uses (default: all, or $JAX_LOCAL_DEVICE_IDS).",
)
_DISTRIBUTED_TIMEOUT = flags.DEFINE_integer(
  "distributed_timeout",
  300,
  "Seconds to wait for all processes to connect before failing.",
  lower_bound=1,
)


def _main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
  from moejax import hostmem

  hostmem.retain_host_memory()  # XLA:CPU reuses its step buffers (MOEJAX_RETAIN_HOST_MEMORY=0: off)
  # Imported here so that --help and flag errors do not pay for importing jax.
  from moejax.train import distributed

  local_device_ids = _LOCAL_DEVICE_IDS.value
  if local_device_ids is not None:
    try:
      local_device_ids = [int(i) for i in local_device_ids]
    except ValueError:
      raise app.UsageError(
        f"--local_device_ids={','.join(local_device_ids)} is invalid: expected integers"
      ) from None
  # Before anything asks JAX for devices: the trainer's import does not, building the mesh does.
  try:
    distributed.initialize(
      _COORDINATOR_ADDRESS.value,
      _NUM_PROCESSES.value,
      _PROCESS_ID.value,
      local_device_ids,
      mode=_DISTRIBUTED.value,
      initialization_timeout=_DISTRIBUTED_TIMEOUT.value,
    )
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  from moejax.train.trainer import train_and_evaluate

  final = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  print(" ".join(f"{k}={v:.4f}" for k, v in sorted(final.items())))


def main():
  """Console-script entry point (`moejax-train`)."""
  app.run(_main)


if __name__ == "__main__":
  main()

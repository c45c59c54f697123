"""Train an MoE language model from an experiment config.

    python -m moejax.train --config experiments/mixtral.py:tiny --workdir runs/mixtral_tiny \
        [--config.train.steps=200 --config.model.moe.num_experts=16 ...]

Rerunning the same command resumes from the latest checkpoint in --workdir. The config is locked:
an override naming an unknown field, or of the wrong type, fails here before anything compiles.
"""

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Experiment config: path/to/file.py[:arg].", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and plots.")
flags.mark_flags_as_required(["config", "workdir"])


def _main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
  # Imported here so that --help and flag errors do not pay for importing jax.
  from moejax.train.trainer import train_and_evaluate

  final = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  print(" ".join(f"{k}={v:.4f}" for k, v in sorted(final.items())))


def main():
  """Console-script entry point (`moejax-train`)."""
  app.run(_main)


if __name__ == "__main__":
  main()

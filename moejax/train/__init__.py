"""Training: experiment-config skeleton, optimizer, checkpoints, metrics, the loop and its CLI.

    python -m moejax.train --config experiments/mixtral.py:tiny --workdir runs/x

`moejax.train.trainer.train_and_evaluate(config, workdir)` is the importable entry point (kept out of
this module's imports so that `--help` and flag errors do not import jax).
"""

from moejax.train.config import base_config, describe, moe_config, parse_arg

__all__ = ["base_config", "describe", "moe_config", "parse_arg"]

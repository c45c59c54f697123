"""Checkpoints with orbax: model state, optimizer state, data-iterator state and step, atomically.

Orbax writes each checkpoint into a temporary directory and renames it when complete, so a run
killed mid-save leaves the previous checkpoint intact; `latest_step` only ever sees finished ones.
The train state is a pytree of arrays (saved with `StandardSave`, restored onto the shardings of an
abstract target, so a restore may land on a different mesh); the data iterator's state and the
step are small JSON documents.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Saves and restores `(train_state, data_state)` under `workdir/checkpoints`."""

  def __init__(self, workdir: str | Path, *, keep: int = 3):
    self.directory = Path(workdir).absolute() / "checkpoints"
    options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=True, cleanup_tmp_directories=True
    )
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, train_state: Any, data_state: dict, *, force: bool = False) -> None:
    self.manager.save(
      step,
      args=ocp.args.Composite(
        train_state=ocp.args.StandardSave(train_state),
        data_state=ocp.args.JsonSave(data_state),
        meta=ocp.args.JsonSave({"step": int(step)}),
      ),
      force=force,
    )

  def restore(self, step: int, abstract_train_state: Any) -> tuple[Any, dict]:
    """Restores onto the structure, dtypes and shardings of `abstract_train_state`."""
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_train_state)
    restored = self.manager.restore(
      step,
      args=ocp.args.Composite(
        train_state=ocp.args.StandardRestore(target),
        data_state=ocp.args.JsonRestore(),
        meta=ocp.args.JsonRestore(),
      ),
    )
    if int(restored.meta["step"]) != step:
      raise RuntimeError(f"checkpoint {step} in {self.directory} says step {restored.meta['step']}")
    return restored.train_state, restored.data_state

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()

"""What a run was: its config, library versions and devices, and the moejax source revision.

`write_run_info(workdir, config)` writes three files next to the run's metrics and checkpoints:
  config.json    the full ConfigDict. A resumed run whose config differs keeps the old one as
                 `config.<time it was written>.json` and logs a warning naming the changed fields.
  versions.json  Python, platform, package versions, JAX backend, devices and process count.
  revision.txt   `git rev-parse HEAD` of the moejax checkout, `-dirty` with uncommitted changes, or
                 `unknown` when moejax is not run from a git checkout (e.g. installed from a wheel).
Nothing here raises for a missing git, package or commit: run metadata must never stop a run.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import logging
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import jax
import ml_collections

import moejax

_PACKAGES = (
  "moejax",
  "jax",
  "jaxlib",
  "flax",
  "optax",
  "orbax-checkpoint",
  "ml-collections",
  "numpy",
  "grain",
)
# Accelerator plugins, recorded only when installed.
_OPTIONAL_PACKAGES = ("jax-cuda12-plugin", "jax-cuda13-plugin", "libtpu")
_GIT_TIMEOUT_S = 10


def _package_version(name: str) -> str | None:
  try:
    return importlib.metadata.version(name)
  except importlib.metadata.PackageNotFoundError:
    return None


def versions() -> dict[str, Any]:
  """Python, platform, package versions and the JAX devices this process sees."""
  packages = {name: _package_version(name) for name in _PACKAGES}
  packages.update(
    (name, version)
    for name in _OPTIONAL_PACKAGES
    if (version := _package_version(name)) is not None
  )
  return {
    "python": sys.version,
    "platform": platform.platform(),
    "packages": packages,
    "jax_backend": jax.default_backend(),
    "device_kind": jax.devices()[0].device_kind,
    "devices": [str(d) for d in jax.devices()],
    "device_count": jax.device_count(),
    "local_device_count": jax.local_device_count(),
    "process_count": jax.process_count(),
  }


def _git(args: list[str], cwd: Path) -> str | None:
  """Stdout of `git <args>` in `cwd`, or None if git is missing or the command fails."""
  try:
    result = subprocess.run(
      ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=_GIT_TIMEOUT_S, check=True
    )
  except (OSError, subprocess.SubprocessError):
    return None
  return result.stdout.strip()


def source_revision() -> str:
  """The git commit of the moejax source tree, with `-dirty` for uncommitted changes, or "unknown".

  The package must be tracked by the repository git finds: a wheel installed into a virtual
  environment that sits inside some other checkout would otherwise report that checkout's commit.
  """
  package_dir = Path(moejax.__file__).resolve().parent
  if _git(["ls-files", "--error-unmatch", "__init__.py"], package_dir) is None:
    return "unknown"
  revision = _git(["rev-parse", "HEAD"], package_dir.parent)
  if not revision:
    return "unknown"
  status = _git(["status", "--porcelain"], package_dir.parent)
  return revision + "-dirty" if status else revision


def _config_json(config: ml_collections.ConfigDict | dict[str, Any]) -> str:
  if isinstance(config, ml_collections.ConfigDict):
    return config.to_json_best_effort(indent=2, sort_keys=True)
  return json.dumps(config, indent=2, sort_keys=True, default=repr)


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  if not isinstance(tree, dict):
    return {prefix: tree}
  flat = {}
  for key, value in tree.items():
    flat.update(_flatten(value, f"{prefix}.{key}" if prefix else key))
  return flat


def _keep_old_config(path: Path, new_text: str) -> None:
  """If `path` holds a different config, copies it aside and warns which fields changed."""
  if not path.exists():
    return
  old_text = path.read_text()
  try:
    old, new = _flatten(json.loads(old_text)), _flatten(json.loads(new_text))
  except json.JSONDecodeError:
    old, new = {"<unparsable config.json>": old_text}, {}
  if old == new:
    return
  written = datetime.datetime.fromtimestamp(path.stat().st_mtime, datetime.UTC)
  backup = path.with_name(f"config.{written:%Y%m%dT%H%M%SZ}.json")
  n = 1
  while backup.exists():
    backup = path.with_name(f"config.{written:%Y%m%dT%H%M%SZ}.{n}.json")
    n += 1
  backup.write_text(old_text)
  changed = sorted(
    k for k in old.keys() | new.keys() if old.get(k, "<unset>") != new.get(k, "<unset>")
  )
  shown = ", ".join(
    f"{k}: {old.get(k, '<unset>')!r} -> {new.get(k, '<unset>')!r}" for k in changed[:10]
  )
  more = f" and {len(changed) - 10} more" if len(changed) > 10 else ""
  logging.getLogger(__name__).warning(
    "%s: the run was started with a different config (kept as %s). Changed: %s%s",
    path,
    backup.name,
    shown,
    more,
  )


def _write_atomic(path: Path, text: str) -> None:
  tmp = path.with_name(f".{path.name}.tmp")
  tmp.write_text(text)
  os.replace(tmp, path)


def write_run_info(
  workdir: str | os.PathLike, config: ml_collections.ConfigDict | dict[str, Any]
) -> None:
  """Writes `config.json`, `versions.json` and `revision.txt` into `workdir` (see module docstring).

  Args:
    workdir: the run directory; created if missing.
    config: the run's config. Values JSON cannot hold are written as their repr.
  """
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  config_text = _config_json(config) + "\n"
  _keep_old_config(workdir / "config.json", config_text)
  _write_atomic(workdir / "config.json", config_text)
  _write_atomic(workdir / "versions.json", json.dumps(versions(), indent=2) + "\n")
  _write_atomic(workdir / "revision.txt", source_revision() + "\n")

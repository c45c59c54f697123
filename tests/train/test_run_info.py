"""write_run_info: config.json (and the copy kept on a config change), versions.json, revision.txt."""

import json
import logging
import re
import shutil
import subprocess
from pathlib import Path

import jax
import ml_collections

import moejax
from moejax.train.run_info import source_revision, write_run_info


def _config(**moe):
  config = ml_collections.ConfigDict()
  config.model = ml_collections.ConfigDict({"num_layers": 2, "moe": {"num_experts": 4, **moe}})
  config.train = ml_collections.ConfigDict({"steps": 10, "betas": (0.9, 0.95)})
  return config


def test_writes_config_versions_and_revision(tmp_path):
  write_run_info(tmp_path, _config())
  assert json.loads((tmp_path / "config.json").read_text()) == {
    "model": {"num_layers": 2, "moe": {"num_experts": 4}},
    "train": {"steps": 10, "betas": [0.9, 0.95]},
  }
  versions = json.loads((tmp_path / "versions.json").read_text())
  assert versions["packages"]["jax"] == jax.__version__
  assert versions["packages"]["moejax"] == moejax.__version__
  assert set(versions["packages"]) >= {
    "flax",
    "optax",
    "orbax-checkpoint",
    "ml-collections",
    "grain",
  }
  assert versions["jax_backend"] == jax.default_backend()
  assert versions["device_count"] == jax.device_count() == len(versions["devices"])
  assert versions["process_count"] == 1
  assert (tmp_path / "revision.txt").read_text().strip() == source_revision()


def test_revision_is_head_of_this_checkout():
  repo = Path(moejax.__file__).resolve().parent.parent
  head = None
  if shutil.which("git"):
    result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True)
    head = result.stdout.strip() if result.returncode == 0 else None
  revision = source_revision()
  if head is None:  # Not a git checkout, no commit yet, or no git.
    assert revision == "unknown"
  else:
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", revision)
    assert revision.startswith(head)


def test_revision_without_git_is_unknown(monkeypatch, tmp_path):
  monkeypatch.setenv("PATH", str(tmp_path))
  assert source_revision() == "unknown"


def test_same_config_on_resume_keeps_no_copy(tmp_path, caplog):
  write_run_info(tmp_path, _config())
  with caplog.at_level(logging.WARNING):
    write_run_info(tmp_path, _config())
  assert not caplog.records
  assert not list(tmp_path.glob("config.*.json"))


def test_changed_config_on_resume_keeps_old_copy_and_warns(tmp_path, caplog):
  write_run_info(tmp_path, _config())
  old = (tmp_path / "config.json").read_text()
  with caplog.at_level(logging.WARNING):
    write_run_info(tmp_path, _config(num_experts=8))
    write_run_info(tmp_path, _config(num_experts=16))
  assert "model.moe.num_experts: 4 -> 8" in caplog.records[0].getMessage()
  copies = sorted(tmp_path.glob("config.*.json"))
  assert len(copies) == 2
  assert old in [c.read_text() for c in copies]
  assert json.loads((tmp_path / "config.json").read_text())["model"]["moe"]["num_experts"] == 16

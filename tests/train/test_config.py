"""The experiment skeleton: its model.moe block is generated from MoEConfig, and every generated
field can be set from the command line and reaches the model's MoEConfig."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest
from absl import flags
from ml_collections import config_dict, config_flags

from moejax.moe import MoEConfig
from moejax.train import config as train_config
from moejax.train.config import (
  MOE_SET_BY_MODEL,
  MOE_SKELETON_DEFAULTS,
  base_config,
  dataclass_skeleton,
  describe,
  field_comments,
  field_docs,
  moe_config,
)
from moejax.train.trainer import build_model_config

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"
BYTE_VOCAB = 264
MOE_FIELDS = [f for f in dataclasses.fields(MoEConfig) if f.name not in MOE_SET_BY_MODEL]


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Base:
  # Width of the thing.
  width: int


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Layer(_Base):
  """A test-local dataclass with every kind of field the generator handles."""

  # A comment over
  # two lines.
  name: str = "a"
  # Shared by the next field, which follows without a blank line.
  low: int = 1
  high: int = 2

  no_comment: bool = False
  # Optional fields become typed placeholders.
  limit: float | None = None
  count: int | None = None
  shape: tuple[int, ...] = (1, 2)
  # Excluded below.
  dtype: str = "float32"


def test_skeleton_generated_from_a_dataclass():
  skeleton = dataclass_skeleton(_Layer, exclude=("dtype",), defaults=dict(width=8))
  assert sorted(skeleton) == sorted({f.name for f in dataclasses.fields(_Layer)} - {"dtype"})
  assert (skeleton.width, skeleton.name, skeleton.low, skeleton.high) == (8, "a", 1, 2)
  assert skeleton.shape == (1, 2) and isinstance(skeleton.shape, tuple)
  assert skeleton.limit is None and skeleton.count is None
  skeleton.limit, skeleton.count = 1.5, 3  # typed placeholders accept their type ...
  with pytest.raises(TypeError):
    skeleton.count = "three"  # ... and only it
  comments = field_comments(_Layer)
  assert comments["width"] == "Width of the thing."  # from the dataclass base
  assert comments["name"] == "A comment over two lines."
  assert (
    comments["low"]
    == comments["high"]
    == "Shared by the next field, which follows without a blank line."
  )
  assert comments["no_comment"] == ""
  assert comments["limit"] == comments["count"] == "Optional fields become typed placeholders."


def test_skeleton_picks_up_a_new_field():
  @dataclasses.dataclass(frozen=True, kw_only=True)
  class Extended(_Layer):
    # A field added later.
    extra: str = "new"

  skeleton = dataclass_skeleton(Extended, exclude=("dtype",), defaults=dict(width=8))
  assert skeleton.extra == "new"
  assert field_comments(Extended)["extra"] == "A field added later."


def test_skeleton_errors_name_the_field():
  with pytest.raises(ValueError, match="no field"):
    dataclass_skeleton(_Layer, exclude=("not_a_field",))
  assert dataclass_skeleton(_Layer).get("width") is None  # no default: an int placeholder

  @dataclasses.dataclass
  class Bad:
    callback: object = print

  with pytest.raises(TypeError, match="Bad.callback"):
    dataclass_skeleton(Bad)


@pytest.mark.parametrize("field", MOE_FIELDS, ids=lambda f: f.name)
def test_moe_block_has_every_moe_config_field_with_its_default_and_comment(field):
  moe = moe_config()
  assert field.name in moe
  if field.name in MOE_SKELETON_DEFAULTS:
    expected = MOE_SKELETON_DEFAULTS[field.name]
  elif field.default_factory is not dataclasses.MISSING:
    expected = field.default_factory()
  else:
    expected = field.default
  assert moe[field.name] == expected
  assert field_comments(MoEConfig)[field.name], f"MoEConfig.{field.name} has no comment"
  assert field_docs()[f"model.moe.{field.name}"] == field_comments(MoEConfig)[field.name]


def test_moe_block_has_nothing_else():
  assert set(moe_config()) == {f.name for f in MOE_FIELDS}
  assert moe_config().capacity_factor == MoEConfig.capacity_factor  # one default, MoEConfig's


def test_every_skeleton_field_is_described():
  text = describe(base_config())
  assert "model.moe.capacity_factor = 1.0  # " in text
  undocumented = [p for p in _leaf_paths(base_config().to_dict()) if not field_docs().get(p)]
  assert not undocumented


def _leaf_paths(node, prefix=""):
  for key, value in node.items():
    if isinstance(value, Mapping):
      yield from _leaf_paths(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}"


def _known_names():
  """Every string in the moejax modules' tuples and registries: candidates for str fields."""
  names = set()
  for name, module in list(sys.modules.items()):
    if not name.startswith("moejax.") or module is None:
      continue
    for value in vars(module).values():
      if isinstance(value, (tuple, Mapping)) and not isinstance(value, config_dict.ConfigDict):
        names.update(v for v in value if isinstance(v, str))
  return sorted(names)


def _candidates(field, default):
  """Values to try for `field`, non-default ones first; the default itself last."""
  kind = train_config._placeholder_type(MoEConfig, field) if default is None else type(default)
  if kind is bool:
    values = [not default]
  elif kind is int:
    values = [(default or 1) + 1, 2, 1]
  elif kind is float:
    values = [(default or 1.0) * 2, 1.5, 0.5]
  elif kind is str:
    values = _known_names()
  elif kind is tuple:
    values = [(name,) for name in _known_names()]
  else:
    values = []
  return [v for v in values if v != default] + [default]


def _valid(moe, **changes):
  try:
    MoEConfig(**(moe | changes))
  except (ValueError, TypeError):
    return False
  return True


def _cli_text(value):
  return value if isinstance(value, str) else repr(value)


@pytest.mark.parametrize("field", MOE_FIELDS, ids=lambda f: f.name)
def test_every_moe_field_is_settable_from_the_command_line(field):
  base = build_model_config(_load_config(), BYTE_VOCAB).moe
  moe = dataclasses.asdict(base)
  value = next(
    v for v in _candidates(field, moe_config()[field.name]) if _valid(moe, **{field.name: v})
  )
  config = _load_config(f"--config.model.moe.{field.name}={_cli_text(value)}")
  assert config.model.moe[field.name] == value
  assert getattr(build_model_config(config, BYTE_VOCAB).moe, field.name) == value


def _load_config(*overrides):
  """The experiment config as `python -m moejax.train` parses it (locked, with overrides)."""
  argv = ["prog", f"--config={EXPERIMENTS / 'mixtral.py'}:tiny", *overrides]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file(
    "config", None, "", flag_values=flag_values, lock_config=True, sys_argv=argv
  )
  flag_values(argv)
  return flag_values.config


def test_switch_keeps_its_capacity_factor():
  """Switch runs capacity dispatch at capacity_factor 1.25 (its `arg` default), whatever the
  skeleton's default (MoEConfig's 1.0); mixtral is dropless, so the factor is unused there."""
  assert _load_config().model.moe.dispatch == "dropless"
  spec = importlib.util.spec_from_file_location("switch", EXPERIMENTS / "switch.py")
  switch = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(switch)
  for variant in switch.VARIANTS:
    moe = switch.get_config(variant).model.moe
    assert (moe.dispatch, moe.capacity_factor) == ("capacity", 1.25)

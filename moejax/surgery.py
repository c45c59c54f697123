"""Checkpoint surgery: every path -> array transform on moejax checkpoints, in one vocabulary.

Vocabulary:

- **Canonical values**: a flat `{path: array}` of a model's checkpoint variables (its `nnx.Param`s
  and aux-loss-free biases) in the *unscanned* layout, `blocks.{i}.moe.experts.w_up` and so on,
  whatever layout the model itself uses. Every surgery reads and writes canonical values; the
  scanned layout is a storage detail (`canonical_names`).
- **Sources**: how one canonical array is made from a foreign checkpoint's tensors and written back
  (`Copy`, `Flat`, `Linear`, `Experts`, `FusedExperts`); the Hugging Face importer
  (`moejax.interop`) is a table of them.
- **Initialisers**: where a run's first parameters come from (`config.train.init_from`):

      hf:DIR            a Hugging Face checkpoint directory (the model config comes from it)
      run:DIR           another moejax run's latest checkpoint (same parameter paths and shapes)
      module:function   a surgery function `fn(values, config) -> values` that gets this run's
                        freshly initialised canonical values and returns the ones to start from
                        (upcycling, pruning, merging: e.g. read a dense run with `read_run` and
                        copy its FFN into every expert)
      DIR               a directory: hf: if its config.json has a `model_type`, run: otherwise

    values = surgery.canonical(model)                 # {path: np.ndarray}
    surgery.fill(model, values)                       # the inverse, for either layout
    values, config = surgery.read_run("runs/dense")   # a run's checkpoint, canonical
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from moejax.models.config import ModelConfig
from moejax.models.transformer import layer_layout
from moejax.moe.layer import AuxFreeBias

# The variables a checkpoint holds (RNG streams and other state are the run's own).
CHECKPOINT_VARIABLES = (nnx.Param, AuxFreeBias)  # one filter: either type


def _path(path: tuple) -> str:
  return ".".join(map(str, path))


# ----------------------------------------------------------------------------------------------------
# The canonical (unscanned) layout.


def canonical_names(config: ModelConfig, path: tuple) -> tuple[list[str], bool]:
  """The canonical path(s) a variable at `path` of `Transformer(config)` holds, and whether they
  are stacked along a leading layer axis (scanned_blocks; see transformer.stack_layers)."""
  if not config.scan_layers or path[0] not in ("prefix_blocks", "scanned_blocks", "suffix_blocks"):
    return [_path(path)], False
  prefix, period, units, _ = layer_layout(config)
  head, index, rest = path[0], int(path[1]), path[2:]
  if head == "scanned_blocks":
    return [_path(("blocks", prefix + u * period + index, *rest)) for u in range(units)], True
  layer = index if head == "prefix_blocks" else prefix + period * units + index
  return [_path(("blocks", layer, *rest))], False


def _config_of(model, config: ModelConfig | None) -> ModelConfig:
  config = config or getattr(model, "config", None)
  if not isinstance(config, ModelConfig):
    raise TypeError("pass the model's ModelConfig (config=...) for a model without one")
  return config


def shapes(model, config: ModelConfig | None = None) -> dict[str, tuple[tuple[int, ...], Any]]:
  """{canonical path: (shape, dtype)} of a model's checkpoint variables (works on abstract ones)."""
  config = _config_of(model, config)
  out = {}
  for p, var in nnx.to_flat_state(nnx.state(model, CHECKPOINT_VARIABLES)):
    names, stacked = canonical_names(config, p)
    value = var.get_value()
    shape = tuple(value.shape[1:] if stacked else value.shape)
    out |= {name: (shape, value.dtype) for name in names}
  return out


def canonical(model, config: ModelConfig | None = None) -> dict[str, np.ndarray]:
  """{canonical path: host array} of a model's checkpoint variables, in its parameter dtype."""
  config = _config_of(model, config)
  out = {}
  for p, var in nnx.to_flat_state(nnx.state(model, CHECKPOINT_VARIABLES)):
    names, stacked = canonical_names(config, p)
    value = np.asarray(jax.device_get(var.get_value()))
    out |= {name: value[u] if stacked else value for u, name in enumerate(names)}
  return out


def fill(
  model,
  values: Mapping[str, Any] | Callable[[str, tuple[int, ...]], Any],
  config: ModelConfig | None = None,
  *,
  strict: bool = True,
) -> None:
  """Writes canonical values into `model`'s checkpoint variables, in place (either layout).

  `values` maps canonical paths to arrays, or is a function `(path, shape) -> array` that reads one
  on demand (a stacked variable is assembled layer by layer on the host, then moved to the device
  once). Each value must have the variable's shape; it is cast to the variable's dtype. With
  `strict`, every checkpoint variable must be given and no unknown path may be; otherwise the
  variables not given keep their values.
  """
  config = _config_of(model, config)
  read = values if callable(values) else None
  known = shapes(model, config)
  if read is None:
    unknown = sorted(set(values) - set(known))
    missing = sorted(set(known) - set(values)) if strict else []
    if unknown or missing:
      raise ValueError(
        f"surgery.fill: values for unknown paths {unknown[:8]} and none for {missing[:8]} "
        f"(the model's paths are canonical, e.g. {next(iter(known), '')!r})"
      )
    read = lambda name, shape: values[name]

  def get(name: str, shape, dtype):
    value = np.asarray(read(name, shape))
    if tuple(value.shape) != tuple(shape):
      raise ValueError(f"surgery.fill: {name} has shape {value.shape}, the model's is {shape}")
    return value.astype(dtype, copy=False)

  updates = []
  for p, var in nnx.to_flat_state(nnx.state(model, CHECKPOINT_VARIABLES)):
    names, stacked = canonical_names(config, p)
    if not callable(values) and not strict and not all(n in values for n in names):
      continue
    target = var.get_value()
    if stacked:
      value = np.empty(target.shape, target.dtype)
      for u, name in enumerate(names):
        value[u] = get(name, target.shape[1:], target.dtype)
    else:
      value = get(names[0], target.shape, target.dtype)
    updates.append((p, var.replace(jax.device_put(value))))
  nnx.update(model, nnx.from_flat_state(updates))


# ----------------------------------------------------------------------------------------------------
# Sources: one canonical array from a foreign checkpoint's tensors, and back.


@dataclasses.dataclass(frozen=True)
class Copy:
  """A tensor of the parameter's shape (embedding, norm scales, e_score_correction_bias)."""

  key: str

  def hf_shapes(self, shape):
    return {self.key: tuple(shape)}

  def load(self, read, shape):
    return read(self.key)

  def export(self, value):
    return {self.key: value}


@dataclasses.dataclass(frozen=True)
class Flat:
  """A flat vector reshaped to the parameter (q/k/v biases [H*A] -> [H, A], OLMoE's q/k norms)."""

  key: str

  def hf_shapes(self, shape):
    return {self.key: (math.prod(shape),)}

  def load(self, read, shape):
    return read(self.key).reshape(shape)

  def export(self, value):
    return {self.key: value.reshape(-1)}


@dataclasses.dataclass(frozen=True)
class Linear:
  """An nn.Linear weight [out, in] -> kernel [*in, *out] = weight.T reshaped; `num_in` axes in."""

  key: str
  num_in: int = 1

  def hf_shapes(self, shape):
    return {self.key: (math.prod(shape[self.num_in :]), math.prod(shape[: self.num_in]))}

  def load(self, read, shape):
    return read(self.key).T.reshape(shape)

  def export(self, value):
    n_in = math.prod(value.shape[: self.num_in])
    return {self.key: value.reshape(n_in, -1).T}


@dataclasses.dataclass(frozen=True)
class Experts:
  """E per-expert Linear weights [out, in] -> [E, in, out] (hub layout); 1-D per-expert tensors
  [n] -> [E, n] (a kind's own per-expert vectors)."""

  keys: tuple[str, ...]

  def hf_shapes(self, shape):
    if len(shape) == 2:
      return {k: (shape[1],) for k in self.keys}
    _, d_in, d_out = shape
    return {k: (d_out, d_in) for k in self.keys}

  def load(self, read, shape):
    if len(shape) == 2:
      return np.stack([read(k) for k in self.keys])
    return np.stack([read(k).T for k in self.keys])  # [E, in, out]

  def export(self, value):
    if value.ndim == 2:
      return {k: value[e] for e, k in enumerate(self.keys)}
    return {k: value[e].T for e, k in enumerate(self.keys)}


@dataclasses.dataclass(frozen=True)
class FusedExperts:
  """transformers 5's fused experts: `gate_up_proj` [E, 2F, D] (part 0: gate rows, 1: up rows) or
  `down_proj` [E, D, F] (part None) -> [E, D, F] / [E, F, D]."""

  key: str
  part: int | None

  def hf_shapes(self, shape):
    e, d_in, d_out = shape
    return {self.key: (e, d_out * (1 if self.part is None else 2), d_in)}

  def load(self, read, shape):
    w = read(self.key)
    if self.part is not None:
      f = shape[2]
      w = w[:, self.part * f : (self.part + 1) * f]  # [E, F, D]
    return np.swapaxes(w, 1, 2)

  def export(self, value):
    raise NotImplementedError("export writes the per-expert hub layout")


# ----------------------------------------------------------------------------------------------------
# Initialisers.


def read_run(workdir: str | Path, step: int | None = None) -> tuple[dict[str, np.ndarray], Any]:
  """(canonical values, ModelConfig) of a training run's checkpoint (default: its latest)."""
  from moejax.train.trainer import load_run

  model, model_config, _ = load_run(workdir, step)
  return canonical(model, model_config), model_config


def init_kind(spec: str) -> tuple[str, str]:
  """('hf' | 'run' | 'function', target) of an `init_from` string (see the module docstring)."""
  if not isinstance(spec, str) or not spec:
    raise ValueError(f"config.train.init_from={spec!r}: expected hf:DIR, run:DIR, DIR or module:fn")
  for kind in ("hf", "run"):
    if spec.startswith(kind + ":"):
      return kind, spec[len(kind) + 1 :]
  path = Path(spec)
  if path.is_dir():
    config = path / "config.json"
    if config.is_file() and "model_type" in json.loads(config.read_text()):
      return "hf", spec
    return "run", spec
  if ":" in spec and not spec.startswith("/"):
    return "function", spec
  raise ValueError(
    f"config.train.init_from={spec!r} is neither a directory nor module:function; allowed: "
    "hf:DIR (Hugging Face checkpoint), run:DIR (a moejax run), DIR, or module:function"
  )


def _function(target: str) -> Callable:
  module, _, name = target.partition(":")
  try:
    fn = getattr(importlib.import_module(module), name)
  except (ImportError, AttributeError) as e:
    raise ValueError(
      f"config.train.init_from={target!r}: cannot import {name!r} from {module!r} ({e})"
    ) from None
  if not callable(fn):
    raise ValueError(f"config.train.init_from={target!r} is not callable")
  return fn


def initial_values(
  spec: str, config: ModelConfig, current: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
  """The canonical values a run with model `config` starts from, given its fresh ones `current`."""
  kind, target = init_kind(spec)
  if kind == "hf":
    from moejax.interop.hf import read_hf

    return read_hf(target, config)
  if kind == "run":
    values, _ = read_run(target)
  else:
    values = _function(target)(dict(current), config)
  expected = {k: v.shape for k, v in current.items()}
  got = {k: tuple(np.shape(v)) for k, v in values.items()}
  if got != expected:
    wrong = sorted(k for k in expected.keys() & got.keys() if expected[k] != got[k])
    raise ValueError(
      f"config.train.init_from={spec!r} does not fit the model: missing {sorted(expected.keys() - got.keys())[:6]}, "
      f"unknown {sorted(got.keys() - expected.keys())[:6]}, wrong shapes "
      f"{[(k, got[k], expected[k]) for k in wrong[:4]]}"
    )
  return values

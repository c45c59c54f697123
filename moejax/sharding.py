"""Device meshes and the one place where logical axes meet mesh axes.

Model code names the dimensions of its parameters and activations with *logical* axes (`batch`,
`seq`, `embed`, `mlp`, `heads`, `kv`, `expert`, `vocab`; parameters carry them as `logical_axes`
metadata). `LOGICAL_RULES` maps each to a *mesh* axis (`data`, `fsdp`, `expert`, `tensor`), and the
mesh shape comes from the experiment config (`config.mesh`). Changing the parallel layout is a config
change; no model code moves.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Mapping

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "expert", "tensor")

# logical axis -> mesh axis (or axes); None = replicated.
LOGICAL_RULES: dict[str, str | tuple[str, ...] | None] = {
  "batch": ("data", "fsdp"),
  "seq": None,
  "embed": "fsdp",
  "mlp": "tensor",
  "heads": "tensor",
  "kv": None,
  "expert": "expert",
  "vocab": "tensor",
  "layers": None,
}


_RULES: contextvars.ContextVar[dict | None] = contextvars.ContextVar("moejax_rules", default=None)


def logical_rules(expert_axes: str | tuple[str, ...] | None = None) -> dict:
  """LOGICAL_RULES with the MoE layers' expert axes replaced (MoE Parallel Folding).

  `expert_axes` names the mesh axes that split the experts, e.g. "expert" (the default), or
  "expert,tensor" to fold the attention's tensor-parallel devices into expert parallelism (Liu et al.
  2025): attention then runs over data x tensor while the MoE layers run over data x expert x tensor,
  and the experts' hidden dimension is no longer split (a mesh axis is used once per array).
  """
  rules = dict(LOGICAL_RULES)
  if expert_axes is None:
    return rules
  axes = (
    tuple(a.strip() for a in expert_axes.split(","))
    if isinstance(expert_axes, str)
    else expert_axes
  )
  axes = tuple(a for a in axes if a)
  bad = [a for a in axes if a not in MESH_AXES]
  if bad or not axes:
    raise ValueError(
      f"config.parallel.expert_axes={expert_axes!r} is invalid: a comma-separated list of mesh axes "
      f"from {MESH_AXES}"
    )
  rules["expert"] = axes[0] if len(axes) == 1 else axes
  return rules


@contextlib.contextmanager
def use_rules(rules: Mapping) -> Iterator[None]:
  """Makes `rules` the logical rules that layers read while tracing (see `current_rules`)."""
  token = _RULES.set(dict(rules))
  try:
    yield
  finally:
    _RULES.reset(token)


def current_rules() -> dict:
  """The rules set by `use_rules`, or LOGICAL_RULES."""
  rules = _RULES.get()
  return dict(LOGICAL_RULES) if rules is None else rules


def mesh_axes_of(logical: str, rules: Mapping | None = None) -> tuple[str, ...]:
  """The mesh axes a logical axis maps to, as a tuple (empty when replicated)."""
  axes = (current_rules() if rules is None else rules).get(logical)
  if axes is None:
    return ()
  return (axes,) if isinstance(axes, str) else tuple(axes)


def mesh_shape(mesh_config: Mapping[str, int], num_devices: int) -> dict[str, int]:
  """Resolves `config.mesh` ({data, fsdp, expert, tensor}; at most one -1) for `num_devices`."""
  sizes = {a: int(mesh_config.get(a, 1)) for a in MESH_AXES}
  unknown = set(mesh_config) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"config.mesh has unknown axes {sorted(unknown)}; known: {MESH_AXES}")
  free = [a for a, s in sizes.items() if s == -1]
  if len(free) > 1:
    raise ValueError(f"config.mesh: only one axis may be -1, got {free}")
  for a, s in sizes.items():
    if s == 0 or s < -1:
      raise ValueError(f"config.mesh.{a}={s} is invalid: must be a positive size or -1")
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if free:
    if num_devices % fixed:
      raise ValueError(
        f"config.mesh: the fixed axes {sizes} use {fixed} devices, which does not divide the "
        f"{num_devices} available"
      )
    sizes[free[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise ValueError(f"config.mesh {sizes} needs {fixed} devices, but {num_devices} are available")
  return sizes


def make_mesh(mesh_config: Mapping[str, int], devices=None) -> Mesh:
  """A mesh over `devices` (default: all) with axes MESH_AXES, sized by `config.mesh`."""
  devices = jax.devices() if devices is None else devices
  sizes = mesh_shape(mesh_config, len(devices))
  return jax.make_mesh(
    tuple(sizes[a] for a in MESH_AXES),
    MESH_AXES,
    axis_types=(AxisType.Auto,) * len(MESH_AXES),
    devices=devices,
  )


def logical_to_spec(logical_axes, rules=None) -> PartitionSpec:
  """PartitionSpec for a tuple of logical axis names (None entries stay replicated).

  A mesh axis is used at most once per array: a later dimension that maps to an axis already used
  stays replicated.
  """
  rules = LOGICAL_RULES if rules is None else rules
  used: set[str] = set()
  spec = []
  for name in logical_axes or ():
    mesh_axes = rules.get(name) if name is not None else None
    if mesh_axes is None:
      spec.append(None)
      continue
    mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
    mesh_axes = tuple(a for a in mesh_axes if a not in used)
    used.update(mesh_axes)
    spec.append(mesh_axes[0] if len(mesh_axes) == 1 else (mesh_axes or None))
  return PartitionSpec(*spec)


def _fit(spec: PartitionSpec, shape, mesh: Mesh) -> PartitionSpec:
  """Drops mesh axes from dimensions they do not divide (e.g. 6 experts on 4 devices)."""
  out = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=False):
    names = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
    size = math.prod(mesh.shape[a] for a in names)
    out.append(axes if names and dim % size == 0 else None)
  return PartitionSpec(*out)


def state_shardings(state, mesh: Mesh, rules=None):
  """NamedShardings for an nnx State (or abstract State) from each Variable's `logical_axes`."""

  def one(variable):
    value = variable.get_value() if isinstance(variable, nnx.Variable) else variable
    axes = (
      variable.get_metadata().get("logical_axes") if isinstance(variable, nnx.Variable) else None
    )
    shape = np.shape(value)
    if axes is not None and len(axes) < len(shape):
      # Layers stacked by a scan carry their per-layer axes; the leading stack axis is replicated.
      axes = (None,) * (len(shape) - len(axes)) + tuple(axes)
    if axes is None or len(axes) != len(shape):
      spec = PartitionSpec()
    else:
      spec = _fit(logical_to_spec(axes, rules), shape, mesh)
    sharding = NamedSharding(mesh, spec)
    return variable.replace(sharding) if isinstance(variable, nnx.Variable) else sharding

  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Sharding of a [B, ...] batch: B over the data-parallel axes."""
  return NamedSharding(mesh, PartitionSpec(LOGICAL_RULES["batch"], *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())

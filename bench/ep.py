"""Expert parallelism on 8 CPU devices: step time and all_to_all bytes for each mesh shape.

    python bench/ep.py --out runs/bench_ep.json
    python bench/ep.py --skew 3 --meshes "data=1,expert=8;data=2,expert=4"

The script asks XLA for 8 host devices (`--xla_force_host_platform_device_count=8`, appended to
XLA_FLAGS before jax is imported) and runs on the CPU. The 8 fake devices share this host's cores, so
a step time here measures the *overhead* of expert parallelism (the shard_map body, the padded
all_to_all buffers, LLEP's planning and weight transfers) against the single-device layer, not how
it scales: a mesh row slower than the single-device row is the expected result on one host.

For every mesh in `--meshes` the `moejax.moe.MoE` layer runs twice, as plain EP and as Least-Loaded
EP (LLEP; Nguyen et al. 2026; `MoEConfig.llep_alpha=--llep-alpha`), and once more on one device
without a mesh: the reference row, whose output every other row must reproduce. A mesh is
`axis=size` pairs joined by commas, meshes joined by semicolons; axes are those of
`moejax.sharding.MESH_AXES` (data, fsdp, expert, tensor), omitted axes have size 1, and the sizes
must multiply to 8. The default list: data x expert 1x8, 2x4, 4x2, 8x1; data x fsdp x expert 2x2x2;
data x expert x tensor 2x2x2 (the experts' hidden dimension split over `tensor`).

The input x is [8, T/8, D] (float32), its batch split over (data, fsdp, expert) and the parameters
placed by `moejax.sharding.state_shardings`; the step runs under `jax.set_mesh(mesh)`, where the layer
takes its shard_map path (on CPU the `padded` all_to_all transport, the only one XLA:CPU compiles).
One step is the gradient of sum(y * cot) with respect to every parameter and x, one `jax.jit`; the
first call (compile) and `--warmup` more are not timed, and the table reports the median of
`--repeats` timed calls in milliseconds.

Columns: `a2a MiB/step` is forward + backward, twice the forward `a2a_bytes` the layer reports (the
bytes one device sends through all_to_all, its self-send excluded, mean over devices; with LLEP it
includes the spilled experts' weights). Loads are the token copies each device computes (devices
that differ only in `tensor` compute the same copies and appear once); `native max load` is the
busiest device's load without LLEP; `max/mean` is the imbalance. `max abs(y - y_1)` compares the
output with the single-device row's; the JSON rows also hold the relative errors of y and of every
gradient.

`--skew S` skews the routing as tests/moe/test_parallel.py does: x gets mean 1 and the router kernel
of experts 0 and 1 gets +S/D, raising their logits by about S, so the device that owns them gets
most of the copies (a bare `--skew` is S=3: 90% of them on data1xexpert8 at the default shapes).
Without it (S=0) the routing is that of the randomly initialised router, close to balanced.
"""

from __future__ import annotations

import os

# Before jax is imported: the device count is fixed when its CPU backend starts. Under pytest,
# tests/conftest.py has already set both flags, and importing this file changes nothing. One LLVM
# codegen part halves XLA:CPU's compile time on a 2-core machine (see tests/conftest.py).
_DEVICES_FLAG = "--xla_force_host_platform_device_count=8"
for _flag in (_DEVICES_FLAG, "--xla_cpu_parallel_codegen_split_count=1"):
  if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from typing import Any  # noqa: E402

import flax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from moejax import hostmem, sharding  # noqa: E402
from moejax.benchmarking import (  # noqa: E402
  cpu_count,
  cpu_name,
  markdown_table,
  time_call,
  write_rows,
)
from moejax.moe import MoE, MoEConfig  # noqa: E402

NUM_DEVICES = 8
DEFAULT_MESHES = (
  "data=1,expert=8;data=2,expert=4;data=4,expert=2;data=8,expert=1;"
  "data=2,fsdp=2,expert=2;data=2,expert=2,tensor=2"
)
# `--skew` raises the logits of these experts (0 and 1, both owned by the first EP device).
HOT_EXPERTS = 2
SKEW = 3.0  # the boost a bare `--skew` gives them
SINGLE = "single"  # the mesh label of the single-device reference row


def parse_meshes(spec: str) -> list[dict[str, int]]:
  """Parses --meshes: 'data=2,expert=4;data=8' -> [{"data": 2, "expert": 4}, {"data": 8}]."""
  meshes = []
  for text in filter(None, (m.strip() for m in spec.split(";"))):
    mesh = {}
    for pair in filter(None, (p.strip() for p in text.split(","))):
      axis, _, size = pair.partition("=")
      axis = axis.strip()
      if axis not in sharding.MESH_AXES or axis in mesh or not size.strip().isdigit():
        raise ValueError(
          f"--meshes: {pair!r} in {text!r} is invalid: want axis=size with a distinct axis from "
          f"{sharding.MESH_AXES} and a positive integer size, e.g. 'data=2,expert=4'"
        )
      mesh[axis] = int(size)
    if math.prod(mesh.values()) != NUM_DEVICES:
      raise ValueError(f"--meshes: {text!r} uses {math.prod(mesh.values())} devices, not 8")
    meshes.append(mesh)
  if not meshes:
    raise ValueError(f"--meshes={spec!r} names no mesh")
  return meshes


def mesh_label(mesh: dict[str, int] | None) -> str:
  """{"data": 2, "expert": 4} -> "data2xexpert4"; None (one device, no mesh) -> "single"."""
  return SINGLE if mesh is None else "x".join(f"{axis}{size}" for axis, size in mesh.items())


def build_layer(config: MoEConfig, *, seed: int, skew: float) -> MoE:
  """The layer of `config` with seed-`seed` weights, its router kernel biased by `skew`."""
  layer = MoE(config, rngs=nnx.Rngs(seed))
  layer.router.deterministic = True
  if skew:
    bias = skew / config.d_model
    layer.router.kernel[...] = layer.router.kernel[...].at[:, :HOT_EXPERTS].add(bias)
  return layer


def with_config(layer: MoE, config: MoEConfig) -> MoE:
  """The weights of `layer` in a layer built from `config` (which must give the same parameters)."""
  abstract = nnx.eval_shape(lambda: MoE(config, rngs=nnx.Rngs(0)))  # structure only, no compute
  return nnx.merge(nnx.graphdef(abstract), nnx.state(layer))


def bench_layer(
  layer: MoE,
  x: jax.Array,
  cot: jax.Array,
  mesh: jax.sharding.Mesh | None,
  *,
  repeats: int,
  warmup: int,
) -> dict[str, Any]:
  """Times the jitted forward+backward of `layer` on x [B, S, D], under `mesh` (None: one device).

  Returns ms, y [B, S, D], the gradients (params, x) as numpy arrays and the layer's stats.
  """
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

  def loss_fn(params, x, cot):
    y, aux = nnx.merge(graphdef, params, rest)(x)
    return jnp.sum(y * cot), (y, aux)

  step = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True))
  run = lambda: jax.block_until_ready(step(params, x, cot))
  if mesh is None:
    ms, out = time_call(run, repeats=repeats, warmup=warmup)
  else:
    params = jax.device_put(params, sharding.state_shardings(params, mesh))
    tokens = NamedSharding(mesh, P(("data", "fsdp", "expert")))  # batch over the token axes
    x, cot = jax.device_put((x, cot), tokens)
    with jax.set_mesh(mesh):
      ms, out = time_call(run, repeats=repeats, warmup=warmup)
  (_, (y, aux)), grads = out
  return {
    "ms": ms,
    "y": np.asarray(y),
    "grads": [np.asarray(g) for g in jax.tree.leaves(grads)],
    "aux": {k: np.asarray(v) for k, v in aux.items()},
  }


def _max_rel_diff(a: np.ndarray, ref: np.ndarray) -> float:
  return float(np.max(np.abs(a - ref)) / (np.max(np.abs(ref)) or 1.0))


def make_row(result: dict[str, Any], ref: dict[str, Any], **fields) -> dict[str, Any]:
  """One table row: `fields` (the settings), then timing, bytes, loads and errors vs `ref`."""
  aux = result["aux"]
  load, native = aux["device_load"], aux["native_device_load"]
  return fields | {
    "step_ms": result["ms"],
    "a2a_bytes_per_step": 2 * float(aux["a2a_bytes"]),  # forward + backward
    "a2a_mib_per_step": 2 * float(aux["a2a_bytes"]) / 2**20,
    "device_load": [int(v) for v in load],
    "max_device_load": int(load.max()),
    "mean_device_load": float(load.mean()),
    "device_imbalance": float(load.max() / load.mean()),
    "native_device_load": [int(v) for v in native],
    "native_max_device_load": int(native.max()),
    "dropped_fraction": float(aux["dropped_fraction"]),
    "y_max_abs_diff": float(np.max(np.abs(result["y"] - ref["y"]))),
    "y_max_rel_diff": _max_rel_diff(result["y"], ref["y"]),
    "grad_max_rel_diff": max(
      _max_rel_diff(g, g_ref) for g, g_ref in zip(result["grads"], ref["grads"], strict=True)
    ),
  }


def format_table(rows: list[dict[str, Any]], header: str) -> str:
  columns = [
    ("mesh", "mesh", "s"),
    ("llep", "llep", ""),
    ("step_ms", "step_ms", ".1f"),
    ("a2a MiB/step", "a2a_mib_per_step", ".2f"),
    ("max load", "max_device_load", "d"),
    ("mean load", "mean_device_load", ".1f"),
    ("max/mean", "device_imbalance", ".2f"),
    ("native max load", "native_max_device_load", "d"),
    ("device loads", "loads", "s"),
    ("dropped", "dropped_fraction", ".3f"),
    ("max abs(y - y_1)", "y_max_abs_diff", ".1e"),
  ]
  shown = [row | {"loads": " ".join(str(v) for v in row["device_load"])} for row in rows]
  return markdown_table(shown, columns, header)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  p.add_argument(
    "--meshes",
    default=DEFAULT_MESHES,
    help="semicolon-separated meshes of comma-separated axis=size over data, fsdp, expert, tensor "
    "(omitted axes: 1; 8 devices each), e.g. 'data=2,expert=4;data=2,fsdp=2,expert=2'",
  )
  p.add_argument("--tokens", type=int, default=4096, help="tokens T per step, x is [8, T/8, D]")
  p.add_argument("--d-model", type=int, default=256, help="model width D")
  p.add_argument("--hidden", type=int, default=512, help="hidden width F of each expert")
  p.add_argument("--experts", type=int, default=16, help="routed experts E")
  p.add_argument("--top-k", type=int, default=2, help="experts per token K")
  p.add_argument("--dispatch", default="dropless", choices=("dropless", "capacity"))
  p.add_argument("--capacity-factor", type=float, default=1.0, help="for --dispatch capacity")
  p.add_argument("--llep-alpha", type=float, default=1.1, help="MoEConfig.llep_alpha of LLEP rows")
  p.add_argument("--llep-slots", type=int, default=1, help="MoEConfig.llep_slots of LLEP rows")
  p.add_argument(
    "--skew",
    type=float,
    nargs="?",
    const=SKEW,
    default=0.0,
    metavar="S",
    help=f"raise the logits of experts 0 and 1 by about S (bare --skew: {SKEW}; default: no skew)",
  )
  p.add_argument("--repeats", type=int, default=5, help="timed calls; the median is reported")
  p.add_argument("--warmup", type=int, default=1, help="untimed calls after the first")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=None, help="write the rows as a JSON list to this file")
  return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
  args = parse_args(argv)
  hostmem.retain_host_memory()  # reuse freed buffers across steps, for JAX and PyTorch alike
  meshes = parse_meshes(args.meshes)
  if jax.device_count() < NUM_DEVICES:
    raise RuntimeError(
      f"bench/ep.py needs {NUM_DEVICES} devices but jax has {jax.device_count()}: jax was imported "
      f"before this file could add {_DEVICES_FLAG} to XLA_FLAGS; set it in the environment"
    )
  t, d, f, e, k = args.tokens, args.d_model, args.hidden, args.experts, args.top_k
  if t % NUM_DEVICES:
    raise ValueError(f"--tokens={t} is invalid: x is [8, T/8, D], so it must be a multiple of 8")
  timing = dict(repeats=args.repeats, warmup=args.warmup)

  base = dict(d_model=d, num_experts=e, top_k=k, expert_hidden_dim=f, dispatch=args.dispatch)
  base |= dict(capacity_factor=args.capacity_factor)
  configs = {
    False: MoEConfig(**base),
    True: MoEConfig(**base, llep_alpha=args.llep_alpha, llep_slots=args.llep_slots),
  }
  layer = build_layer(configs[False], seed=args.seed, skew=args.skew)
  rng = np.random.default_rng(args.seed + 1)  # numpy, not jax.random: eager jax ops each compile
  shape = (NUM_DEVICES, t // NUM_DEVICES, d)
  x = jnp.asarray(rng.standard_normal(shape, np.float32) + (1.0 if args.skew else 0.0))
  cot = jnp.asarray(rng.standard_normal(shape, np.float32))

  settings = dict(
    E=e, tokens=t, d_model=d, hidden=f, top_k=k, dispatch=args.dispatch,
    capacity_factor=args.capacity_factor, skew=args.skew, dtype="float32",
  )  # fmt: skip
  versions = f"jax {jax.__version__}, flax {flax.__version__}"
  common = dict(repeats=args.repeats, warmup=args.warmup, platform=jax.devices()[0].platform)
  common |= dict(cores=cpu_count(), versions=versions)
  no_llep = dict(llep=False, llep_alpha=None, llep_slots=None)

  ref = bench_layer(layer, x, cot, None, **timing)
  rows = [make_row(ref, ref, mesh=SINGLE, devices=1, **no_llep, **settings, **common)]
  print(f"{SINGLE}: {ref['ms']:.1f} ms", file=sys.stderr, flush=True)
  for mesh_config in meshes:
    mesh, label = sharding.make_mesh(mesh_config), mesh_label(mesh_config)
    for llep in (False, True):
      result = bench_layer(with_config(layer, configs[llep]), x, cot, mesh, **timing)
      llep_fields = dict(llep=True, llep_alpha=args.llep_alpha, llep_slots=args.llep_slots)
      fields = dict(mesh=label, devices=NUM_DEVICES, **(llep_fields if llep else no_llep))
      rows.append(make_row(result, ref, **fields, **settings, **common))
      print(f"{label} llep={llep}: {result['ms']:.1f} ms", file=sys.stderr, flush=True)

  dispatch = args.dispatch + (
    f" capacity_factor={args.capacity_factor}" if args.dispatch == "capacity" else ""
  )
  header = (
    f"MoE layer forward+backward under expert parallelism, float32, T={t} (x [{shape[0]}, "
    f"{shape[1]}, {d}]) D={d} F={f} E={e} top-{k}, dispatch={dispatch}, skew={args.skew}; LLEP "
    f"rows: llep_alpha={args.llep_alpha} llep_slots={args.llep_slots}; {NUM_DEVICES} fake CPU "
    f"devices sharing {cpu_count()} cores ({cpu_name()}), so times show overhead, not scaling; "
    f"{versions}; padded all_to_all; median of {args.repeats} after compile + "
    f"{args.warmup} warm-up, ms; a2a = bytes one device sends per forward+backward"
  )
  print(format_table(rows, header))
  write_rows(args.out, rows)
  return rows


if __name__ == "__main__":
  main()

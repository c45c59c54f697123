"""MoE layer forward+backward on CPU: moejax vs a dense SwiGLU of equal FLOPs vs transformers' Mixtral.

    python bench/moe_layer.py --out runs/bench_moe_layer.json   # and the plot bench_moe_layer.png

Defaults: T=4096 tokens, D=512, expert hidden F=1024, top-2, E in {8, 32, 128, 256}, float32 and
bfloat16 (`--dtypes`). For every (dtype, E), one process measures, the contenders taking turns:

- `moejax`: `moejax.moe.MoE` (dropless dispatch, `gmm_backend="auto"` unless told otherwise);
- `capacity`: the same layer with capacity dispatch, capacity_factor=1.0 (reference column);
- `dense`: a dense SwiGLU FFN of hidden K*F (the useful FLOPs of K experts of hidden F), in JAX;
- `hf`: transformers' `MixtralSparseMoeBlock` in PyTorch, with the weights of the moejax layer, so
  both route every token to the same experts (the table reports max |y_moejax - y_hf|);
- `torch_dense`: the dense SwiGLU in PyTorch, so that `hf/torch_dense` compares like with like
  (`hf/dense` mixes PyTorch's and XLA's matmuls).

"forward+backward" is the gradient of sum(y * cot) with respect to every parameter and the input x.
Each JAX step is one `jax.jit`, compiled ahead of time (`.lower(...).compile()`). Every
contender's first call and `--warmup` further calls are not timed; then each round times one call of
every contender in turn (`moejax.benchmarking.time_interleaved`), so that the machine's drift in
speed (20-30% within an hour on our 2-core VM) slows them alike, and the table reports each one's
median over `--repeats` rounds in milliseconds. PyTorch runs with `torch.set_num_threads` set to
the cores XLA:CPU uses, so both frameworks get the same cores.

A bfloat16 row holds the parameters, x, the cotangent and the activations in bfloat16 in all four
implementations (`MoEConfig(dtype=param_dtype=bfloat16)`, `module.to(torch.bfloat16)`); moejax's
router computes in float32 regardless, as does Mixtral's softmax (its router logits are bfloat16).
`max abs(y - y_hf)` is taken in float32 from the two outputs of the row's dtype, so a bfloat16
row reads against bfloat16's resolution (2^-8 relative), not float32's; and since Mixtral rounds
its router logits to bfloat16 before the softmax, a near-tie between two experts can send a token
to another expert than moejax's float32 router does, which puts an O(|y|) difference in that row.

Peak memory (`*_peak_mib`, MiB) is XLA's buffer-assignment peak of the compiled forward+backward
step, from `Compiled.memory_analysis()`: argument + output + temporary bytes - aliased bytes, the
live bytes of the step (its inputs, including the parameters; its outputs, including the
gradients; and the temporaries such as the saved activations). It is measured for the JAX steps
(moejax, dense, capacity), not for PyTorch; `moejax_peak/dense_peak` compares the layer with the
dense FFN of the same active FLOPs.

Every (dtype, E) row is measured in a fresh process (`--no-isolate`: all in this one). Run one
after the other in one process, the layer at E=128 measured 1.2 s in one run and 2.0 s in another,
after the larger and the PyTorch steps had left the host heap fragmented (moejax.hostmem keeps
freed memory in the process); within a row's process the implementations take turns (dense,
moejax, capacity, transformers, PyTorch dense).

Options beyond the shapes: `--dtypes float32,bfloat16`; `--plot FILE.png` draws time against E
(log2 axis) at fixed active FLOPs, one panel per dtype, for moejax, transformers, the dense FFNs and
capacity dispatch (default: the `--out` path with `.png`; `--plot none` draws nothing).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax import hostmem
from moejax.benchmarking import (
  cpu_count,
  cpu_name,
  keep_latest,
  markdown_table,
  time_interleaved,
  torch_threads,
  write_rows,
)
from moejax.moe import MoE, MoEConfig

# The experts implementation that `MixtralForCausalLM(config)` resolves to by default in transformers
# 5.23 (`PreTrainedModel.get_correct_experts_implementation(None)` -> "grouped_mm", i.e.
# `torch.nn.functional.grouped_mm` over expert-sorted rows). A bare `MixtralSparseMoeBlock` built
# outside a model has `config._experts_implementation = None` and falls back to the "eager" Python
# loop over experts, so the config names the implementation explicitly.
HF_EXPERTS_DEFAULT = "grouped_mm"
HF_EXPERTS = ("grouped_mm", "eager", "batched_mm")
# The dtypes a row can run in: name -> JAX dtype (PyTorch's has the same name).
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def peak_mib(compiled: jax.stages.Compiled) -> float | None:
  """XLA's buffer-assignment peak of a compiled step in MiB: argument + output + temporary bytes
  - aliased bytes (None where the backend reports no memory analysis).

  Not `peak_memory_in_bytes`: on XLA:CPU (jax 0.10.2) that field comes out at about the argument +
  output bytes, leaving out the temporaries that hold the saved activations.
  """
  m = compiled.memory_analysis()
  if m is None:
    return None
  live = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
  return (live - m.alias_size_in_bytes) / 2**20


def _compile(fn: Callable, *args) -> tuple[jax.stages.Compiled, float | None]:
  """`jax.jit(fn)` compiled for `args`, and its peak memory in MiB (see `peak_mib`)."""
  compiled = jax.jit(fn).lower(*args).compile()
  return compiled, peak_mib(compiled)


# A contender: (run, result). `run()` does one forward+backward and waits for it, keeping only its
# latest outputs alive (`keep_latest`); `result()` reads what the row needs from the latest call.
Runner = tuple[Callable[[], None], Callable[[], Any]]


def moejax_runner(layer: MoE, x: jax.Array, cot: jax.Array) -> tuple[Runner, float | None]:
  """The jitted forward+backward of `layer` on x [B, S, D], and its peak MiB; the Runner's
  result() is y [B, S, D] as float32."""
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

  def loss_fn(params, x, cot):
    y, _ = nnx.merge(graphdef, params, rest)(x)  # aux losses are unused, so XLA drops them
    return jnp.sum(y * cot), y

  step, peak = _compile(jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True), params, x, cot)
  run, latest = keep_latest(lambda: jax.block_until_ready(step(params, x, cot)))
  return (run, lambda: np.asarray(latest()[0][1], np.float32)), peak


def dense_runner(
  x: jax.Array, cot: jax.Array, hidden: int, *, seed: int = 0
) -> tuple[Runner, float | None]:
  """Forward+backward of a dense SwiGLU FFN D -> hidden -> D on x [B, S, D], with parameters in
  x's dtype, and its peak MiB."""
  d = x.shape[-1]
  rng = np.random.default_rng(seed)  # numpy, not jax.random: eager jax ops each compile
  normal = lambda *shape: jnp.asarray(
    rng.standard_normal(shape, np.float32) / np.sqrt(shape[0]), x.dtype
  )
  params = {"w_gate": normal(d, hidden), "w_up": normal(d, hidden), "w_down": normal(hidden, d)}

  def loss_fn(p, x, cot):
    x = x.reshape(-1, d)  # [T, D], as the MoE layer does
    y = (jax.nn.silu(x @ p["w_gate"]) * (x @ p["w_up"])) @ p["w_down"]  # [T, D]
    return jnp.sum(y * cot.reshape(-1, d))

  step, peak = _compile(jax.grad(loss_fn, argnums=(0, 1)), params, x, cot)
  return keep_latest(lambda: jax.block_until_ready(step(params, x, cot))), peak


def _torch_dtype(dtype) -> Any:
  import torch

  return getattr(torch, np.dtype(dtype).name)  # float32 -> torch.float32, bfloat16 -> ...


def _to_torch(a, dtype=None) -> Any:
  """A writable copy of `a` as a torch tensor of `dtype` (default float32), through float32."""
  import torch

  return torch.from_numpy(np.array(a, np.float32)).to(dtype or torch.float32)


def _torch_runner(module: Any, x: jax.Array, cot: jax.Array) -> Runner:
  """Forward + `sum(y * cot).backward()` of a torch module on x and cot in their own dtype (the
  module must hold that dtype); the Runner's result() is y as float32 numpy."""
  dtype = _torch_dtype(x.dtype)
  x_t, cot_t = _to_torch(x, dtype).requires_grad_(True), _to_torch(cot, dtype)

  def run():
    module.zero_grad(set_to_none=True)  # fresh gradient buffers every call, as JAX makes them
    x_t.grad = None
    y = module(x_t)
    (y * cot_t).sum().backward()
    return y.detach()

  run, latest = keep_latest(run)
  return run, lambda: latest().float().numpy()


def hf_runner(
  layer: MoE, x: jax.Array, cot: jax.Array, *, experts_implementation: str = HF_EXPERTS_DEFAULT
) -> Runner:
  """Forward + `loss.backward()` of transformers' `MixtralSparseMoeBlock` holding the weights of
  the (softmax top-k, SwiGLU) moejax `layer`, in x's dtype; result() is y [B, S, D] float32.

  The block is used as transformers ships it; only its experts implementation is named (see
  `HF_EXPERTS_DEFAULT`). It returns the hidden states alone (router logits are not an output).
  """
  import torch
  from transformers import MixtralConfig
  from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

  c = layer.config
  if c.router != "softmax_topk" or c.activation != "swiglu" or c.num_shared_experts:
    raise ValueError("hf_runner: Mixtral's block is a softmax top-k router over SwiGLU experts.")
  config = MixtralConfig(
    hidden_size=c.d_model,
    intermediate_size=c.expert_hidden_dim,
    num_local_experts=c.num_experts,
    num_experts_per_tok=c.top_k,
    experts_implementation=experts_implementation,
  )
  block = MixtralSparseMoeBlock(config).to(_torch_dtype(x.dtype)).train()
  # Its parameters are created with torch.empty; copy moejax's into Mixtral's layout:
  # router [E, D]; gate_up_proj [E, 2F, D], gate rows first; down_proj [E, D, F]. (`copy_` casts
  # to the block's dtype; the values are the layer's own, so they round to themselves.)
  w_gate, w_up = np.asarray(layer.experts.w_gate[...]), np.asarray(layer.experts.w_up[...])
  with torch.no_grad():
    block.gate.weight.copy_(_to_torch(np.asarray(layer.router.kernel[...]).T))
    block.experts.gate_up_proj.copy_(
      _to_torch(np.concatenate([w_gate.transpose(0, 2, 1), w_up.transpose(0, 2, 1)], axis=1))
    )
    block.experts.down_proj.copy_(
      _to_torch(np.asarray(layer.experts.w_down[...]).transpose(0, 2, 1))
    )
  return _torch_runner(block, x, cot)


def torch_dense_runner(x: jax.Array, cot: jax.Array, hidden: int) -> Runner:
  """Forward+backward of the dense SwiGLU FFN in PyTorch, in x's dtype: the dense bar on torch's
  own matmuls, so that hf/torch_dense compares like with like."""
  import torch

  class SwiGLU(torch.nn.Module):
    def __init__(self, d: int, f: int):
      super().__init__()
      self.gate = torch.nn.Linear(d, f, bias=False)
      self.up = torch.nn.Linear(d, f, bias=False)
      self.down = torch.nn.Linear(f, d, bias=False)

    def forward(self, x):
      h = x.reshape(-1, x.shape[-1])  # [T, D]
      return self.down(torch.nn.functional.silu(self.gate(h)) * self.up(h)).reshape(x.shape)

  torch.manual_seed(0)
  module = SwiGLU(x.shape[-1], hidden).to(_torch_dtype(x.dtype))
  return _torch_runner(module, x, cot)


def _with_config(layer: MoE, config: MoEConfig) -> MoE:
  """The weights of `layer` in a layer built from `config` (which must give the same parameters)."""
  abstract = nnx.eval_shape(lambda: MoE(config, rngs=nnx.Rngs(0)))  # structure only, no compute
  return nnx.merge(nnx.graphdef(abstract), nnx.state(layer))


def _ratio(a: float | None, b: float | None) -> float | None:
  return None if a is None or b is None else a / b


def format_table(rows: list[dict[str, Any]], header: str) -> str:
  columns = [
    ("E", "E", "d"),
    ("dtype", "dtype", "s"),
    ("moejax_ms", "moejax_ms", ".1f"),
    ("dense_ms", "dense_ms", ".1f"),
    ("hf_ms", "hf_ms", ".1f"),
    ("capacity_ms", "capacity_ms", ".1f"),
    ("torch_dense_ms", "torch_dense_ms", ".1f"),
    ("moejax/dense", "moejax_over_dense", ".2f"),
    ("hf/dense", "hf_over_dense", ".2f"),
    ("capacity/dense", "capacity_over_dense", ".2f"),
    ("hf/torch_dense", "hf_over_torch_dense", ".2f"),
    ("moejax/hf", "moejax_over_hf", ".2f"),
    ("moejax_peak_mib", "moejax_peak_mib", ".1f"),
    ("dense_peak_mib", "dense_peak_mib", ".1f"),
    ("capacity_peak_mib", "capacity_peak_mib", ".1f"),
    ("moejax_peak/dense_peak", "moejax_peak_over_dense_peak", ".2f"),
    ("max abs(y - y_hf)", "hf_max_abs_diff", ".1e"),
  ]
  return markdown_table(rows, columns, header)


# (row key, label, matplotlib format) of the plotted lines, in legend order; fixed colours, so a
# line keeps its colour whichever columns ran.
_PLOT_LINES = (
  ("moejax_ms", "moejax ({dispatch})", "o-C0"),
  ("capacity_ms", "moejax capacity (factor {capacity_factor:g})", "s-C1"),
  ("hf_ms", "transformers Mixtral block ({hf_experts})", "^-C2"),
  ("dense_ms", "dense SwiGLU, JAX (hidden K*F)", "--k"),
  ("torch_dense_ms", "dense SwiGLU, PyTorch (hidden K*F)", "--C3"),
)


def plot_scaling(rows: Sequence[dict[str, Any]], path: str | os.PathLike) -> None:
  """Draws forward+backward time against E at fixed active FLOPs to the PNG `path`.

  One panel per dtype (in the rows' order): x is E on a log2 axis with a tick at every measured E,
  y the median ms on a log axis; one line per implementation measured (columns that were skipped,
  all None, are left out).
  """
  from matplotlib.figure import Figure  # Agg canvas: no display, no pyplot state

  dtypes = list(dict.fromkeys(row["dtype"] for row in rows))
  fig = Figure(figsize=(5.5 * len(dtypes), 4.2), layout="constrained")
  axes = fig.subplots(1, len(dtypes), squeeze=False)[0]
  for ax, dtype in zip(axes, dtypes, strict=True):
    panel = sorted((row for row in rows if row["dtype"] == dtype), key=lambda row: row["E"])
    es = [row["E"] for row in panel]
    for key, label, fmt in _PLOT_LINES:
      points = [(row["E"], row[key]) for row in panel if row.get(key) is not None]
      if points:
        ax.plot(*zip(*points, strict=True), fmt, label=label.format(**panel[0]), markersize=4)
    ax.set_xscale("log", base=2)
    ax.set_xticks(es, labels=[str(e) for e in es], minor=False)
    ax.set_xticks([], minor=True)
    ax.set_yscale("log")
    ax.set(xlabel="experts E", ylabel="forward+backward (ms, median)", title=dtype)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="small")
  first = rows[0]
  fig.suptitle(
    f"MoE layer vs E at fixed active FLOPs\nT={first['tokens']} D={first['d_model']} "
    f"F={first['hidden']} top-{first['top_k']} ({first['platform']}, {first['threads']} threads)",
    fontsize="medium",
  )
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=120)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  p.add_argument("--experts", default="8,32,128,256", help="comma-separated numbers of experts E")
  p.add_argument(
    "--dtypes", default="float32,bfloat16", help=f"comma-separated, of {', '.join(DTYPES)}"
  )
  p.add_argument("--tokens", type=int, default=4096, help="tokens T per step (batch 1)")
  p.add_argument("--d-model", type=int, default=512, help="model width D")
  p.add_argument("--hidden", type=int, default=1024, help="hidden width F of each expert")
  p.add_argument("--top-k", type=int, default=2, help="experts per token K")
  p.add_argument("--repeats", type=int, default=5, help="timed calls; the median is reported")
  p.add_argument(
    "--warmup", type=int, default=2, help="untimed calls after the first (the heap settles in 2-3)"
  )
  p.add_argument("--dispatch", default="dropless", choices=("dropless", "capacity"))
  p.add_argument("--backend", default="auto", help="MoEConfig.gmm_backend for dropless dispatch")
  p.add_argument("--capacity-factor", type=float, default=1.0, help="for the capacity column")
  p.add_argument("--skip-capacity", action="store_true", help="no capacity-dispatch column")
  p.add_argument("--skip-hf", action="store_true", help="no PyTorch / transformers column")
  p.add_argument("--hf-experts", default=HF_EXPERTS_DEFAULT, choices=HF_EXPERTS)
  p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=None, help="write the rows as a JSON list to this file")
  p.add_argument(
    "--isolate",
    action=argparse.BooleanOptionalAction,
    default=True,
    help="measure every (dtype, E) row in a fresh process (default; see the module docstring)",
  )
  p.add_argument(
    "--plot",
    default=None,
    help="write the time-vs-E plot to this PNG (default: --out with .png; 'none': no plot)",
  )
  args = p.parse_args(argv)
  args.dtypes = [name.strip() for name in args.dtypes.split(",")]
  for name in args.dtypes:
    if name not in DTYPES:
      p.error(f"--dtypes: unknown dtype {name!r}; known dtypes are {', '.join(DTYPES)}")
  if args.plot is None and args.out:
    args.plot = os.path.splitext(args.out)[0] + ".png"
  elif args.plot is not None and args.plot.lower() == "none":
    args.plot = None
  return args


def _rows_in_subprocesses(argv: Sequence[str], args: argparse.Namespace) -> list[dict[str, Any]]:
  """Runs this script once per (dtype, E) row, each in a fresh process, and returns the rows."""
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for name in args.dtypes:
      for e in args.experts.split(","):
        out = os.path.join(tmp, f"{name}_{e}.json")
        # Later options override earlier ones: the row's E and dtype, its own JSON, no plot.
        cmd = [sys.executable, os.path.abspath(__file__), *argv]
        cmd += ["--experts", e, "--dtypes", name, "--no-isolate", "--out", out, "--plot", "none"]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        with open(out) as f:
          rows += json.load(f)
  return rows


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parse_args(argv)
  # Freed buffers are reused across steps, for JAX and PyTorch alike (see moejax/hostmem.py).
  host_memory = "retained" if hostmem.retain_host_memory() else "glibc default"
  experts = [int(e) for e in args.experts.split(",")]
  t, d, f, k = args.tokens, args.d_model, args.hidden, args.top_k
  threads = args.threads or cpu_count()
  timing = dict(repeats=args.repeats, warmup=args.warmup)

  rng = np.random.default_rng(args.seed + 1)
  x32 = rng.standard_normal((1, t, d), np.float32)  # [B, S, D]
  cot32 = rng.standard_normal((1, t, d), np.float32)  # [B, S, D]

  versions = f"jax {jax.__version__}, flax {flax.__version__}"
  versions_note = f"; host memory {host_memory}"
  if not args.skip_hf:
    import torch
    import transformers

    versions += f", torch {torch.__version__}, transformers {transformers.__version__}"
  devices = jax.devices()
  header = (
    f"MoE layer forward+backward, {', '.join(args.dtypes)}, T={t} D={d} F={f} top-{k}, dense "
    f"SwiGLU hidden {k * f}; {devices[0].platform} x{len(devices)} ({cpu_name()}); "
    f"{versions}{versions_note}; "
    f"threads: XLA:CPU {cpu_count()} cores, torch.set_num_threads({threads}); "
    f"moejax dispatch={args.dispatch} gmm_backend={args.backend}, capacity_factor="
    f"{args.capacity_factor}; hf experts_implementation={args.hf_experts}; median of "
    f"{args.repeats} rounds, contenders in turn, after compile + {args.warmup} warm-up, ms; "
    "peak: XLA buffer assignment of the JAX step (arguments + outputs + temporaries), MiB"
  )

  if args.isolate and len(args.dtypes) * len(experts) > 1:
    rows = _rows_in_subprocesses(argv, args)
  else:
    rows = []
    for name in args.dtypes:
      dtype = DTYPES[name]
      # The same values in every dtype (rounded to it), so the rows differ by precision alone.
      x, cot = jnp.asarray(x32, dtype), jnp.asarray(cot32, dtype)
      for e in experts:
        config = MoEConfig(
          d_model=d,
          num_experts=e,
          top_k=k,
          expert_hidden_dim=f,
          dispatch=args.dispatch,
          gmm_backend=args.backend,
          capacity_factor=args.capacity_factor,
          dtype=dtype,
          param_dtype=dtype,
        )
        layer = MoE(config, rngs=nnx.Rngs(args.seed))
        runners = {}
        runners["dense"], dense_peak = dense_runner(x, cot, k * f, seed=args.seed)
        runners["moejax"], moejax_peak = moejax_runner(layer, x, cot)
        capacity_peak = None
        if not args.skip_capacity:
          capacity_layer = _with_config(layer, config.replace(dispatch="capacity"))
          runners["capacity"], capacity_peak = moejax_runner(capacity_layer, x, cot)
        if not args.skip_hf:
          runners["hf"] = hf_runner(layer, x, cot, experts_implementation=args.hf_experts)
          runners["torch_dense"] = torch_dense_runner(x, cot, k * f)
        # All contenders take turns (see time_interleaved); torch's threads leave XLA's alone.
        with torch_threads(threads) if not args.skip_hf else contextlib.nullcontext():
          ms = time_interleaved({name: run for name, (run, _) in runners.items()}, **timing)
        dense_ms, moejax_ms = ms["dense"], ms["moejax"]
        capacity_ms, hf_ms, torch_dense_ms = (ms.get(n) for n in ("capacity", "hf", "torch_dense"))
        y = runners["moejax"][1]()
        hf_diff = None
        if not args.skip_hf:  # both float32 copies of the row-dtype outputs
          hf_diff = float(np.max(np.abs(y - runners["hf"][1]())))
        del runners
        rows.append(
          {
            "E": e,
            "dtype": name,
            "moejax_ms": moejax_ms,
            "dense_ms": dense_ms,
            "hf_ms": hf_ms,
            "capacity_ms": capacity_ms,
            "moejax_over_dense": moejax_ms / dense_ms,
            "hf_over_dense": _ratio(hf_ms, dense_ms),
            "capacity_over_dense": _ratio(capacity_ms, dense_ms),
            "torch_dense_ms": torch_dense_ms,
            "hf_over_torch_dense": _ratio(hf_ms, torch_dense_ms),
            "moejax_over_hf": _ratio(moejax_ms, hf_ms),
            "moejax_peak_mib": moejax_peak,
            "dense_peak_mib": dense_peak,
            "capacity_peak_mib": capacity_peak,
            "moejax_peak_over_dense_peak": _ratio(moejax_peak, dense_peak),
            "hf_max_abs_diff": hf_diff,
            "tokens": t,
            "d_model": d,
            "hidden": f,
            "top_k": k,
            "dispatch": args.dispatch,
            "backend": args.backend,
            "capacity_factor": args.capacity_factor,
            "hf_experts": None if args.skip_hf else args.hf_experts,
            "threads": threads,
            "host_memory": host_memory,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "platform": devices[0].platform,
            "versions": versions,
          }
        )
        print(
          f"E={e} {name}: moejax {moejax_ms:.1f} ms, dense {dense_ms:.1f} ms",
          file=sys.stderr,
          flush=True,
        )

  print(format_table(rows, header))
  write_rows(args.out, rows)
  if args.plot and rows:
    plot_scaling(rows, args.plot)
    print(f"plot: {args.plot}", file=sys.stderr, flush=True)
  return rows


if __name__ == "__main__":
  main()

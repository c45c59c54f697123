"""Grouped matmul kernels: throughput on an accelerator, correctness and lowering on CPU.

    python bench/gmm.py                                  # CPU: correctness + lowering tables
    python bench/gmm.py --peak-tflops 989 --out runs/bench_gmm_h100.json   # on a GPU
    python bench/gmm.py --peak-tflops 459 --out runs/bench_gmm_v5p.json    # on a TPU

Shapes: one expert shard's grouped matmul of three MoE models (`SHAPES`): `mixtral` (D=4096,
F=14336, E=8, top-2), `deepseek_v3` (D=7168, F=2048, E=256, top-8) and `qwen3_moe` (D=2048, F=768,
E=128, top-8). `--tokens T` tokens each pick top_k distinct experts by a seeded, skewed random
routing (`routed_group_sizes`: Zipf-like expert popularity, Gumbel top-k sampling without
replacement), so the grouped matmul has M = T * top_k rows sorted into E groups of uneven sizes.

On an accelerator (`jax.default_backend()` is gpu or tpu), for each shape and dtype (`--dtypes`,
float32 and bfloat16) it times three ops, each a `jax.jit` compiled ahead of time:

- `fwd`:  out = gmm(x [M, D], w [E, D, F])                      -> [M, F]
- `dlhs`: d x = gmm(d out [M, F], w [E, D, F], transpose_rhs)    -> [M, D]   (w[e].T per group)
- `drhs`: d w = tgmm(x [M, D], d out [M, F])                     -> [E, D, F]

with each kernel the platform has (`xla` = ragged_dot everywhere, `pallas_gpu` on GPU,
`pallas_tpu` on TPU, default tiles), called directly (the kernels that `ops`' VJP calls), and a
`dense` matmul of the same useful FLOPs ([M, D] @ [D, F], [M, F] @ [F, D], [D, M] @ [M, F]). Every
op does 2 * M * D * F useful FLOPs (all M rows are in a group). The time is the median of
`--repeats` calls after the first and `--warmup` more, each waited for with `block_until_ready`;
TFLOP/s = 2 M D F / time, MFU = TFLOP/s / `--peak-tflops` (the vendor's dense peak for the dtype,
never queried from the device; without it MFU is left out), and each row gives its time over the
dense matmul's and over xla's.

On CPU (or with `--cpu-tables` anywhere) it prints instead:
1. a correctness table: each Pallas backend in interpret mode and `xla`, through the public
   `gmm` and its VJP (`jax.vjp`), at a tiny shape derived from each named shape (D and F divided
   by a power of two to at most 256, `small_shape`; E capped to 8; M=64 rows; two experts left
   empty; rows past the groups), forward, d lhs and d rhs, each as
   max |actual - expected| / max |expected| against a float64 per-group numpy loop on the same
   (dtype-rounded) inputs, float32 and bfloat16;
2. a lowering table: at each named shape's full size (M = T * top_k), bfloat16 and default tiles,
   whether `pallas_tpu`'s gmm, gmm with transpose_rhs and tgmm lower for `tpu` and `pallas_gpu`'s
   for `cuda` (`jax.jit(f).trace(...).lower(lowering_platforms=(platform,))` on ShapeDtypeStruct
   inputs, so nothing is allocated; a success holds exactly one Mosaic or Triton kernel call and no
   other custom call), the seconds each lowering took, or the error's first line;
3. a line saying that timings need an accelerator.

Options: `--shapes mixtral,qwen3_moe` (a subset), `--dtypes`, `--tokens`, `--repeats`,
`--warmup`, `--peak-tflops`, `--seed`, `--out FILE.json` (the rows; on CPU a list of
{"table": "correctness" | "lowering", ...} rows).
"""

from __future__ import annotations

import argparse
import functools
import re
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from moejax.benchmarking import markdown_table, time_call, write_rows
from moejax.kernels import gmm
from moejax.kernels.grouped_matmul import pallas_gpu, pallas_tpu, xla


class Shape(NamedTuple):
  d: int  # model dim (gmm's contraction dim in the forward)
  f: int  # expert hidden dim
  e: int  # experts (groups)
  top_k: int


SHAPES: dict[str, Shape] = {
  "mixtral": Shape(d=4096, f=14336, e=8, top_k=2),
  "deepseek_v3": Shape(d=7168, f=2048, e=256, top_k=8),
  "qwen3_moe": Shape(d=2048, f=768, e=128, top_k=8),
}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
OPS = ("fwd", "dlhs", "drhs")

# The kernels each accelerator platform has; `dense` is the reference matmul.
PLATFORM_BACKENDS = {"gpu": ("xla", "pallas_gpu"), "tpu": ("xla", "pallas_tpu")}
KERNELS = {"xla": xla, "pallas_gpu": pallas_gpu, "pallas_tpu": pallas_tpu}

# Correctness (CPU): interpret-mode tiles small enough for the tiny shapes.
INTERPRET_OPTIONS = {
  "pallas_tpu": {"tm": 8, "tk": 128, "tn": 128, "interpret": True},
  "pallas_gpu": {"bm": 16, "bk": 16, "bn": 32, "interpret": True},
  "xla": None,
}
SMALL_ROWS = 64  # M of the correctness shapes
SMALL_ROUTED = 56  # rows in a group; the last 8 belong to none (their outputs must be zero)
SMALL_MAX_EXPERTS = 8
# Lowering (CPU): (backend, platform) pairs.
LOWERINGS = (("pallas_tpu", "tpu"), ("pallas_gpu", "cuda"))
# The custom call each Pallas backend lowers to; a lowering counts as a success only if the module
# holds exactly one of them and no other custom call (no host callback, no ragged_dot fallback).
KERNEL_CALL = {"pallas_tpu": "tpu_custom_call", "pallas_gpu": "__gpu$xla.gpu.triton"}
_CUSTOM_CALL = re.compile(r'custom_call @([\w.$]+)|call_target_name = "([\w.$]+)"')


def routed_group_sizes(
  tokens: int, experts: int, top_k: int, *, seed: int, skew: float = 1.0, empty=()
) -> np.ndarray:
  """Rows per expert [E] when each of `tokens` tokens picks `top_k` distinct experts.

  Expert popularity is Zipf-like, p ∝ 1 / (rank + 1)^skew over a seeded random ranking, and each
  token samples its experts without replacement (Gumbel top-k), so sum = tokens * top_k. Experts
  in `empty` get probability zero (no rows).
  """
  rng = np.random.default_rng(seed)
  p = 1.0 / (rng.permutation(experts) + 1.0) ** skew
  p[list(empty)] = 0.0
  with np.errstate(divide="ignore"):
    keys = np.log(p / p.sum()) + rng.gumbel(size=(tokens, experts))
  chosen = np.argpartition(-keys, top_k - 1, axis=1)[:, :top_k]  # [T, k] distinct experts
  return np.bincount(chosen.ravel(), minlength=experts).astype(np.int32)


# -- the accelerator table ----------------------------------------------------------------------


def op_fns(backend: str) -> dict[str, Callable[..., jax.Array]]:
  """op -> fn(x [M, D], w [E, D, F], group_sizes, dout [M, F]) for one backend, or for `dense`
  fn(x [M, D], w [D, F], group_sizes (unused), dout [M, F])."""
  if backend == "dense":
    # The same FLOPs as the grouped op, as one matmul; w is then one expert's [D, F].
    return {
      "fwd": lambda x, w, gs, dout: x @ w,
      "dlhs": lambda x, w, gs, dout: dout @ w.T,
      "drhs": lambda x, w, gs, dout: x.T @ dout,
    }
  k = KERNELS[backend]
  return {
    "fwd": lambda x, w, gs, dout: k.gmm(x, w, gs, preferred_element_type=x.dtype),
    "dlhs": lambda x, w, gs, dout: k.gmm(
      dout, w, gs, transpose_rhs=True, preferred_element_type=x.dtype
    ),
    "drhs": lambda x, w, gs, dout: k.tgmm(x, dout, gs, preferred_element_type=x.dtype),
  }


def time_op(fn: Callable[..., jax.Array], operands, *, repeats: int, warmup: int) -> float:
  """Median milliseconds of the compiled `fn(*operands)`, each call waited for."""
  compiled = jax.jit(fn).lower(*operands).compile()
  ms, _ = time_call(
    lambda: jax.block_until_ready(compiled(*operands)), repeats=repeats, warmup=warmup
  )
  return ms


def accelerator_rows(args: argparse.Namespace, platform: str) -> list[dict[str, Any]]:
  rows = []
  backends = ("dense", *PLATFORM_BACKENDS[platform])
  for name in args.shapes:
    s = SHAPES[name]
    sizes = routed_group_sizes(args.tokens, s.e, s.top_k, seed=args.seed)
    m = int(sizes.sum())
    flops = 2.0 * m * s.d * s.f
    for dtype_name in args.dtypes:
      dtype = DTYPES[dtype_name]
      kx, kw, kd = jax.random.split(jax.random.key(args.seed), 3)
      operands = (
        jax.random.normal(kx, (m, s.d), dtype),  # x
        jax.random.normal(kw, (s.e, s.d, s.f), dtype) / np.sqrt(s.d),  # w
        jnp.asarray(sizes),  # group sizes
        jax.random.normal(kd, (m, s.f), dtype),  # d out
      )
      for op in OPS:
        base: dict[str, float] = {}
        for backend in backends:
          x, w, gs, dout = operands
          # dense: one expert's weights, its own array (no slice in the timed program)
          inputs = (x, jnp.copy(w[0]), gs, dout) if backend == "dense" else operands
          ms = time_op(op_fns(backend)[op], inputs, repeats=args.repeats, warmup=args.warmup)
          inputs = x = w = gs = dout = None
          base.setdefault(backend, ms)
          tflops = flops / (ms * 1e-3) / 1e12
          rows.append(
            {
              "shape": name,
              "dtype": dtype_name,
              "op": op,
              "backend": backend,
              "M": m,
              "D": s.d,
              "F": s.f,
              "E": s.e,
              "ms": ms,
              "tflops": tflops,
              "mfu": tflops / args.peak_tflops if args.peak_tflops else None,
              "over_dense": ms / base["dense"],
              "over_xla": ms / base["xla"] if "xla" in base else None,
              "platform": platform,
              "device": jax.devices()[0].device_kind,
            }
          )
          print(f"{name} {dtype_name} {op} {backend}: {ms:.3f} ms", file=sys.stderr)
      operands = None  # free this dtype's arrays before the next one's are made
  return rows


# -- the CPU tables -----------------------------------------------------------------------------


def small_shape(s: Shape) -> tuple[int, int, int]:
  """(D, F, E) of the correctness case of a named shape: D and F divided by the smallest power of
  two that brings the larger to 256 or less (so mixtral's 4096, 14336 become 64, 224; deepseek_v3's
  224, 64; qwen3_moe's 256, 96: dims that are not multiples of the 128-wide TPU tiles), E capped to
  SMALL_MAX_EXPERTS."""
  factor = 1
  while max(s.d, s.f) // factor > 256:
    factor *= 2
  return s.d // factor, s.f // factor, min(s.e, SMALL_MAX_EXPERTS)


def _expected(x, w, dout, sizes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """float64 per-group loop: (out, d x, d w) of out = gmm(x, w)."""
  x, w, dout = (np.asarray(a, np.float64) for a in (x, w, dout))
  out, dx, dw = np.zeros((x.shape[0], w.shape[2])), np.zeros_like(x), np.zeros_like(w)
  start = 0
  for e, size in enumerate(sizes):
    rows = slice(start, start + size)
    out[rows] = x[rows] @ w[e]
    dx[rows] = dout[rows] @ w[e].T
    dw[e] = x[rows].T @ dout[rows]
    start += size
  return out, dx, dw


def _rel_err(actual, expected) -> float:
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  return float(np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-30))


def correctness_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
  rows = []
  for name in args.shapes:
    s = SHAPES[name]
    seed = args.seed + list(SHAPES).index(name)
    d, f, e = small_shape(s)
    top_k = min(s.top_k, e // 2)
    # Experts 1 and E-1 get no rows; SMALL_ROUTED / top_k tokens fill the groups.
    sizes = routed_group_sizes(SMALL_ROUTED // top_k, e, top_k, seed=seed, empty=(1, e - 1))
    rng = np.random.default_rng(seed)
    x64 = rng.standard_normal((SMALL_ROWS, d))
    w64 = rng.standard_normal((e, d, f)) / np.sqrt(d)
    dout64 = rng.standard_normal((SMALL_ROWS, f))
    for dtype_name in args.dtypes:
      dtype = DTYPES[dtype_name]
      x, w, dout = (jnp.asarray(a, dtype) for a in (x64, w64, dout64))
      expected = _expected(x.astype(jnp.float32), w.astype(jnp.float32), dout, sizes)
      for backend, options in INTERPRET_OPTIONS.items():

        @jax.jit
        def fwd_and_grads(x, w, gs, dout, backend=backend, options=options):
          call = functools.partial(gmm, backend=backend, options=options)
          out, vjp = jax.vjp(lambda x, w: call(x, w, gs), x, w)
          return (out, *vjp(dout))

        start = time.perf_counter()
        actual = fwd_and_grads(x, w, jnp.asarray(sizes), dout)
        actual = [np.asarray(a.astype(jnp.float32)) for a in actual]
        seconds = time.perf_counter() - start
        errs = {op: _rel_err(a, b) for op, a, b in zip(OPS, actual, expected, strict=True)}
        rows.append(
          {
            "table": "correctness",
            "shape": name,
            "dtype": dtype_name,
            "backend": backend,
            "mode": "interpret" if options else "ragged_dot",
            "M": SMALL_ROWS,
            "D": d,
            "F": f,
            "E": e,
            "group_sizes": sizes.tolist(),
            **{f"{op}_err": errs[op] for op in OPS},
            "past_groups_zero": bool(np.all(actual[0][int(sizes.sum()) :] == 0)),
            "seconds": seconds,
          }
        )
        print(f"correctness {name} {dtype_name} {backend}: {seconds:.1f} s", file=sys.stderr)
  return rows


def _first_line(err: BaseException) -> str:
  text = f"{type(err).__name__}: {err}".strip()
  return text.splitlines()[0][:160]


def lowering_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
  rows = []
  bf16 = jnp.bfloat16
  for name in args.shapes:
    s = SHAPES[name]
    m = args.tokens * s.top_k
    x = jax.ShapeDtypeStruct((m, s.d), bf16)
    w = jax.ShapeDtypeStruct((s.e, s.d, s.f), bf16)
    gs = jax.ShapeDtypeStruct((s.e,), jnp.int32)
    dout = jax.ShapeDtypeStruct((m, s.f), bf16)
    for backend, platform in LOWERINGS:
      for op, fn in op_fns_lowering(backend).items():
        start = time.perf_counter()
        try:
          text = jax.jit(fn).trace(x, w, gs, dout).lower(lowering_platforms=(platform,)).as_text()
          calls = [a or b for a, b in _CUSTOM_CALL.findall(text)]
          ok, error = calls == [KERNEL_CALL[backend]], None
          if not ok:
            error = f"custom calls {calls}, expected one {KERNEL_CALL[backend]}"
        except Exception as err:  # noqa: BLE001  (the table reports any failure)
          ok, error = False, _first_line(err)
        rows.append(
          {
            "table": "lowering",
            "shape": name,
            "backend": backend,
            "platform": platform,
            "op": op,
            "M": m,
            "D": s.d,
            "F": s.f,
            "E": s.e,
            "dtype": "bfloat16",
            "lowered": ok,
            "kernel": KERNEL_CALL[backend],
            "seconds": time.perf_counter() - start,
            "error": error,
          }
        )
  return rows


def op_fns_lowering(backend: str) -> dict[str, Callable[..., jax.Array]]:
  """The ops to lower: gmm, gmm with transpose_rhs (d lhs) and tgmm (d rhs), default tiles."""
  return dict(zip(("gmm", "gmm_transpose_rhs", "tgmm"), op_fns(backend).values(), strict=True))


# -- main ---------------------------------------------------------------------------------------


def _csv(choices: Sequence[str]) -> Callable[[str], list[str]]:
  def parse(text: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in choices]
    if bad or not items:
      raise argparse.ArgumentTypeError(f"{bad or text!r}; allowed: {', '.join(choices)}")
    return items

  return parse


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--shapes", type=_csv(tuple(SHAPES)), default=list(SHAPES))
  p.add_argument("--dtypes", type=_csv(tuple(DTYPES)), default=list(DTYPES))
  p.add_argument("--tokens", type=int, default=4096, help="tokens T; the gmm has T*top_k rows")
  p.add_argument("--repeats", type=int, default=20)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--peak-tflops", type=float, default=None, help="vendor dense peak, for MFU")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--cpu-tables", action="store_true", help="the CPU tables even on an accelerator")
  p.add_argument("--out", default=None, help="write the rows as JSON")
  return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
  args = parse_args(argv)
  platform = jax.default_backend()
  settings = f"T={args.tokens}, {', '.join(args.dtypes)}, seed {args.seed}"
  if platform in PLATFORM_BACKENDS and not args.cpu_tables:
    rows = accelerator_rows(args, platform)
    peak = f", MFU against {args.peak_tflops:g} TFLOP/s" if args.peak_tflops else ""
    header = (
      f"gmm throughput on {rows[0]['device']} ({platform}), {settings}{peak}; "
      f"median of {args.repeats} in ms"
    )
    columns = [
      ("shape", "shape", "s"),
      ("dtype", "dtype", "s"),
      ("op", "op", "s"),
      ("backend", "backend", "s"),
      ("M", "M", "d"),
      ("ms", "ms", ".3f"),
      ("TFLOP/s", "tflops", ".1f"),
      ("MFU", "mfu", ".1%"),
      ("/dense", "over_dense", ".2f"),
      ("/xla", "over_xla", ".2f"),
    ]
    print(markdown_table(rows, columns, header))
    write_rows(args.out, rows)
    return rows

  correct = correctness_rows(args)
  print(
    markdown_table(
      [{**r, "dims": f"{r['M']},{r['D']},{r['F']},{r['E']}"} for r in correct],
      [
        ("shape", "shape", "s"),
        ("dtype", "dtype", "s"),
        ("backend", "backend", "s"),
        ("mode", "mode", "s"),
        ("M,D,F,E", "dims", "s"),
        ("fwd err", "fwd_err", ".1e"),
        ("d lhs err", "dlhs_err", ".1e"),
        ("d rhs err", "drhs_err", ".1e"),
        ("zero past groups", "past_groups_zero", ""),
        ("s", "seconds", ".1f"),
      ],
      "Correctness on CPU: max relative error vs a float64 per-group loop "
      f"({', '.join(args.dtypes)}; group sizes from seeded routing, two empty experts)",
    )
  )
  print()
  lowered = lowering_rows(args)
  print(
    markdown_table(
      [
        {**r, "dims": f"{r['M']},{r['D']},{r['F']},{r['E']}", "error": r["error"] or ""}
        for r in lowered
      ],
      [
        ("shape", "shape", "s"),
        ("backend", "backend", "s"),
        ("platform", "platform", "s"),
        ("op", "op", "s"),
        ("M,D,F,E", "dims", "s"),
        ("kernel call", "kernel", "s"),
        ("lowered", "lowered", ""),
        ("s", "seconds", ".2f"),
        ("error", "error", "s"),
      ],
      f"Lowering from this host: full-size shapes, bfloat16, default tiles, T={args.tokens}",
    )
  )
  print()
  print(
    f"Timings need an accelerator: jax.default_backend() is {platform!r}; run this script on a "
    "GPU or TPU host (with --peak-tflops) for TFLOP/s and MFU."
  )
  rows = correct + lowered
  write_rows(args.out, rows)
  return rows


if __name__ == "__main__":
  main()

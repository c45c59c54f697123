"""Grouped matmul on the host's BLAS: one GEMM per non-empty group, on XLA's own buffers.

XLA:CPU lowers `ragged_dot` to a dense dot over all E groups, and compiles a loop of per-group
dots into small fused kernels; for the shapes a mixture of experts makes (tens to hundreds of rows
per group, D and F in the hundreds or more) those run well below what a BLAS GEMM reaches on the
same core, and the weight gradient (a dot that contracts the group's few rows) is the worst of
them. (Such a loop of XLA dots, the `cpu` backend that once stood beside this one, took 1.1-2x
this backend's time fwd+bwd at every MoE shape measured, and was deleted.) This backend hands the
whole grouped matmul to the host instead, through `jax.experimental.buffer_callback`, which
passes XLA's input and output buffers to Python as zero-copy arrays:

    for each group e with rows [start, end):                      (numpy.matmul -> BLAS GEMM)
      gmm:   out[start:end] = lhs[start:end] @ rhs[e]             (rhs[e].T with transpose_rhs)
      tgmm:  out[e]         = lhs[start:end].T @ grad[start:end]  (zeros for an empty group)

`gmm_multi` multiplies one lhs by several weights (a gated FFN's gate and up) in one call, and
`gmm_multi_vjp` gives all their gradients in one more (d lhs rows as gmm with rhs_i[e].T, summed
over i; each d rhs_i as tgmm): the same GEMMs, fewer callbacks, and each group's rows read once
while they are in cache. With one weight, `gmm_multi_vjp` is gmm's VJP (one callback, not two).

The GEMMs are numpy's BLAS (OpenBLAS in numpy's wheels); numpy passes transposed views to it as
transposed operands, so no operand is copied. Rows at or past sum(group_sizes) are zeroed, as every
backend does.

Threads. The kernels split each call over the host's cores themselves and run every GEMM on one
BLAS thread (`set_num_threads`, exported as `moejax.kernels.set_host_threads`; default: the cores
this process may use; a call's `threads` option overrides it). gmm gives each thread an
equal share of the routed rows (a group that straddles a boundary is cut in two); tgmm gives each
an equal slice of every group's [D, F] gradient along its longer side (a group's rows cannot be
cut without summing partial products). So the split is even however the tokens are routed. One
share runs on the calling XLA thread, the others on persistent workers that sleep on a queue.
Calls that XLA runs side by side (a layer's input and weight gradients) divide the threads
between them instead of each taking all of them; the cut itself depends only on the shapes and
`num_threads()`, never on what else runs, because OpenBLAS rounds a GEMM's pieces differently
from the whole, and a cut that followed the timing made two runs of one config differ. Results
are therefore bit-reproducible for a given thread count (set it with `set_num_threads` to
reproduce a run on a machine with other cores). A caller that runs several XLA programs at once
(the trainer's concurrent micro-batches) caps every call's threads with `limit_threads`
(`moejax.kernels.limit_host_threads`) while
they run: each program then already has a core, and a call's worker thread would only contend
with the other program's ops (the Mixtral tiny train step, two micro-batches on 2 cores: 238 ->
216 and 245 -> 229 ms with one thread per call, alternating steps in one process).

Letting OpenBLAS thread each GEMM instead was slower in a training step: its idle workers spin
for ~0.1 s after every call (2^28 cycles), on the cores XLA's next ops need, and every small
per-group GEMM paid its own fork and join. Measured on 2 cores, against that loop, alternating
steps in one process (median ms): the Mixtral tiny train step 302 -> 257, the small one (8x512
tokens) 8508 -> 7613. The layer benchmark's E=32 row went from 785 to 704 ms (separate runs).
Isolated calls are about as fast either way (M=8192, D=512, F=1024, E=32: gmm 59-61 ms here,
64-69 before; 53 for one dense [8192, 512] x [512, 1024] GEMM).

Dtypes. float32 and float64 go to BLAS as they are. Other inputs (bfloat16, float16) are cast to
float32 by XLA before the call and the float32 result is cast to the output dtype after it: numpy
has no BLAS for them, and the products then accumulate in float32 as the op's contract requires.

Where it runs. CPU only (the callback reads host memory). The callback runs where XLA places it:
once per device inside `shard_map` (each on its own shard), or once on the whole array under plain
`jit`. It holds the Python GIL between GEMMs, releasing it inside each; a program that keeps the
GIL busy on another thread while a step runs will wait for it. While a call runs, every BLAS
library in the process (threadpoolctl's view) is set to one thread, and restored after. A host
callback cannot be serialised: `jax.export` of a computation that contains this backend fails
("serialization of host_callbacks is not yet implemented"); `backend="xla"` is pure XLA. Lowered
for another platform, these kernels fail naming the backend (`_require_cpu_p`); `backend="auto"`
never lowers them there.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import queue
import threading

import jax
import jax.numpy as jnp
import numpy as np
import threadpoolctl
from jax.experimental.buffer_callback import buffer_callback
from jax.extend.core import Primitive
from jax.interpreters import mlir

from moejax.kernels.grouped_matmul.common import group_bounds, varying_axes

# The dtypes numpy's matmul hands to BLAS; anything else computes in float32.
_BLAS_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _compute_dtype(*arrays) -> np.dtype:
  dtype = np.dtype(jnp.result_type(*arrays))
  return dtype if dtype in _BLAS_DTYPES else np.dtype(np.float32)


class _SingleThreadedBLAS:
  """A scope in which every BLAS numpy calls runs its GEMMs on one thread.

  The host kernels below split their work over threads of their own; a BLAS that also threads each
  GEMM would put two threads on every core. Worse, OpenBLAS's idle workers spin for a while after
  each multi-threaded call, on the cores XLA's next ops need. Entering sets every BLAS library
  threadpoolctl finds in the process to one thread; leaving the last open scope restores the
  counts. Scopes may overlap (two callbacks on two XLA threads); only the outermost sets and
  restores. A child forked while a scope is open leaves it at once, restoring the counts.
  """

  def __init__(self):
    self._lock = threading.Lock()
    self._open = 0
    self._saved: list = []
    self._libraries = None
    # A child forked while a call runs has none of the calls that would close the scope.
    os.register_at_fork(after_in_child=self._close_in_child)

  def _close_in_child(self):
    self._lock = threading.Lock()
    if self._open:
      self._open = 1
      self.__exit__()

  @property
  def open_scopes(self) -> int:
    """How many calls are inside the scope now (this one included, when asked from inside)."""
    return self._open

  def __enter__(self):
    with self._lock:
      if self._open == 0:
        if self._libraries is None:
          self._libraries = threadpoolctl.ThreadpoolController().select(user_api="blas")
        self._saved = [(lib, lib.num_threads) for lib in self._libraries.lib_controllers]
        for lib, threads in self._saved:
          if threads != 1:
            lib.set_num_threads(1)
      self._open += 1

  def __exit__(self, *exc):
    with self._lock:
      self._open -= 1
      if self._open == 0:
        for lib, threads in self._saved:
          if threads != 1:
            lib.set_num_threads(threads)


class _Workers:
  """Persistent daemon threads that run a callback's parts next to the calling thread.

  `run(parts)` runs parts[0] on the calling thread and each other part on a worker, and returns
  when all are done (re-raising the first error). Workers wait on a queue, so an idle worker costs
  no CPU. numpy releases the GIL inside each GEMM, so the parts run in parallel.
  """

  def __init__(self):
    self._lock = threading.Lock()
    self._tasks: queue.SimpleQueue = queue.SimpleQueue()
    self._started = 0
    # A forked child has none of the parent's threads.
    os.register_at_fork(after_in_child=self._forget_threads)

  def _forget_threads(self):
    self._lock = threading.Lock()
    self._tasks = queue.SimpleQueue()
    self._started = 0

  def _work(self, tasks):
    while True:
      part, done = tasks.get()
      try:
        part()
      except BaseException as error:  # handed to the waiting caller, which re-raises it
        done.put(error)
      else:
        done.put(None)

  def run(self, parts) -> None:
    with self._lock:
      while self._started < len(parts) - 1:
        threading.Thread(target=self._work, args=(self._tasks,), daemon=True).start()
        self._started += 1
    done: queue.SimpleQueue = queue.SimpleQueue()
    for part in parts[1:]:
      self._tasks.put((part, done))
    errors = []
    try:
      parts[0]()
    except BaseException as error:
      errors.append(error)
    errors += [e for e in (done.get() for _ in parts[1:]) if e is not None]
    if errors:
      raise errors[0]


_single_threaded_blas = _SingleThreadedBLAS()
_workers = _Workers()
_num_threads: int | None = None  # None: the cores this process may run on
_thread_limits: list[int] = []  # the caps of the open `limit_threads` scopes

# A part smaller than this costs more to hand to another thread (a queue put and a wake-up, tens
# of microseconds) than it saves. The `min_part_flops` option overrides it per call.
_MIN_PART_FLOPS = 2**21

# The options this backend takes (`ops.gmm(..., options=...)`), with their defaults.
OPTIONS = {
  # Threads to split each call over instead of `num_threads()`'s count (still capped by the open
  # `limit_threads` scopes); None: `num_threads()`. The cut, and so the rounding, follows it.
  "threads": None,
  # The least work, in FLOPs, worth handing to another thread; smaller calls run on fewer threads.
  "min_part_flops": _MIN_PART_FLOPS,
}


def _is_count(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_options(threads=None, min_part_flops=_MIN_PART_FLOPS) -> None:
  """Raises a ValueError naming the option whose value this backend cannot use."""
  if threads is not None and not _is_count(threads):
    raise ValueError(
      f"gmm backend 'blas': option threads={threads!r}; allowed: an int >= 1, or None"
    )
  if not _is_count(min_part_flops):
    raise ValueError(
      f"gmm backend 'blas': option min_part_flops={min_part_flops!r}; allowed: an int >= 1"
    )


def set_num_threads(threads: int | None) -> None:
  """Sets how many threads the host kernels split a grouped matmul over; None (the default) uses
  every core this process may run on (`os.sched_getaffinity`)."""
  global _num_threads
  if threads is not None and not _is_count(threads):
    raise ValueError(f"set_host_threads: threads={threads!r}; allowed: an int >= 1, or None")
  _num_threads = threads


def num_threads(threads: int | None = None) -> int:
  """The threads the host kernels split a grouped matmul over: `threads` if given (a call's
  option), else `set_num_threads`'s count, capped by the open `limit_threads` scopes."""
  if threads is None:
    threads = _num_threads
  if threads is None:
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return min([threads or 1, *_thread_limits])


@contextlib.contextmanager
def limit_threads(threads: int):
  """Caps `num_threads()` at `threads` for every call in the process while the block runs.

  For a caller that runs several XLA programs side by side: each program already keeps a core
  busy, so a grouped matmul that also hands parts to worker threads oversubscribes the cores.
  Scopes nest (the smallest cap applies). The cap changes the cut of each call, so results are
  those of `set_num_threads(min(count, threads))`.
  """
  if not _is_count(threads):
    raise ValueError(f"limit_host_threads: threads={threads!r}; allowed: an int >= 1")
  _thread_limits.append(threads)
  try:
    yield
  finally:
    _thread_limits.remove(threads)  # this scope's cap (scopes on other threads may close later)


def _bounds(size: int, parts: int) -> list[tuple[int, int]]:
  """`parts` contiguous ranges that cover [0, size) and differ in length by at most one."""
  cuts = [size * k // parts for k in range(parts + 1)]
  return list(itertools.pairwise(cuts))


def _run_split(
  run, size: int, flops: int, threads: int | None = None, min_part_flops: int = _MIN_PART_FLOPS
) -> None:
  """Runs `run(first, last)` over ranges that cover [0, size), on the threads the call gets.

  The ranges depend on nothing but `size`, `flops`, `min_part_flops` and `num_threads(threads)`:
  one per thread, none below `min_part_flops` of the call's `flops`. A GEMM cut into other pieces
  rounds differently (OpenBLAS's results differ in the last bits between a [500, K] product and
  its two [250, K] halves), so a cut that followed the timing would make training runs
  irreproducible. The ranges run on those threads shared among the calls running at the same
  moment (XLA runs independent ops, e.g. a layer's input and weight gradients, side by side);
  each thread takes the next range when it is free.
  """
  with _single_threaded_blas:
    threads = num_threads(threads)
    ranges = _bounds(size, max(1, min(threads, flops // min_part_flops)))
    share = max(1, threads // _single_threaded_blas.open_scopes)  # >= 1 inside the scope
    pending = iter(ranges)
    lock = threading.Lock()

    def take_ranges() -> None:
      while True:
        with lock:
          chunk = next(pending, None)
        if chunk is None:
          return
        run(*chunk)

    _workers.run([take_ranges] * min(share, len(ranges)))  # one part: the caller alone


def _split(threads=None, min_part_flops=_MIN_PART_FLOPS) -> tuple[int | None, int]:
  """`_run_split`'s (threads, min_part_flops) arguments from a call's options, in that order (its
  callers pass them positionally)."""
  return threads, min_part_flops


def _row_pieces(starts, ends, groups, first: int, last: int):
  """(e, lo, hi) for every group's rows inside [first, last): a row share cuts through groups."""
  for e in groups:
    lo, hi = max(int(starts[e]), first), min(int(ends[e]), last)
    if lo < hi:
      yield e, lo, hi


def _weight_grads(lhs, douts, drhss, e: int, rows: slice, first: int, last: int) -> None:
  """drhs[e] = lhs[rows]^T @ dout[rows] for every (dout, drhs), the slice [first, last) of each
  gradient's longer side only: a group's rows cannot be split without adding partial sums."""
  for dout, drhs in zip(douts, drhss, strict=True):
    if drhs.shape[2] >= lhs.shape[1]:  # [D, rows] @ [rows, F slice] -> drhs[e][:, slice]
      np.matmul(lhs[rows].T, dout[rows, first:last], out=drhs[e, :, first:last])
    else:  # [D slice, rows] @ [rows, F] -> drhs[e][slice]
      np.matmul(lhs[rows, first:last].T, dout[rows], out=drhs[e, first:last])


def _host_gmm_multi(
  ctx, outs, lhs, *rhss_and_sizes, transpose_rhs: bool = False, **split_options
) -> None:
  """outs[i][rows of e] = lhs[rows of e] @ rhss[i][e] (rhss[i][e].T with `transpose_rhs`) for
  every i: one left-hand side against one or several weights (a gated FFN's gate and up), each
  share of lhs's rows read once for all of them."""
  del ctx
  *rhss, group_sizes = rhss_and_sizes
  outs, lhs, rhss = [np.asarray(o) for o in outs], np.asarray(lhs), [np.asarray(w) for w in rhss]
  starts, ends, routed = group_bounds(group_sizes, lhs.shape[0])
  groups = np.flatnonzero(ends > starts).tolist()
  for out in outs:
    out[routed:] = 0  # the rows past the groups

  def rows(first: int, last: int) -> None:
    for e, lo, hi in _row_pieces(starts, ends, groups, first, last):
      for rhs, out in zip(rhss, outs, strict=True):
        np.matmul(lhs[lo:hi], rhs[e].T if transpose_rhs else rhs[e], out=out[lo:hi])

  # Every thread takes an equal share of the routed rows, whatever the groups' sizes.
  flops = 2 * routed * lhs.shape[1] * sum(o.shape[1] for o in outs)
  _run_split(rows, routed, flops, *_split(**split_options))


def _host_tgmm(ctx, outs, lhs, grad, group_sizes, **split_options) -> None:
  del ctx
  (out,) = outs
  out, lhs, grad = np.asarray(out), np.asarray(lhs), np.asarray(grad)
  starts, ends, routed = group_bounds(group_sizes, lhs.shape[0])
  has_rows = ends > starts
  groups = np.flatnonzero(has_rows).tolist()
  out[~has_rows] = 0
  num_d, num_f = out.shape[1:]

  # Every thread takes an equal slice of each group's [D, F] gradient, along its longer side.
  def block(first: int, last: int) -> None:
    for e in groups:
      _weight_grads(lhs, (grad,), (out,), e, slice(starts[e], ends[e]), first, last)

  _run_split(block, max(num_d, num_f), 2 * routed * num_d * num_f, *_split(**split_options))


def _host_gmm_multi_vjp(ctx, outs, lhs, *args, **split_options) -> None:
  """The gradients of `out_i = gmm(lhs, rhs_i)`, i = 1..n, in one call:

      d lhs[rows of e] = sum_i d out_i[rows of e] @ rhs_i[e]^T     (gmm with rhs_i[e].T)
      d rhs_i[e]       = lhs[rows of e]^T @ d out_i[rows of e]      (tgmm)

  `args` are rhs_1..rhs_n, d out_1..d out_n and group_sizes; `outs` d lhs, d rhs_1..d rhs_n. On one
  thread each group's GEMMs run back to back while its rows are in cache; on several, the rows of
  d lhs are cut as gmm cuts them, then every d rhs_i as tgmm cuts it. With n = 1 the GEMMs are
  exactly those of gmm's kernel (transposed) and `_host_tgmm`, so the numbers are too.
  """
  del ctx
  n = (len(args) - 1) // 2
  rhss, douts, group_sizes = args[:n], args[n : 2 * n], args[-1]
  dlhs, *drhss = (np.asarray(o) for o in outs)
  lhs, rhss, douts = np.asarray(lhs), [np.asarray(w) for w in rhss], [np.asarray(d) for d in douts]
  starts, ends, routed = group_bounds(group_sizes, lhs.shape[0])
  has_rows = ends > starts
  groups = np.flatnonzero(has_rows).tolist()
  dlhs[routed:] = 0
  for drhs in drhss:
    drhs[~has_rows] = 0

  def lhs_rows(e: int, lo: int, hi: int) -> None:
    np.matmul(douts[0][lo:hi], rhss[0][e].T, out=dlhs[lo:hi])  # [rows, F_1] @ [F_1, D]
    for rhs, dout in zip(rhss[1:], douts[1:], strict=True):
      dlhs[lo:hi] += dout[lo:hi] @ rhs[e].T

  longest = max(max(d.shape[1:]) for d in drhss)
  if num_threads(split_options.get("threads")) == 1:
    with _single_threaded_blas:
      for e in groups:
        r = slice(int(starts[e]), int(ends[e]))
        lhs_rows(e, r.start, r.stop)
        _weight_grads(lhs, douts, drhss, e, r, 0, longest)
    return

  def rows(first: int, last: int) -> None:
    for e, lo, hi in _row_pieces(starts, ends, groups, first, last):
      lhs_rows(e, lo, hi)

  def block(first: int, last: int) -> None:
    for e in groups:
      _weight_grads(lhs, douts, drhss, e, slice(int(starts[e]), int(ends[e])), first, last)

  flops = 2 * routed * lhs.shape[1] * sum(d.shape[2] for d in drhss)
  _run_split(rows, routed, flops, *_split(**split_options))
  _run_split(block, longest, flops, *_split(**split_options))


def _off_cpu_error(platforms) -> ValueError:
  return ValueError(
    f"Grouped-matmul backend='blas' calls the host's BLAS on host buffers, so it runs on CPU "
    f"only; this computation runs on {', '.join(map(repr, platforms))}: use backend='auto' "
    f"(which picks by the platform compiled for) or 'xla'."
  )


def _require_cpu_impl(x):
  if isinstance(x, jax.Array) and (platforms := {d.platform for d in x.devices()}) - {"cpu"}:
    raise _off_cpu_error(sorted(platforms))
  return x


def _require_cpu_off_cpu(ctx, x):
  del x
  raise _off_cpu_error(p for p in ctx.module_context.platforms if p != "cpu")


# The identity on an operand of every host call. Lowered for CPU it is nothing; lowered for any
# other platform it fails, naming the backend, before `buffer_callback` would hand device buffers
# to numpy (a GPU callback) or fail with a message that names neither the op nor the fix.
_require_cpu_p = Primitive("gmm_blas_requires_cpu")
_require_cpu_p.def_impl(_require_cpu_impl)
_require_cpu_p.def_abstract_eval(lambda x: x)
mlir.register_lowering(_require_cpu_p, lambda ctx, x: [x], platform="cpu")
mlir.register_lowering(_require_cpu_p, _require_cpu_off_cpu)


def _call(kernel, shapes, dtype, out_dtypes, *operands, **options) -> tuple[jax.Array, ...]:
  """Runs `kernel(ctx, outs, *operands, **options)` on the operands in `dtype` into fresh buffers
  of `shapes` (a tuple of shapes, one per output); casts the outputs to `out_dtypes` (one each)."""
  check_options(**options)
  *arrays, group_sizes = operands
  arrays = [x.astype(dtype) for x in arrays]
  structs = tuple(jax.ShapeDtypeStruct(s, dtype) for s in shapes)
  kernel = functools.partial(kernel, **options)
  outs = buffer_callback(kernel, structs)(*arrays, _require_cpu_p.bind(group_sizes))
  # The callback's results are typed as varying over no `shard_map` axis; they vary as the inputs.
  axes = varying_axes(*operands)
  return tuple(
    jax.lax.pcast(o, axes, to="varying").astype(t) for o, t in zip(outs, out_dtypes, strict=True)
  )


def gmm(
  lhs: jax.Array,
  rhs: jax.Array,
  group_sizes: jax.Array,
  *,
  transpose_rhs: bool = False,
  preferred_element_type=None,
  **options,
) -> jax.Array:
  """Grouped matmul `[M, D] x [E, D, F] -> [M, F]` with one BLAS GEMM per non-empty group.

  Not differentiable by itself (a host callback); `ops.gmm` adds the VJP. `transpose_rhs` takes
  rhs as `[E, F, D]` and uses `rhs[e].T`; `options` are those of `OPTIONS`. Rows at or past
  sum(group_sizes) are zero.
  """
  out_dim = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  kernel = functools.partial(_host_gmm_multi, transpose_rhs=transpose_rhs)
  out_dtype = preferred_element_type or lhs.dtype
  dtype = _compute_dtype(lhs, rhs)
  shapes, out_dtypes = ((lhs.shape[0], out_dim),), (out_dtype,)
  return _call(kernel, shapes, dtype, out_dtypes, lhs, rhs, group_sizes, **options)[0]


def tgmm(
  lhs: jax.Array,
  grad: jax.Array,
  group_sizes: jax.Array,
  *,
  preferred_element_type=None,
  **options,
) -> jax.Array:
  """Per-group `lhs_e^T @ grad_e -> [E, D, F]` with one BLAS GEMM per non-empty group.

  Not differentiable by itself; `ops.tgmm` adds the VJP. A group with no rows gets zeros; rows past
  sum(group_sizes) are ignored. `options` are those of `OPTIONS`.
  """
  dtype = _compute_dtype(lhs, grad)
  out_dtype = preferred_element_type or jnp.result_type(lhs, grad)
  shape = (group_sizes.shape[0], lhs.shape[1], grad.shape[1])
  return _call(_host_tgmm, (shape,), dtype, (out_dtype,), lhs, grad, group_sizes, **options)[0]


def gmm_multi(
  lhs: jax.Array,
  rhss: tuple[jax.Array, ...],
  group_sizes: jax.Array,
  *,
  preferred_element_type=None,
  **options,
) -> tuple[jax.Array, ...]:
  """`(gmm(lhs, rhs) for rhs in rhss)` in one host call: each share of lhs's rows is read once
  for all the weights. Not differentiable by itself; `ops.gmm_multi` adds the VJP."""
  out_dtype = preferred_element_type or lhs.dtype
  dtype = _compute_dtype(lhs, *rhss)
  shapes = tuple((lhs.shape[0], w.shape[2]) for w in rhss)
  dtypes = (out_dtype,) * len(rhss)
  return _call(_host_gmm_multi, shapes, dtype, dtypes, lhs, *rhss, group_sizes, **options)


def gmm_multi_vjp(
  lhs: jax.Array,
  rhss: tuple[jax.Array, ...],
  group_sizes: jax.Array,
  douts: tuple[jax.Array, ...],
  **options,
) -> tuple[jax.Array, tuple[jax.Array, ...]]:
  """(d lhs [M, D], (d rhs_i [E, D, F_i], ...)) of `gmm(lhs, rhs_i)` for cotangents d out_i
  [M, F_i], in one host call (`ops`'s VJP of gmm and gmm_multi): d lhs sums d out_i @ rhs_i^T
  per group; with one weight the numbers are those of gmm(dout, rhs, transpose_rhs=True) and
  tgmm(lhs, dout) bit for bit. Gradients come back in lhs's and each rhs's dtype."""
  dtype = _compute_dtype(lhs, *rhss, *douts)
  shapes = (lhs.shape, *(w.shape for w in rhss))
  dtypes = (lhs.dtype, *(w.dtype for w in rhss))
  operands = (lhs, *rhss, *douts, group_sizes)
  dlhs, *drhss = _call(_host_gmm_multi_vjp, shapes, dtype, dtypes, *operands, **options)
  return dlhs, tuple(drhss)

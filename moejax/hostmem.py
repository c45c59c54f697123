"""Host memory: keep freed buffers in the process so that XLA:CPU reuses them step after step.

XLA:CPU allocates a step's temporaries and outputs with the C library's `malloc` and frees them at
the end of the step. glibc serves large blocks (over 32 MiB, and any block of a thread's secondary
arena) with `mmap` and hands them back to the kernel on `free`, so the next step gets fresh pages
and pays one page fault per 4 KiB on first touch. An MoE layer's weight gradients are large
(E x D x F floats: 256 MiB per matrix at E=128, D=512, F=1024), and on our 2-core VM faulting them in
cost more than writing them: measured on the MoE layer forward+backward at E=128, 1.1 GiB faulted
per step, 1.3-1.5 s per step, against no faults and 1.0-1.15 s with `retain_host_memory()`.

`retain_host_memory()` tells glibc to serve every block from the one main heap (`M_ARENA_MAX=1`,
`M_MMAP_MAX=0`) and never to return its free top to the kernel (`M_TRIM_THRESHOLD=-1`, whatever
its size), as a caching allocator would (PyTorch's CPU guide recommends jemalloc or tcmalloc for the
same reason). The process then holds on to its peak host memory. It changes nothing but
allocation, for every library in the process (PyTorch included, which is what a fair benchmark
wants), and is a no-op where the C library is not glibc.

The command-line entry points (`python -m moejax.train`, `moejax-generate`, the benchmarks in
bench/) call it at start-up; set `MOEJAX_RETAIN_HOST_MEMORY=0` to keep glibc's defaults. Importing
moejax as a library changes nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

ENV_VAR = "MOEJAX_RETAIN_HOST_MEMORY"

# mallopt parameters, from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
# -1 disables trimming (mallopt(3)); glibc stores it as SIZE_MAX. The largest positive `int`,
# 2 GiB, is not enough: a train step that frees more than that at once (the small Mixtral config's
# does) then gives it back and faulted 4.8 GB in again every step.
_NO_TRIM = -1

_retained = False


def _glibc() -> ctypes.CDLL | None:
  if not sys.platform.startswith("linux"):
    return None
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.gnu_get_libc_version  # noqa: B018 -- raises AttributeError on musl and other C libraries
  except (OSError, AttributeError):
    return None
  return libc


def retain_host_memory(enabled: bool | None = None) -> bool:
  """Keeps freed host memory in the process (glibc only); returns True if it now does.

  Args:
    enabled: True to apply, False to leave glibc as it is. None (default) reads the environment
      variable `MOEJAX_RETAIN_HOST_MEMORY` ("0", "false" or "no" turn it off; on otherwise).

  Best called once at start-up, before large allocations; calling it again is a no-op.
  """
  global _retained
  if enabled is None:
    enabled = os.environ.get(ENV_VAR, "1").strip().lower() not in ("0", "false", "no", "off")
  if not enabled:
    return _retained
  if _retained:
    return True
  libc = _glibc()
  if libc is None:
    return False
  ok = all(
    libc.mallopt(param, value) == 1
    for param, value in ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _NO_TRIM))
  )
  _retained = ok
  return ok

"""Grouped matmul (the expert step of a mixture of experts): `gmm` and its weight gradient `tgmm`.

The folder is named `grouped_matmul`, not `gmm`, so that the re-exported function does not shadow
a submodule of the same name.

The host-thread controls drive the `blas` backend (what `auto` runs on CPU): how many threads each
host grouped matmul splits over (`set_host_threads`, `host_threads`), and a scoped cap for callers
that run several XLA programs side by side (`limit_host_threads`).
"""

from moejax.kernels.grouped_matmul import pallas_gpu as _pallas_gpu  # noqa: F401  (registers the backend)
from moejax.kernels.grouped_matmul import pallas_tpu as _pallas_tpu  # noqa: F401  (registers the backend)
from moejax.kernels.grouped_matmul.blas import limit_threads as limit_host_threads
from moejax.kernels.grouped_matmul.blas import num_threads as host_threads
from moejax.kernels.grouped_matmul.blas import set_num_threads as set_host_threads
from moejax.kernels.grouped_matmul.ops import (
  BACKENDS,
  Backend,
  backends,
  check_options,
  gmm,
  gmm_multi,
  register_backend,
  tgmm,
)

__all__ = [
  "Backend",
  "backends",
  "register_backend",
  "check_options",
  "BACKENDS",
  "gmm",
  "gmm_multi",
  "host_threads",
  "limit_host_threads",
  "set_host_threads",
  "tgmm",
]

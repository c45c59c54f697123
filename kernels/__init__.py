"""Custom kernels for moejax, imported as `moejax.kernels` (the folder is mapped by pyproject.toml).

Each op lives in its own folder with a public `ops.py`, one file per backend and a plain-jnp
`reference.py` oracle that the tests compare every backend against. A backend of your own is one
`register_backend(name, Backend(...))` (docs/extending.md).
"""

from moejax.kernels.grouped_matmul import (
  BACKENDS,
  Backend,
  backends,
  check_options,
  gmm,
  gmm_multi,
  host_threads,
  limit_host_threads,
  register_backend,
  set_host_threads,
  tgmm,
)

__all__ = [
  "BACKENDS",
  "Backend",
  "backends",
  "check_options",
  "gmm",
  "gmm_multi",
  "host_threads",
  "limit_host_threads",
  "register_backend",
  "set_host_threads",
  "tgmm",
]

"""Grouped matmul (the expert step of a mixture of experts): `gmm` and its weight gradient `tgmm`.

The folder is named `grouped_matmul`, not `gmm`, so that the re-exported function does not shadow
a submodule of the same name.
"""

from moejax.kernels.grouped_matmul.ops import BACKENDS, gmm, gmm_multi, tgmm

__all__ = ["BACKENDS", "gmm", "gmm_multi", "tgmm"]

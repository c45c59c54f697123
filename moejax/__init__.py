"""moejax: Mixture-of-Experts research in JAX / Flax NNX.

Public API: `moejax.moe` (the MoE layer and its parts) and `moejax.kernels` (grouped matmul).
"""

__version__ = "0.1.0"

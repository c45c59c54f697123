"""moejax: Mixture-of-Experts research in JAX / Flax NNX.

Public API: `moejax.moe` (the MoE layer and its parts), `moejax.kernels` (grouped matmul) and
`moejax.interop` (Hugging Face checkpoint import and export).
"""

__version__ = "0.1.0"

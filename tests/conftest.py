"""Test setup: 8 CPU devices, so sharding and shard_map code is exercised on one machine.

XLA_FLAGS must be set before jax is imported anywhere, which is why it lives here at import time.
"""

import os

# Splitting LLVM codegen into parallel parts only adds overhead on a 2-core machine: one part halves
# XLA:CPU compile time for the small graphs tests compile (measured 2.4 s -> 1.2 s).
for _flag in (
  "--xla_force_host_platform_device_count=8",
  "--xla_cpu_parallel_codegen_split_count=1",
):
  if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

"""moejax.hostmem: freed host memory is reused instead of faulted in again (glibc only)."""

import os
import subprocess
import sys
import textwrap

import pytest

from moejax import hostmem

# Allocates, touches and frees argv[2] MiB twice (C malloc) in a fresh process, after the optional
# call, and prints whether the call applied and the page faults of the second round.
_PROBE = textwrap.dedent(
  """
  import ctypes, resource, sys
  from moejax import hostmem
  ok = hostmem.retain_host_memory() if sys.argv[1] == "call" else None
  libc = ctypes.CDLL("libc.so.6")
  libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
  libc.free.argtypes = [ctypes.c_void_p]
  size = int(sys.argv[2]) * 2**20
  def round_trip():  # malloc, touch every page, free: what XLA:CPU does with a step's buffers
    p = libc.malloc(size); ctypes.memset(p, 1, size); libc.free(p)
  round_trip()
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  round_trip()
  print(ok, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
  """
)

glibc_only = pytest.mark.skipif(hostmem._glibc() is None, reason="needs glibc (Linux)")


def _probe(mode: str, env_value: str | None = None, mib: int = 64) -> tuple[str, int]:
  env = dict(os.environ)
  env.pop(hostmem.ENV_VAR, None)
  if env_value is not None:
    env[hostmem.ENV_VAR] = env_value
  out = subprocess.run(
    [sys.executable, "-c", _PROBE, mode, str(mib)],
    env=env,
    capture_output=True,
    text=True,
    check=True,
  )
  ok, faults = out.stdout.split()
  return ok, int(faults)


@glibc_only
def test_retained_memory_is_reused_without_page_faults():
  # 64 MiB is 16384 pages of 4 KiB: glibc's default returns the block to the kernel on free, so
  # the second allocation faults it in again; retained, the heap hands back the same pages.
  _, default_faults = _probe("skip")
  ok, retained_faults = _probe("call")
  assert ok == "True"
  assert default_faults > 4096, default_faults
  assert retained_faults < 256, retained_faults


@glibc_only
@pytest.mark.slow
def test_blocks_over_2_gib_are_retained_too():
  # The largest positive trim threshold mallopt takes is 2 GiB - 1; a train step freeing more than
  # that at once was trimmed and faulted in again every step until the threshold became -1.
  ok, faults = _probe("call", mib=2200)
  assert ok == "True"
  assert faults < 256, faults


@glibc_only
@pytest.mark.parametrize("value", ["0", "false", "no"])
def test_environment_variable_turns_it_off(value):
  ok, faults = _probe("call", value)
  assert ok == "False"
  assert faults > 4096


def test_explicit_false_changes_nothing(monkeypatch):
  monkeypatch.setattr(hostmem, "_retained", False)
  monkeypatch.setattr(hostmem, "_glibc", lambda: pytest.fail("must not touch the C library"))
  assert hostmem.retain_host_memory(False) is False

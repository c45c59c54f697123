"""`backend="auto"` follows the platform a computation is compiled for, not the host tracing it.

Everything here is traced on this CPU host and lowered (not compiled) for cpu, cuda and tpu
(`jax.jit(f).trace(...).lower(lowering_platforms=...)`, which needs no accelerator). Lowered for
CPU, "auto" is the `blas` backend: the module calls the host (`buffer_callback`'s custom call)
and has no ragged_dot. Lowered for an accelerator it is `xla`: `chlo.ragged_dot`, and no host
callback anywhere, forward or backward. "Host callback" here is any custom call whose target
names a Python callback (`xla_buffer_python_cpu_callback`, `xla_ffi_python_cpu_callback`,
`xla_python_gpu_callback`, ...).
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax.kernels import gmm, gmm_multi, tgmm
from moejax.moe import MoE, MoEConfig

ACCELERATORS = ("cuda", "tpu")

_CUSTOM_CALL = re.compile(r'custom_call @([\w.]+)|call_target_name = "([\w.]+)"')


def _custom_call_targets(text: str) -> set[str]:
  return {a or b for a, b in _CUSTOM_CALL.findall(text)}


def _host_callbacks(text: str) -> set[str]:
  return {t for t in _custom_call_targets(text) if "callback" in t}


def _lowered(fn, *args, platform: str) -> str:
  return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()


def _inputs(m=12, d=4, f=6, sizes=(4, 0, 6)):
  rng = np.random.default_rng(0)
  lhs = jnp.asarray(rng.normal(size=(m, d)), jnp.float32)
  rhs = jnp.asarray(rng.normal(size=(len(sizes), d, f)), jnp.float32)
  return lhs, rhs, jnp.asarray(sizes, jnp.int32)


def _gmm_and_grads(lhs, rhs, group_sizes):
  loss = lambda x, w: jnp.sum(gmm(x, w, group_sizes) ** 2)
  return gmm(lhs, rhs, group_sizes), jax.grad(loss, argnums=(0, 1))(lhs, rhs)


def _gmm_multi_and_grads(lhs, rhs, group_sizes):
  def loss(x, w):
    gate, up = gmm_multi(x, (w, 2 * w), group_sizes)
    return jnp.sum(gate * up)

  return gmm_multi(lhs, (rhs, rhs), group_sizes), jax.grad(loss, argnums=(0, 1))(lhs, rhs)


def _tgmm_and_grads(lhs, rhs, group_sizes):
  grad = lhs @ rhs[0]  # [M, F]
  loss = lambda x, g: jnp.sum(tgmm(x, g, group_sizes) ** 2)
  return tgmm(lhs, grad, group_sizes), jax.grad(loss, argnums=(0, 1))(lhs, grad)


OPS = {"gmm": _gmm_and_grads, "gmm_multi": _gmm_multi_and_grads, "tgmm": _tgmm_and_grads}


@pytest.mark.parametrize("op", list(OPS))
def test_auto_lowered_for_cpu_calls_the_host_blas(op):
  text = _lowered(OPS[op], *_inputs(), platform="cpu")
  assert _host_callbacks(text) == {"xla_buffer_python_cpu_callback"}
  assert "ragged_dot" not in text


@pytest.mark.parametrize("platform", ACCELERATORS)
@pytest.mark.parametrize("op", list(OPS))
def test_auto_lowered_for_an_accelerator_is_ragged_dot_without_host_callbacks(op, platform):
  text = _lowered(OPS[op], *_inputs(), platform=platform)
  assert not _host_callbacks(text), _custom_call_targets(text)
  assert "chlo.ragged_dot" in text


def test_auto_on_cpu_compiles_to_the_blas_program():
  """The platform conditional leaves nothing in the CPU program: "auto" compiles to the very ops
  of `backend="blas"` (one host call forward, one backward)."""

  def compiled(backend):
    loss = lambda x, w, gs: jnp.sum(gmm_multi(x, (w, w), gs, backend=backend)[0] ** 2)
    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    text = fn.lower(*_inputs()).compile().as_text()
    ops = re.findall(r"= [^=]*? ([a-z][\w-]*)\(", text)
    return sorted(ops), text.count("xla_buffer_python_cpu_callback")

  auto, blas = compiled("auto"), compiled("blas")
  assert auto == blas
  assert "conditional" not in auto[0]
  assert auto[1] == 2


@pytest.mark.parametrize("platform", ACCELERATORS)
def test_auto_under_shard_map_lowered_for_an_accelerator(platform):
  """Inside `shard_map` on an abstract mesh of that platform's devices, from this host."""
  mesh = jax.sharding.AbstractMesh((2,), ("x",))
  spec = jax.sharding.PartitionSpec

  @functools.partial(
    jax.shard_map, mesh=mesh, in_specs=(spec("x"), spec(), spec()), out_specs=spec()
  )
  def loss_grads(x, w, gs):
    loss = lambda x, w: jnp.sum(gmm(x, w, gs) ** 2)
    dx, dw = jax.grad(loss, argnums=(0, 1))(x, w)
    return jax.lax.psum(jnp.sum(dx) + jnp.sum(dw), "x")

  lhs, rhs, group_sizes = _inputs(m=24)
  text = _lowered(loss_grads, lhs, rhs, group_sizes, platform=platform)
  assert not _host_callbacks(text)
  assert "chlo.ragged_dot" in text


# ------------------------------------------------------------------------------------------------
# The MoE layer, built in a pure function from its split state (what a train step lowers).
# ------------------------------------------------------------------------------------------------


def _moe_loss_and_grads():
  config = MoEConfig(d_model=16, num_experts=4, top_k=2, expert_hidden_dim=8)
  graphdef, state = nnx.split(MoE(config, rngs=nnx.Rngs(0)))
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 8, 16)), jnp.float32)

  def loss_and_grads(state, x):
    def loss(state, x):
      y, _ = nnx.merge(graphdef, state)(x)
      return jnp.sum(y**2)

    return jax.value_and_grad(loss, argnums=(0, 1))(state, x)

  return loss_and_grads, state, x


@pytest.mark.parametrize("platform", ACCELERATORS)
def test_moe_layer_lowered_for_an_accelerator_has_no_host_callback(platform):
  fn, state, x = _moe_loss_and_grads()
  text = _lowered(fn, state, x, platform=platform)
  assert not _host_callbacks(text), _custom_call_targets(text)
  assert "chlo.ragged_dot" in text


def test_moe_layer_lowered_for_cpu_calls_the_host_blas():
  fn, state, x = _moe_loss_and_grads()
  text = _lowered(fn, state, x, platform="cpu")
  assert _host_callbacks(text) == {"xla_buffer_python_cpu_callback"}
  assert "ragged_dot" not in text

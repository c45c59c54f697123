"""The seams: an expert kind and a router registered from this file alone, through `MoEConfig`.

The expert kind is a plain MLP whose experts each carry one extra leaf, a learned output scale [E]
(logical axis `expert`); the router is a selection rule of its own (the k experts with the highest
sigmoid scores, weighted by those scores times 2, never renormalised). Both are checked against a
float64 per-expert Python loop written here, and the expert kind also under a 2 x 4 data x expert
mesh with Least-Loaded EP spilling experts (with their scales) to other devices, outputs and
gradients. Nothing outside this file knows either of them.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax import sharding
from moejax.kernels import gmm
from moejax.moe import (
  MoE,
  MoEConfig,
  ParamSpec,
  Routing,
  register_expert_kind,
  register_router,
)

D, F, E, K = 16, 8, 8, 2
RTOL = 1e-5

jax.config.update("jax_enable_x64", False)


# ----------------------------------------------------------------------------------------------------
# A test-registered expert kind: relu MLP experts with a learned per-expert output scale.


def _scaled_params(c: MoEConfig) -> dict[str, ParamSpec]:
  init = jax.nn.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=-2, out_axis=-1,
                                              batch_axis=(0,))  # fmt: skip
  # The kind's own option: the upper end of the scales' initial range.
  high = c.expert_option("scale_high")
  scale_init = lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, 0.5, high)
  return {
    "w_up": ParamSpec(
      (c.num_experts, c.d_model, c.expert_hidden_dim), ("expert", "embed", "mlp"), init
    ),  # fmt: skip
    "w_down": ParamSpec(
      (c.num_experts, c.expert_hidden_dim, c.d_model), ("expert", "mlp", "embed"), init
    ),  # fmt: skip
    "scale": ParamSpec((c.num_experts,), ("expert",), scale_init),
  }


def _scaled_apply(p, x, group_sizes, c: MoEConfig):
  h = jax.nn.relu(gmm(x, p["w_up"], group_sizes, backend=c.gmm_backend))  # [M, F]
  y = gmm(h, p["w_down"], group_sizes, backend=c.gmm_backend)  # [M, D]
  # The expert of each row; rows past sum(group_sizes) are zero already and stay zero.
  expert = jnp.repeat(
    jnp.arange(group_sizes.shape[0]), group_sizes, total_repeat_length=x.shape[0]
  )  # [M]
  return y * p["scale"][expert][:, None]


register_expert_kind("scaled_mlp", _scaled_params, _scaled_apply, options={"scale_high": 1.5})


# ----------------------------------------------------------------------------------------------------
# A test-registered router.


def _sigmoid_top_k_times_two(logits, c: MoEConfig, *, bias=None):
  logits = logits.astype(jnp.float32)
  scores = jax.nn.sigmoid(logits)  # [T, E]
  top, ids = jax.lax.top_k(scores, c.top_k)  # [T, K]
  return Routing(ids.astype(jnp.int32), 2.0 * top, jnp.ones(ids.shape, bool), scores, logits)


register_router("sigmoid_x2", _sigmoid_top_k_times_two, fields=("top_k",))


# ----------------------------------------------------------------------------------------------------
# The float64 per-expert loop.


def _reference(params, x, *, router: str, kind: str, top_k: int = K):
  """y [T, D] in float64: every token through each of its experts, one expert at a time."""
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  x = np.asarray(x, np.float64)
  logits = x @ p["router.kernel"]  # [T, E]
  y = np.zeros_like(x)
  for t in range(x.shape[0]):
    if router == "sigmoid_x2":
      scores = 1.0 / (1.0 + np.exp(-logits[t]))
      chosen = np.argsort(-scores, kind="stable")[:top_k]
      weights = 2.0 * scores[chosen]
    else:  # softmax_topk, renormalised
      z = np.exp(logits[t] - logits[t].max())
      probs = z / z.sum()
      chosen = np.argsort(-probs, kind="stable")[:top_k]
      weights = probs[chosen] / probs[chosen].sum()
    for e, w in zip(chosen, weights, strict=True):
      if kind == "scaled_mlp":
        h = np.maximum(x[t] @ p["experts.w_up"][e], 0.0)
        out = (h @ p["experts.w_down"][e]) * p["experts.scale"][e]
      else:  # glu with swiglu
        g = x[t] @ p["experts.w_gate"][e]
        h = g / (1.0 + np.exp(-g)) * (x[t] @ p["experts.w_up"][e])
        out = h @ p["experts.w_down"][e]
      y[t] += w * out
  return y


def _flat(state) -> dict[str, jax.Array]:
  return {".".join(map(str, path)): v[...] for path, v in nnx.to_flat_state(state)}


def _assert_close(a, b, what):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  scale = float(np.max(np.abs(b))) or 1.0
  err = float(np.max(np.abs(a - b))) / scale
  assert err <= RTOL, f"{what}: max error {err:.2e} x max|ref| (allowed {RTOL})"


@pytest.fixture(scope="module")
def x():
  return jax.random.normal(jax.random.PRNGKey(1), (4, 16, D))


@pytest.mark.parametrize(
  "router, kind, activation",
  [("softmax_topk", "scaled_mlp", "relu"), ("sigmoid_x2", "glu", "swiglu")],
  ids=["expert_kind", "router"],
)
def test_registered_entries_equal_the_per_expert_loop(router, kind, activation, x):
  cfg = MoEConfig(
    d_model=D, num_experts=E, top_k=K, expert_hidden_dim=F, router=router, expert_kind=kind,
    activation=activation,
  )  # fmt: skip
  model = MoE(cfg, rngs=nnx.Rngs(0))
  if kind == "scaled_mlp":  # the kind's own leaf exists, with its logical axes
    assert model.experts.scale[...].shape == (E,)
    assert model.experts.scale.get_metadata()["logical_axes"] == ("expert",)
  y, aux = jax.jit(lambda m, x: m(x))(model, x)
  params = _flat(nnx.state(model, nnx.Param))
  ref = _reference(params, x.reshape(-1, D), router=router, kind=kind)
  _assert_close(y.reshape(-1, D), ref, "output")
  assert float(jnp.sum(aux["expert_counts"])) == x.shape[0] * x.shape[1] * K


def _run(cfg, mesh_cfg, x, *, skew=0.0):
  """(y, grads wrt (params, x), aux) of sum(y * cos(y)), on one device or under a mesh."""
  model = MoE(cfg, rngs=nnx.Rngs(0))
  if skew:  # push most tokens to experts 0 and 1, so that LLEP spills them
    x = x + 1.0
    model.router.kernel[...] = model.router.kernel[...].at[:, :2].add(skew / D)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(params, x):
    y, aux = nnx.merge(graphdef, params, rest)(x)
    return jnp.sum(y * jnp.cos(y)), (y, aux)

  f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
  if mesh_cfg is None:
    (_, (y, aux)), grads = f(params, x)
  else:
    with jax.set_mesh(sharding.make_mesh(mesh_cfg)), sharding.use_rules(sharding.LOGICAL_RULES):
      (_, (y, aux)), grads = f(params, x)
  return y, grads, aux


@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_registered_expert_kind_under_expert_parallelism_with_llep(dispatch, x):
  cfg = MoEConfig(
    d_model=D, num_experts=E, top_k=K, expert_hidden_dim=F, expert_kind="scaled_mlp",
    activation="relu", gmm_backend="xla", dispatch=dispatch, capacity_factor=2.0,
    llep_alpha=1.0, llep_slots=2,
  )  # fmt: skip
  y0, g0, a0 = _run(cfg, None, x, skew=3.0)
  y1, g1, a1 = _run(cfg, dict(data=2, expert=4), x, skew=3.0)
  # LLEP really moved experts: some device computed copies of experts it does not own.
  assert not np.array_equal(np.asarray(a1["device_load"]), np.asarray(a1["native_device_load"]))
  _assert_close(y1, y0, "output")
  flat0 = jax.tree.leaves_with_path(g0)
  for (path, b), a in zip(flat0, jax.tree.leaves(g1), strict=True):
    _assert_close(a, b, f"gradient {jax.tree_util.keystr(path)}")
  names = [jax.tree_util.keystr(p) for p, _ in flat0]
  assert any("scale" in n for n in names)  # the kind's own leaf got its gradient too
  np.testing.assert_array_equal(a1["expert_counts"], a0["expert_counts"])
  np.testing.assert_allclose(a1["dropped_fraction"], a0["dropped_fraction"], atol=1e-7)


def test_unknown_entries_fail_naming_the_field():
  base = dict(d_model=D, num_experts=E, top_k=K, expert_hidden_dim=F)
  with pytest.raises(ValueError, match=r"MoEConfig\.expert_kind='nope' .*scaled_mlp"):
    MoEConfig(**base, expert_kind="nope")
  with pytest.raises(ValueError, match=r"MoEConfig\.router='nope' .*sigmoid_x2"):
    MoEConfig(**base, router="nope")
  with pytest.raises(ValueError, match=r"MoEConfig\.activation='swiglu' .*expert_kind='mlp'"):
    MoEConfig(**base, expert_kind="mlp")


def test_routing_from_expert_choice_passes_through_jit(x):
  cfg = MoEConfig(d_model=D, num_experts=E, top_k=K, expert_hidden_dim=F, router="expert_choice")
  model = MoE(cfg, rngs=nnx.Rngs(0))
  _, _, routing = jax.jit(lambda m, x: m(x, return_routing=True))(model, x)
  assert routing.capacity == cfg.capacity(x.shape[0] * x.shape[1])
  back = jax.jit(lambda r: r)(routing)
  np.testing.assert_array_equal(back.expert_ids, routing.expert_ids)


def test_the_kinds_option_is_settable_from_the_command_line():
  """A field of MoEConfig (`expert_options`) carries the test-registered kind's own option from
  `--config.model.moe.*` to the layer, through the experiment config as the CLI parses it."""
  from pathlib import Path

  from absl import flags
  from ml_collections import config_flags

  from moejax.train.trainer import build_model_config

  experiments = Path(__file__).resolve().parents[2] / "experiments"
  argv = [
    "prog",
    f"--config={experiments / 'mixtral.py'}:tiny",
    "--config.model.moe.expert_kind=scaled_mlp",
    "--config.model.moe.activation=relu",
    "--config.model.moe.expert_options=(('scale_high', 4.0),)",
  ]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file(
    "config", None, "", flag_values=flag_values, lock_config=True, sys_argv=argv
  )
  flag_values(argv)
  moe = build_model_config(flag_values.config, 264).moe
  assert moe.expert_kind == "scaled_mlp" and moe.expert_option("scale_high") == 4.0
  layer = MoE(moe.replace(d_model=D, expert_hidden_dim=F), rngs=nnx.Rngs(0))
  assert float(jnp.max(layer.experts.scale[...])) > 1.5  # drawn from [0.5, 4.0), not [0.5, 1.5)
  with pytest.raises(
    ValueError, match=r"expert_kind='scaled_mlp' has no option 'rank'.*scale_high"
  ):
    moe.replace(expert_options={"rank": 2})

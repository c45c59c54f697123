"""Per-layer block specs (`ModelConfig.layers`): config round trips, validation, the scanned layout
of a heterogeneous stack, per-layer expert counts in aux, and the block-kind registry."""

import json

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from moejax.models import (
  Block,
  BlockSpec,
  ModelConfig,
  Transformer,
  layer_layout,
  register_block,
  stack_layers,
  unstack_layers,
)
from moejax.moe import MoEConfig
from moejax.train.config import base_config
from moejax.train.trainer import build_model_config
from tests.models.test_transformer import BASE, MOE, assert_close, flat, rngs, tokens, train_step

D, E = BASE.d_model, MOE.num_experts


def moe(e: int, **changes) -> MoEConfig:
  return MOE.replace(num_experts=e, **changes)


# Dense | (MoE 8, MoE 4) x 2 | MoE 6: the scan covers a period with two MoE layers of different E.
HETERO = BASE.replace(
  num_layers=6,
  moe=MOE,
  layers=(
    BlockSpec(moe=None),
    BlockSpec(moe=moe(8)),
    BlockSpec(moe=moe(4)),
    BlockSpec(moe=moe(8)),
    BlockSpec(moe=moe(4)),
    BlockSpec(moe=moe(6)),
  ),
)


def test_layer_dicts_override_the_model_moe_block():
  config = base_config()
  m = config.model
  m.update(d_model=D, num_layers=4, num_heads=4, num_kv_heads=2, dense_hidden_dim=48)
  m.moe.update(num_experts=4, top_k=2, expert_hidden_dim=16)
  config.lock()
  m.layers = (
    {"moe": {"num_experts": 8}},
    {"moe": None},
    {"moe": {"num_experts": 6, "top_k": 1}},
    {},  # no moe key: the model's moe block as is
  )
  c = build_model_config(config, 64)
  assert c.moe_layers == (0, 2, 3) and c.moe_num_experts == (8, 6, 4) and c.max_num_experts == 8
  assert [c.layer_moe(i) and c.layer_moe(i).top_k for i in range(4)] == [2, None, 1, 2]
  assert c.layer_moe(0).expert_hidden_dim == 16 and c.layer_moe(0).d_model == D
  assert all(spec.attention == "gqa" and spec.kind == "transformer" for spec in c.block_specs)
  # to_dict -> from_config, also through JSON (what the trainer's config.json holds).
  assert ModelConfig.from_config(c.to_dict()) == c
  as_json = ml_collections.ConfigDict(json.loads(json.dumps(c.to_dict())))
  assert ModelConfig.from_config(as_json) == c
  # ConfigDict entries, and the pattern shorthand resolving to the same specs.
  pattern = BASE.replace(num_layers=3, moe=MOE, first_k_dense=1)
  explicit = ModelConfig.from_config(
    {**pattern.to_dict(), "first_k_dense": 0, "layers": [{"moe": None}, {}, {}]}
  )
  assert explicit.block_specs == pattern.block_specs and pattern.layers is None


@pytest.mark.parametrize(
  "layers,changes,message",
  [
    ([{}, {}], {}, r"ModelConfig.layers=.*num_layers=3"),
    ([{}, {"moe": {"num_experts": 0}}, {}], {}, r"ModelConfig.layers\[1\].moe.num_experts=0"),
    ([{}, {}, {"moe": {"top_k": 9}}], {}, r"ModelConfig.layers\[2\].moe.top_k=9"),
    ([{}, {"moe": {"experts": 4}}, {}], {}, r"ModelConfig.layers\[1\].moe: MoEConfig has no"),
    ([{}, {"kind": "nope"}, {}], {}, r"ModelConfig.layers\[1\].kind='nope'.*transformer"),
    ([{}, {"attention": "x"}, {}], {}, r"ModelConfig.layers\[1\].attention='x'"),
    ([{}, {"ffn": 1}, {}], {}, r"ModelConfig.layers\[1\] has no field"),
    ([{}, {}, {}], {"moe_every": 2}, r"ModelConfig.moe_every=2.*when `layers` is given"),
    ([{}, {}, {}], {"first_k_dense": 1}, r"ModelConfig.first_k_dense=1"),
    ([{"moe": None}, {}, {}], {"dense_hidden_dim": None}, r"dense_hidden_dim"),
  ],
)
def test_layer_errors_name_the_field(layers, changes, message):
  fields = {**BASE.replace(num_layers=3, moe=MOE).to_dict(), **changes, "layers": layers}
  with pytest.raises(ValueError, match=message):
    ModelConfig.from_config(fields)


def _specs(names: str) -> tuple[BlockSpec, ...]:
  """'d8486' -> dense, MoE 8, MoE 4, ...: one character per layer."""
  return tuple(BlockSpec(moe=None if ch == "d" else moe(int(ch))) for ch in names)


@pytest.mark.parametrize(
  "names,layout",
  [
    ("dddd", (0, 1, 4, 0)),
    ("d8484", (1, 2, 2, 0)),
    ("848486", (0, 2, 2, 2)),  # (8, 4) x 2, then 8, 6: the run stops at 6
    ("d8888", (1, 1, 4, 0)),
    ("8d64", (4, 1, 0, 0)),  # all different: no scanned run
    ("8846", (0, 1, 2, 2)),
  ],
)
def test_layer_layout_is_the_longest_periodic_run(names, layout):
  c = BASE.replace(num_layers=len(names), moe=MOE, layers=_specs(names), scan_layers=True)
  assert layer_layout(c) == layout
  model = nnx.eval_shape(lambda: Transformer(c, rngs=rngs()))
  prefix, period, units, suffix = layout
  assert len(model.prefix_blocks) == prefix and len(model.suffix_blocks) == suffix
  assert (model.scanned_blocks is None) == (units == 0)


def test_pattern_configs_keep_their_layout():
  # The shorthand's layout is today's formula, even where a search would find another run.
  c = BASE.replace(num_layers=5, moe=MOE, moe_every=2, scan_layers=True)
  assert layer_layout(c) == (0, 2, 2, 1)
  assert layer_layout(BASE.replace(num_layers=3, scan_layers=True)) == (0, 1, 3, 0)


def _hetero_models():
  unscanned = Transformer(HETERO, rngs=rngs())
  scanned = nnx.eval_shape(lambda: Transformer(HETERO.replace(scan_layers=True), rngs=rngs()))
  nnx.update(scanned, stack_layers(nnx.state(unscanned), HETERO))
  return scanned, unscanned


@pytest.mark.slow  # a scanned and an unscanned 6-layer train step: ~40 s on 2 cores
def test_hetero_stack_scanned_matches_unscanned():
  scanned, unscanned = _hetero_models()
  assert layer_layout(HETERO) == (1, 2, 2, 1)
  shapes = {k: v.shape for k, v in flat(nnx.state(unscanned, nnx.Param)).items()}
  for i, e in zip((1, 2, 3, 4, 5), (8, 4, 8, 4, 6), strict=True):
    assert shapes[f"blocks.{i}.moe.router.kernel"] == (D, e)
  sshapes = {k: v.shape for k, v in flat(nnx.state(scanned, nnx.Param)).items()}
  assert sshapes["scanned_blocks.0.moe.router.kernel"] == (2, D, 8)
  assert sshapes["scanned_blocks.1.moe.router.kernel"] == (2, D, 4)
  assert sshapes["suffix_blocks.0.moe.router.kernel"] == (D, 6)
  # unstack_layers inverts stack_layers on the heterogeneous layout too.
  back = flat(unstack_layers(nnx.state(scanned), HETERO))
  original = flat(nnx.state(unscanned))
  assert back.keys() == original.keys()
  for k in original:
    np.testing.assert_array_equal(back[k], original[k], err_msg=k)

  toks = tokens()
  loss_s, logits_s, aux_s, grads_s = train_step(scanned, toks)
  loss_u, logits_u, aux_u, grads_u = train_step(unscanned, toks)
  assert_close(logits_s, logits_u, what="logits")
  assert_close(loss_s, loss_u, what="loss")
  assert aux_s.keys() == aux_u.keys()
  for k in aux_u:
    assert_close(aux_s[k], aux_u[k], what=k)  # rows in layer order in both layouts
  g_s, g_u = flat(unstack_layers(grads_s, HETERO)), flat(grads_u)
  for k in g_u:
    assert_close(g_s[k], g_u[k], what=f"grad {k}")

  # Per-expert rows are zero-padded past each layer's real experts.
  counts = np.asarray(aux_u["expert_counts"])
  assert counts.shape == (5, 8) and aux_u["router_entropy"].shape == (5,)
  b, s = toks.shape
  for row, e in enumerate(HETERO.moe_num_experts):
    assert counts[row, :e].sum() == b * s * MOE.top_k and not counts[row, e:].any()
    np.testing.assert_allclose(np.asarray(aux_u["expert_load"])[row, :e].sum(), 1.0, rtol=1e-6)


@pytest.mark.parametrize("scan", [False, True])
def test_hetero_update_aux_free_bias_uses_each_layers_experts(scan):
  scanned, unscanned = _hetero_models()
  model = scanned if scan else unscanned
  counts = jnp.asarray(np.random.default_rng(0).integers(0, 9, (5, 8)), jnp.float32)
  model.update_aux_free_bias(counts)
  biases = flat(nnx.state(unstack_layers(nnx.state(model), HETERO) if scan else model))
  for row, (i, e) in enumerate(zip(HETERO.moe_layers, HETERO.moe_num_experts, strict=True)):
    real = np.asarray(counts[row, :e])
    expected = MOE.aux_free_bias_rate * np.sign(real.mean() - real)
    np.testing.assert_allclose(biases[f"blocks.{i}.moe.router.aux_free_bias"], expected, rtol=1e-6)


def test_register_block_adds_a_kind():
  class ScaledBlock(Block):
    """A second block kind: the pre-norm block with its output doubled."""

    def __call__(self, x, *args, **kwargs):
      x, *rest = super().__call__(x, *args, **kwargs)
      return (2 * x, *rest)

  register_block("test_scaled", ScaledBlock)
  with pytest.raises(ValueError, match="already registered"):
    register_block("test_scaled", Block)
  c = BASE.replace(layers=(BlockSpec(), BlockSpec(kind="test_scaled")), dense_hidden_dim=48)
  model = Transformer(c, rngs=rngs())
  assert type(model.blocks[0]) is Block and type(model.blocks[1]) is ScaledBlock
  logits, _ = model(tokens())
  assert logits.shape == (2, 8, BASE.vocab_size) and bool(jnp.all(jnp.isfinite(logits)))


def test_mixed_attention_layers():
  mla = dict(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8)
  c = BASE.replace(
    num_kv_heads=None, layers=(BlockSpec(attention="mla", moe=moe(4)), BlockSpec()), **mla
  )
  model = Transformer(c, rngs=rngs())
  names = flat(nnx.state(model, nnx.Param))
  assert "blocks.0.attn.kv_a_proj.kernel" in names and "blocks.1.attn.k_proj.kernel" in names
  assert c.block_specs[1].attention == "gqa"
  logits, aux = model(tokens())
  assert bool(jnp.all(jnp.isfinite(logits))) and aux["expert_counts"].shape == (1, 4)
  with pytest.raises(ValueError, match="kv_lora_rank"):
    BASE.replace(layers=(BlockSpec(attention="mla"), BlockSpec()))

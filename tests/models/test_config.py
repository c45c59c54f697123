"""ModelConfig: validation errors name the field; the layer pattern; the ConfigDict round trip."""

import jax.numpy as jnp
import ml_collections
import pytest

from moejax.models import ModelConfig
from moejax.moe import MoEConfig
from moejax.testing import tiny_moe_config

BASE = dict(vocab_size=64, d_model=32, num_layers=4, num_heads=4, dense_hidden_dim=48)
MOE = tiny_moe_config()  # D=32, E=4, K=2, F=16
MLA = dict(attention="mla", kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)
YARN = {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096}


@pytest.mark.parametrize(
  "changes,field",
  [
    (dict(num_heads=5), "num_heads"),  # does not divide d_model and head_dim is None
    (dict(num_kv_heads=3), "num_kv_heads"),  # does not divide num_heads
    (dict(first_k_dense=5, moe=MOE), "first_k_dense"),  # > num_layers
    (dict(first_k_dense=-1), "first_k_dense"),
    (dict(moe_every=0, moe=MOE), "moe_every"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(num_layers=2.0), "num_layers"),
    (dict(head_dim=7), "head_dim"),  # odd: RoPE rotates pairs
    (dict(activation="swish"), "activation"),
    (dict(dtype="float64"), "dtype"),
    (dict(param_dtype="int8"), "param_dtype"),
    (dict(rope_theta=0.0), "rope_theta"),
    (dict(norm_eps=-1e-6), "norm_eps"),
    (dict(load_balance_coef=-0.1), "load_balance_coef"),
    (dict(z_loss_coef=float("nan")), "z_loss_coef"),
    (dict(moe=MOE.replace(d_model=16)), "moe.d_model"),
    (dict(moe={"num_experts": 4}), "moe"),
    (dict(dense_hidden_dim=None), "dense_hidden_dim"),  # the dense model needs it
    (dict(attention="mha"), "attention"),
    (dict(qk_norm="layer"), "qk_norm"),
    (dict(clip_qkv=0.0), "clip_qkv"),
    (dict(clip_qkv=float("inf")), "clip_qkv"),
    (dict(rope_interleave=1), "rope_interleave"),
    (dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), "rope_scaling"),
    (dict(rope_scaling={"type": "dynamic", "factor": 2.0}), "rope_scaling"),
    (dict(rope_scaling={**YARN, "low_freq_factor": 1.0}), "rope_scaling"),  # unknown key
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope_scaling"),  # missing key
    (dict(rope_scaling={**YARN, "factor": "big"}), "rope_scaling"),
    (dict(rope_scaling=3), "rope_scaling"),
    (dict(kv_lora_rank=16), "kv_lora_rank"),  # an MLA width with attention="gqa"
    (dict(q_lora_rank=8), "q_lora_rank"),
    (dict(MLA, kv_lora_rank=None), "kv_lora_rank"),  # required by MLA
    (dict(MLA, v_head_dim=0), "v_head_dim"),
    (dict(MLA, qk_rope_head_dim=5), "qk_rope_head_dim"),  # odd: RoPE rotates pairs
    (dict(MLA, q_lora_rank=0), "q_lora_rank"),
    (dict(MLA, num_kv_heads=2), "num_kv_heads"),
    (dict(MLA, head_dim=8), "head_dim"),
    (dict(MLA, qk_norm="head"), "qk_norm"),
    (dict(MLA, clip_qkv=8.0), "clip_qkv"),
    (dict(mlp_only_layers=(4,)), "mlp_only_layers"),  # out of range
    (dict(mlp_only_layers=(1.0,)), "mlp_only_layers"),
    (dict(mlp_only_layers=(1,), scan_layers=True), "mlp_only_layers"),  # not periodic
  ],
)
def test_validation_names_the_field(changes, field):
  with pytest.raises(ValueError, match=rf"ModelConfig\.{field}="):
    ModelConfig(**{**BASE, **changes})


def test_valid_variants():
  # head_dim set explicitly need not divide d_model; all-MoE models need no dense_hidden_dim.
  c = ModelConfig(**{**BASE, "num_heads": 5, "head_dim": 8, "num_kv_heads": 1})
  assert (c.resolved_head_dim, c.resolved_num_kv_heads) == (8, 1)
  c = ModelConfig(**{**BASE, "dense_hidden_dim": None, "moe": MOE})
  assert c.moe_layers == (0, 1, 2, 3)
  assert ModelConfig(**BASE).resolved_head_dim == 8 and ModelConfig(**BASE).moe_layers == ()


def test_new_attention_fields():
  # MLA ignores num_heads | d_model and head_dim; the mla widths are its head sizes.
  c = ModelConfig(**{**BASE, "num_heads": 5}, **MLA, q_lora_rank=24)
  assert (c.attention, c.q_lora_rank, c.kv_lora_rank) == ("mla", 24, 16)
  # rope_scaling: a mapping becomes a sorted, hashable tuple of items; rope_theta is dropped
  # (ModelConfig.rope_theta holds it); "type" is HF's old name for rope_type.
  c = ModelConfig(**BASE, rope_scaling={**YARN, "rope_theta": 1e4, "mscale": 1.0})
  assert c.rope_scaling == tuple(sorted({**YARN, "mscale": 1.0}.items()))
  hash(c)
  old = ModelConfig(
    **BASE, rope_scaling={"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 8}
  )
  assert dict(old.rope_scaling)["type"] == "yarn"
  assert ModelConfig(**BASE, rope_scaling={"rope_type": "default"}).rope_scaling == (
    ("rope_type", "default"),
  )
  c = ModelConfig(**BASE, qk_norm="proj", clip_qkv=8, rope_interleave=True)
  assert (c.qk_norm, c.clip_qkv, c.rope_interleave) == ("proj", 8, True)


def test_mlp_only_layers():
  # Qwen2-MoE: decoder_sparse_step=2 -> first_k_dense=1, moe_every=2; mlp_only_layers=[3] -> dense.
  c = ModelConfig(
    **{**BASE, "num_layers": 6}, moe=MOE, first_k_dense=1, moe_every=2, mlp_only_layers=[5, 3]
  )
  assert c.mlp_only_layers == (3, 5)  # normalised to a sorted tuple
  assert c.moe_layers == (1,)
  assert [c.is_moe_layer(i) for i in range(6)] == [False, True, False, False, False, False]
  # Every layer dense through mlp_only_layers: dense_hidden_dim is required.
  with pytest.raises(ValueError, match=r"ModelConfig\.dense_hidden_dim="):
    ModelConfig(**{**BASE, "dense_hidden_dim": None}, moe=MOE, mlp_only_layers=(0,))


def test_layer_pattern_and_dtypes():
  c = ModelConfig(
    **{**BASE, "num_layers": 7},
    moe=MOE,
    first_k_dense=1,
    moe_every=2,
    dtype="bfloat16",
    param_dtype="float32",
  )
  assert c.moe_layers == (1, 3, 5) and c.num_moe_layers == 3
  assert [c.is_moe_layer(i) for i in range(7)] == [False, True, False, True, False, True, False]
  assert c.dtype == jnp.bfloat16 and c.param_dtype == jnp.float32
  # The model's dtypes reach its MoE layers.
  assert c.moe.dtype == jnp.bfloat16 and c.moe.param_dtype == jnp.float32
  assert ModelConfig(**BASE, moe=MOE, first_k_dense=4).moe_layers == ()


def test_from_config_round_trip():
  model = ml_collections.ConfigDict()
  model.vocab_size = 64
  model.d_model = 32
  model.num_layers = 6
  model.num_heads = 4
  model.num_kv_heads = 2
  model.dense_hidden_dim = 48
  model.first_k_dense = 1
  model.moe_every = 2
  model.scan_layers = True
  model.dtype = "bfloat16"
  model.z_loss_coef = 0.001
  model.moe = ml_collections.ConfigDict()
  model.moe.num_experts = 8
  model.moe.top_k = 2
  model.moe.expert_hidden_dim = 16
  model.moe.router = "sigmoid"
  model.moe.aux_free_bias = True
  c = ModelConfig.from_config(model)
  expected = ModelConfig(
    vocab_size=64,
    d_model=32,
    num_layers=6,
    num_heads=4,
    num_kv_heads=2,
    dense_hidden_dim=48,
    first_k_dense=1,
    moe_every=2,
    scan_layers=True,
    dtype=jnp.bfloat16,
    z_loss_coef=0.001,
    moe=MoEConfig(
      d_model=32,
      num_experts=8,
      top_k=2,
      expert_hidden_dim=16,
      router="sigmoid",
      aux_free_bias=True,
    ),
  )
  assert c == expected
  assert c.moe.d_model == 32 and c.moe.dtype == jnp.bfloat16
  # ConfigDict -> ModelConfig -> dict -> ConfigDict -> the same ModelConfig.
  assert ModelConfig.from_config(ml_collections.ConfigDict(c.to_dict())) == c
  dense = ml_collections.ConfigDict({**BASE, "moe": None})
  assert ModelConfig.from_config(dense).moe is None
  # The attention fields survive the round trip too (rope_scaling as a plain dict in to_dict).
  c = ModelConfig(
    **BASE,
    **MLA,
    q_lora_rank=24,
    rope_interleave=True,
    rope_scaling={**YARN, "mscale": 1.0, "mscale_all_dim": 1.0},
    mlp_only_layers=(0, 2),
  )
  d = c.to_dict()
  assert d["rope_scaling"] == {**YARN, "mscale": 1.0, "mscale_all_dim": 1.0}
  assert ModelConfig.from_config(ml_collections.ConfigDict(d)) == c
  assert ModelConfig.from_config(d) == c
  gqa = ModelConfig(**BASE, qk_norm="proj", clip_qkv=8.0)
  assert ModelConfig.from_config(ml_collections.ConfigDict(gqa.to_dict())) == gqa


def test_from_config_rejects_unknown_keys():
  with pytest.raises(ValueError, match="num_expert"):
    ModelConfig.from_config({**BASE, "num_expert": 8})
  with pytest.raises(ValueError, match="top_kk"):
    ModelConfig.from_config(
      {**BASE, "moe": {"num_experts": 4, "top_kk": 2, "expert_hidden_dim": 8}}
    )
  with pytest.raises(ValueError, match=r"MoEConfig\.top_k="):
    ModelConfig.from_config({**BASE, "moe": {"num_experts": 4, "top_k": 5, "expert_hidden_dim": 8}})

"""load_hf / save_hf against transformers: tiny random models give the same float32 logits.

Each family's tiny config exercises what makes it differ: dense and MoE layers, shared experts (and
Qwen2-MoE's gate), group-limited routing, the DeepSeek-V3 correction bias, qkv biases, both qk-norm
kinds, clip_qkv, head_dim != hidden / heads, MLA with and without q_lora_rank, interleaved and
rotate-half RoPE, YaRN, tied embeddings and router jitter (off in eval mode). Weights are re-drawn at
unit scale (transformers' init is std 0.02, which would leave attention and routing nearly uniform).
"""

import functools
import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from moejax.interop import (  # noqa: E402
  SUPPORTED_MODEL_TYPES,
  config_from_hf,
  config_to_hf,
  load_hf,
  save_hf,
)
from moejax.models import ModelConfig, Transformer, stack_layers  # noqa: E402
from moejax.moe import AuxFreeBias, MoEConfig  # noqa: E402

# Max |logit difference| relative to max |logit| (float32, composite model: STYLE.md's 1e-4).
RTOL = 1e-4
B, S = 2, 12
FAST_COMPILE = {"xla_backend_optimization_level": 0}

T = transformers
_COMMON = dict(
  vocab_size=128, hidden_size=32, num_attention_heads=4, pad_token_id=0, eos_token_id=1
)
CONFIGS = {
  # All layers MoE; router jitter (training only: both sides in eval mode); default theta 1e6.
  "mixtral": lambda: T.MixtralConfig(
    **_COMMON,
    intermediate_size=48,
    num_hidden_layers=2,
    num_key_value_heads=2,
    num_local_experts=4,
    router_jitter_noise=0.1,
  ),
  # decoder_sparse_step=2 with mlp_only_layers=[3]: layers 0, 2, 3 dense, 1 MoE; qkv bias; shared
  # expert with its sigmoid gate; no renormalisation; tied embeddings.
  "qwen2_moe": lambda: T.Qwen2MoeConfig(
    **_COMMON,
    intermediate_size=48,
    moe_intermediate_size=24,
    shared_expert_intermediate_size=40,
    num_hidden_layers=4,
    num_key_value_heads=2,
    num_experts=4,
    num_experts_per_tok=2,
    decoder_sparse_step=2,
    mlp_only_layers=[3],
    tie_word_embeddings=True,
  ),
  # Per-head q/k norms; head_dim 16 != 32 / 4; mlp_only_layers=[0] (= first_k_dense=1); renormalised;
  # YaRN on rotate-half RoPE (only cos/sin carry its attention factor here).
  "qwen3_moe": lambda: T.Qwen3MoeConfig(
    **_COMMON,
    intermediate_size=48,
    moe_intermediate_size=24,
    num_hidden_layers=3,
    num_key_value_heads=2,
    head_dim=16,
    num_experts=8,
    num_experts_per_tok=2,
    norm_topk_prob=True,
    mlp_only_layers=[0],
    max_position_embeddings=128,
    rope_parameters=dict(
      rope_type="yarn", rope_theta=1e6, factor=4.0, original_max_position_embeddings=32
    ),
  ),
  # q/k norms over the whole projection, then clip_qkv (which clips unit-scale activations).
  "olmoe": lambda: T.OlmoeConfig(
    **_COMMON,
    intermediate_size=24,
    num_hidden_layers=2,
    num_key_value_heads=2,
    num_experts=8,
    num_experts_per_tok=2,
    clip_qkv=1.5,
  ),
  # MLA without q_lora_rank, interleaved RoPE with YaRN (attention factor != 1 and the mscale
  # softmax correction); group_limited_greedy; two shared experts; routed_scaling_factor.
  "deepseek_v2": lambda: T.DeepseekV2Config(
    **_COMMON,
    intermediate_size=48,
    moe_intermediate_size=16,
    num_hidden_layers=3,
    num_key_value_heads=4,
    n_routed_experts=8,
    num_experts_per_tok=2,
    n_shared_experts=2,
    topk_method="group_limited_greedy",
    n_group=4,
    topk_group=2,
    routed_scaling_factor=1.5,
    first_k_dense_replace=1,
    q_lora_rank=None,
    kv_lora_rank=16,
    qk_nope_head_dim=8,
    qk_rope_head_dim=8,
    v_head_dim=12,
    max_position_embeddings=256,
    rope_parameters=dict(
      rope_type="yarn",
      rope_theta=10000.0,
      factor=4.0,
      original_max_position_embeddings=64,
      mscale=1.0,
      mscale_all_dim=0.707,
    ),
  ),
  # MLA with q_lora_rank; sigmoid router with e_score_correction_bias and groups (top-2 sums);
  # interleaved RoPE with YaRN; one dense layer first. transformers 5.23 masks the dropped groups
  # with -inf as moejax does (earlier versions used 0.0: the same while every biased score s + b
  # is positive, as with these 0.1-scale biases and s = sigmoid(.) around 0.5).
  "deepseek_v3": lambda: T.DeepseekV3Config(
    **_COMMON,
    intermediate_size=48,
    moe_intermediate_size=16,
    num_hidden_layers=3,
    num_key_value_heads=4,
    n_routed_experts=8,
    num_experts_per_tok=2,
    n_shared_experts=1,
    n_group=4,
    topk_group=2,
    first_k_dense_replace=1,
    q_lora_rank=24,
    kv_lora_rank=16,
    qk_nope_head_dim=8,
    qk_rope_head_dim=8,
    v_head_dim=12,
    max_position_embeddings=256,
    rope_parameters=dict(
      rope_type="yarn",
      rope_theta=10000.0,
      factor=4.0,
      original_max_position_embeddings=64,
      mscale=1.0,
      mscale_all_dim=1.0,
    ),
  ),
}
# DeepSeek-V3 with rotate-half RoPE (rope_interleave=False) and no rope scaling.
CONFIGS["deepseek_v3_rotate_half"] = lambda: T.DeepseekV3Config(
  **{
    **CONFIGS["deepseek_v3"]().to_dict(),
    "rope_interleave": False,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
  }
)


def _randomize(model, seed: int = 0) -> None:
  """Unit-scale weights: norms near 1, small biases, Linear weights with std 1/sqrt(fan_in)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in [*model.named_parameters(), *model.named_buffers()]:
      if "inv_freq" in name:
        continue
      noise = torch.randn(p.shape, generator=g)
      if name.endswith("norm.weight") or "layernorm" in name:
        p.copy_(1 + 0.2 * noise)
      elif name.endswith("bias"):  # qkv biases, e_score_correction_bias
        p.copy_(0.1 * noise)
      else:  # [.., out, in] (fused experts too): the last axis is the fan-in
        p.copy_(noise / p.shape[-1] ** 0.5)


def hf_model(name: str, seed: int = 0):
  torch.manual_seed(seed)
  model = T.AutoModelForCausalLM.from_config(CONFIGS[name](), attn_implementation="eager")
  _randomize(model, seed)
  return model.eval()


def tokens(vocab: int = 128, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, vocab, (B, S))


def hf_logits(model, toks: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.as_tensor(toks)).logits.float().numpy()


@functools.cache
def _apply(graphdef):
  return jax.jit(lambda state, t: nnx.merge(graphdef, state)(t)[0], compiler_options=FAST_COMPILE)


def moejax_logits(model, toks: np.ndarray) -> np.ndarray:
  graphdef, state = nnx.split(model)
  return np.asarray(_apply(graphdef)(state, jnp.asarray(toks)))


def assert_logits_close(out: np.ndarray, ref: np.ndarray, rtol: float = RTOL) -> float:
  assert out.shape == ref.shape
  err = float(np.max(np.abs(out - ref)) / np.max(np.abs(ref)))
  assert err <= rtol, f"max |logit error| / max |logit| = {err:.3g} > {rtol}"
  return err


def params(model) -> dict[str, np.ndarray]:
  return {
    ".".join(map(str, p)): np.asarray(v.get_value())
    for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
  }


def _rewrite(directory, change) -> None:
  """Apply `change` to the tensors of directory/model.safetensors (a dict of torch tensors)."""
  file = str(directory / "model.safetensors")
  tensors = safetensors_torch.load_file(file)
  change(tensors)
  safetensors_torch.save_file(tensors, file, metadata={"format": "pt"})


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """name -> (directory of the save_pretrained checkpoint, the transformers model)."""
  cache = {}

  def get(name):
    if name not in cache:
      model = hf_model(name)
      directory = tmp_path_factory.mktemp(name)
      model.save_pretrained(directory)
      cache[name] = directory, model
    return cache[name]

  return get


# --------------------------------------------------------------------------------------------------
# Import.


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(name, saved):
  directory, hf = saved(name)
  keys = safetensors_torch.load_file(str(directory / "model.safetensors")).keys()
  # transformers 5.23's save_pretrained writes the hub layout: one tensor per expert.
  assert any(re.search(r"\.experts\.0\.(w1|gate_proj)\.weight$", k) for k in keys)
  if name.startswith("deepseek_v3"):
    # Multi-token-prediction layers (after num_hidden_layers) and rotary buffers are ignored.
    _rewrite(
      directory,
      lambda t: t.update(
        {
          "model.layers.3.eh_proj.weight": torch.zeros(32, 64),
          "model.layers.3.mlp.gate.weight": torch.zeros(8, 32),
          "model.layers.0.self_attn.rotary_emb.inv_freq": torch.zeros(4),
        }
      ),
    )
  model, config = load_hf(directory)
  assert config.moe.dispatch == "dropless" and config.dtype == jnp.float32
  assert all(v.dtype == np.float32 for v in params(model).values())
  toks = tokens()
  assert_logits_close(moejax_logits(model, toks), hf_logits(hf, toks))


def test_sharded_checkpoint(saved, tmp_path):
  _, hf = saved("mixtral")
  hf.save_pretrained(tmp_path, max_shard_size="20KB")
  index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
  assert len(set(index["weight_map"].values())) > 1
  assert not (tmp_path / "model.safetensors").exists()
  model, _ = load_hf(tmp_path)
  toks = tokens()
  assert_logits_close(moejax_logits(model, toks), hf_logits(hf, toks))


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_fused_expert_layout(name, saved, tmp_path):
  """transformers 5's in-memory layout: `mlp.experts.gate_up_proj` [E, 2F, D] (gate rows first),
  `mlp.experts.down_proj` [E, D, F], written with safetensors directly (Mixtral's block is `mlp`)."""
  _, hf = saved(name)
  state = {k: v.contiguous() for k, v in hf.state_dict().items()}
  if hf.config.tie_word_embeddings:
    state.pop("lm_head.weight")
  assert any(k.endswith("mlp.experts.gate_up_proj") for k in state)
  safetensors_torch.save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
  hf.config.to_json_file(tmp_path / "config.json")
  model, _ = load_hf(tmp_path)
  toks = tokens()
  assert_logits_close(moejax_logits(model, toks), hf_logits(hf, toks))
  # The same parameters as from the per-expert checkpoint.
  per_expert, _ = load_hf(saved(name)[0])
  expected = params(per_expert)
  for k, v in params(model).items():
    np.testing.assert_array_equal(v, expected[k], err_msg=k)


def test_save_pretrained_fused_format(saved, tmp_path):
  _, hf = saved("mixtral")
  hf.save_pretrained(tmp_path, save_original_format=False)
  model, _ = load_hf(tmp_path)
  toks = tokens()
  assert_logits_close(moejax_logits(model, toks), hf_logits(hf, toks))


@pytest.mark.parametrize("name", [pytest.param("mixtral", marks=pytest.mark.slow), "deepseek_v3"])
def test_scan_layers(name, saved):
  """Mixtral: all layers scanned, with router-jitter RNG state; DeepSeek-V3: a dense prefix."""
  directory, hf = saved(name)
  model, config = load_hf(directory, scan_layers=True)
  assert config.scan_layers and model.scanned_blocks is not None
  toks = tokens()
  assert_logits_close(moejax_logits(model, toks), hf_logits(hf, toks))
  # Built directly in the scanned layout: the same variables as stack_layers of the unscanned load.
  unscanned, _ = load_hf(directory)
  expected = nnx.to_flat_state(stack_layers(nnx.state(unscanned, nnx.Param), config))
  got = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  assert len(got) == len(expected)
  for p, var in expected:
    assert got[p].get_metadata().get("logical_axes") == var.get_metadata().get("logical_axes")
    np.testing.assert_array_equal(got[p].get_value(), var.get_value(), err_msg=str(p))


def test_scan_layers_refuses_mlp_only_layers(saved):
  # Qwen2-MoE's mlp_only_layers=[3] breaks the period: no scanned layout.
  with pytest.raises(ValueError, match=r"mlp_only_layers"):
    load_hf(saved("qwen2_moe")[0], scan_layers=True)


def test_bfloat16_checkpoint_and_dtype_override(tmp_path):
  hf_model("mixtral").to(torch.bfloat16).save_pretrained(tmp_path)
  model, config = load_hf(tmp_path)
  assert config.dtype == jnp.bfloat16 and config.param_dtype == jnp.bfloat16
  assert config.moe.param_dtype == jnp.bfloat16
  assert all(v.dtype == jnp.bfloat16 for v in params(model).values())
  model32, config32 = load_hf(tmp_path, dtype="float32")
  assert config32.dtype == jnp.float32
  assert all(v.dtype == np.float32 for v in params(model32).values())
  # The reference: the float32 model with its weights rounded to bfloat16 (not `.to(bfloat16)`
  # and back, which would also round its RoPE inv_freq buffers).
  ref_model = hf_model("mixtral")
  with torch.no_grad():
    for p in ref_model.parameters():
      p.copy_(p.to(torch.bfloat16).float())
  toks = tokens()
  ref = hf_logits(ref_model, toks)
  assert_logits_close(moejax_logits(model32, toks), ref)
  # Computing in bfloat16 moves logits by about bf16's resolution (2^-8) at unit scale.
  assert_logits_close(moejax_logits(model, toks), ref, rtol=5e-2)


# --------------------------------------------------------------------------------------------------
# Export.


def random_model(config: ModelConfig, seed: int = 1) -> Transformer:
  """The unscanned model with unit-scale random parameters, filled on the host (an eager or jitted
  initialiser costs seconds of XLA:CPU compilation per config)."""
  model = nnx.eval_shape(lambda: Transformer(config.replace(scan_layers=False), rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(seed)
  flat = []
  for p, var in nnx.to_flat_state(nnx.state(model)):
    name, value = ".".join(map(str, p)), var.get_value()
    if isinstance(var, nnx.RngKey):
      flat.append((p, var.replace(jax.random.key(seed))))
      continue
    if isinstance(var, nnx.RngCount):
      flat.append((p, var.replace(jnp.zeros(value.shape, value.dtype))))
      continue
    noise = rng.standard_normal(value.shape).astype(np.float32)
    if name.endswith(".scale"):  # norms
      x = 1 + 0.2 * noise
    elif name.endswith("bias"):  # q/k/v biases, the aux-loss-free routing bias
      x = 0.1 * noise
    else:  # kernels [*in, out] and experts [E, in, out]
      fan_in = math.prod(value.shape[1 if ".experts." in name else 0 : -1])
      x = noise / fan_in**0.5
    flat.append((p, var.replace(jnp.asarray(x, value.dtype))))
  nnx.update(model, nnx.from_flat_state(flat))
  model.eval()
  return model


@pytest.mark.parametrize("name", list(CONFIGS))
def test_export_then_transformers(name, tmp_path):
  """save_hf a random moejax model; transformers loads it and computes the same logits."""
  config = config_from_hf(CONFIGS[name]().to_dict())
  model = random_model(config)
  save_hf(model, config, tmp_path)
  hf_config = json.loads((tmp_path / "config.json").read_text())
  assert hf_config["model_type"] == name.removesuffix("_rotate_half")
  hf = T.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
  toks = tokens()
  assert_logits_close(hf_logits(hf, toks), moejax_logits(model, toks))
  # ... and load_hf gives back exactly the parameters and the config.
  back, back_config = load_hf(tmp_path)
  assert back_config == config
  expected = params(model)
  for k, v in params(back).items():
    np.testing.assert_array_equal(v, expected[k], err_msg=k)


def test_export_scanned_bfloat16(tmp_path):
  config = config_from_hf(CONFIGS["deepseek_v3"]().to_dict(), dtype="bfloat16")
  unscanned = random_model(config)
  config = config.replace(scan_layers=True)
  model = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(params=0, jitter=1)))
  nnx.update(model, stack_layers(nnx.state(unscanned), config))
  save_hf(model, config, tmp_path)
  back, back_config = load_hf(tmp_path, scan_layers=True)
  assert back_config == config
  got, expected = params(back), params(model)
  assert got.keys() == expected.keys()
  for k in expected:
    assert got[k].dtype == jnp.bfloat16, k
    np.testing.assert_array_equal(got[k], expected[k], err_msg=k)
  # The routing bias stays float32 (transformers keeps it so too).
  bias = nnx.state(back, AuxFreeBias)
  assert all(v.get_value().dtype == jnp.float32 for _, v in nnx.to_flat_state(bias))


# --------------------------------------------------------------------------------------------------
# Config mapping.


def test_config_mapping():
  qwen2 = config_from_hf(CONFIGS["qwen2_moe"]().to_dict())
  assert (qwen2.first_k_dense, qwen2.moe_every, qwen2.mlp_only_layers) == (1, 2, (3,))
  assert qwen2.moe_layers == (1,) and qwen2.qkv_bias and qwen2.tie_embeddings
  assert qwen2.moe.shared_expert_gate and qwen2.moe.shared_hidden_dim == 40
  assert not qwen2.moe.norm_topk_prob
  # HF's loss is computed once over all MoE layers and scores K when uniform; ours sums per-layer
  # losses that score 1: coef * K / L_moe.
  assert qwen2.load_balance_coef == pytest.approx(0.001 * 2 / 1)
  qwen3 = config_from_hf(CONFIGS["qwen3_moe"]().to_dict())
  assert (qwen3.first_k_dense, qwen3.mlp_only_layers, qwen3.qk_norm) == (1, (), "head")
  assert qwen3.head_dim == 16 and qwen3.moe.norm_topk_prob
  v2 = config_from_hf(CONFIGS["deepseek_v2"]().to_dict())
  assert v2.attention == "mla" and v2.rope_interleave and v2.q_lora_rank is None
  assert (v2.moe.num_groups, v2.moe.topk_groups, v2.moe.router) == (4, 2, "softmax_topk")
  assert v2.moe.routed_scaling_factor == 1.5 and v2.moe.shared_hidden_dim == 32
  greedy = config_from_hf({**CONFIGS["deepseek_v2"]().to_dict(), "topk_method": "greedy"})
  assert greedy.moe.num_groups == 1
  v3 = config_from_hf(CONFIGS["deepseek_v3"]().to_dict())
  assert v3.moe.router == "sigmoid" and v3.moe.aux_free_bias and v3.moe.norm_topk_prob
  assert dict(v3.rope_scaling)["factor"] == 4.0 and v3.first_k_dense == 1
  olmoe = config_from_hf(CONFIGS["olmoe"]().to_dict())
  assert (olmoe.qk_norm, olmoe.clip_qkv, olmoe.moe.norm_topk_prob) == ("proj", 1.5, False)


def test_config_legacy_fields_and_defaults():
  """Older config.json files: top-level rope_theta, rope_scaling with "type"; absent fields take
  the family defaults of transformers' config classes."""
  minimal = dict(
    model_type="mixtral",
    vocab_size=64,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=16,
  )
  mixtral = config_from_hf(minimal)
  assert mixtral.rope_theta == 1e6 and mixtral.num_kv_heads == 2 and mixtral.head_dim == 8
  assert mixtral.moe.num_experts == 8 and mixtral.moe.top_k == 2 and mixtral.norm_eps == 1e-5
  qwen = config_from_hf({**minimal, "model_type": "qwen2_moe", "rope_theta": 5e5})
  assert qwen.rope_theta == 5e5 and qwen.qkv_bias and not qwen.moe.norm_topk_prob
  yarn = config_from_hf(
    {
      **CONFIGS["deepseek_v3"]().to_dict(),
      "rope_parameters": None,
      "rope_theta": 1e4,
      "rope_scaling": {"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32},
    }
  )
  assert dict(yarn.rope_scaling) == {
    "rope_type": "yarn",
    "factor": 2.0,
    "original_max_position_embeddings": 32,
  }
  # DeepSeek's hub fields: seq_aux with aux_loss_alpha -> the sequence-wise balance loss.
  v3 = config_from_hf(
    {**CONFIGS["deepseek_v3"]().to_dict(), "aux_loss_alpha": 1e-3, "seq_aux": True}
  )
  assert (v3.seq_balance_coef, v3.load_balance_coef) == (1e-3, 0.0)


def test_config_round_trip():
  for name, make in CONFIGS.items():
    config = config_from_hf(make().to_dict())
    assert config_from_hf(config_to_hf(config)) == config, name


# --------------------------------------------------------------------------------------------------
# Errors.


def test_missing_files(saved, tmp_path):
  with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope"))):
    load_hf(tmp_path / "nope")
  with pytest.raises(FileNotFoundError, match=r"config\.json"):
    load_hf(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps(CONFIGS["mixtral"]().to_dict()))
  with pytest.raises(FileNotFoundError, match=r"model\.safetensors"):
    load_hf(tmp_path)
  index = {"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors"}}
  (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
  with pytest.raises(FileNotFoundError, match=r"model-00001-of-00002\.safetensors"):
    load_hf(tmp_path)


def test_unsupported_model_type(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
  with pytest.raises(ValueError, match="'llama'") as info:
    load_hf(tmp_path)
  assert all(t in str(info.value) for t in SUPPORTED_MODEL_TYPES)


@pytest.mark.parametrize(
  "changes,field",
  [
    (dict(model_type="qwen3_moe", attention_bias=True), "attention_bias"),
    (dict(model_type="deepseek_v2", topk_method="noaux_tc"), "topk_method"),
    (dict(model_type="mixtral", hidden_act="gelu_pytorch_tanh"), "hidden_act"),
    (dict(model_type="deepseek_v3", moe_layer_freq=2), "moe_layer_freq"),
  ],
)
def test_unsupported_features_name_the_field(changes, field):
  base = {**CONFIGS[changes["model_type"]]().to_dict(), **changes}
  with pytest.raises(ValueError, match=rf"{changes['model_type']} config\.json field {field}="):
    config_from_hf(base)


@pytest.fixture
def mixtral_copy(saved, tmp_path):
  directory, _ = saved("mixtral")
  for f in ("config.json", "model.safetensors"):
    (tmp_path / f).write_bytes((directory / f).read_bytes())
  return tmp_path


def test_wrong_shape_names_the_tensor(mixtral_copy):
  key = "model.layers.1.block_sparse_moe.experts.2.w3.weight"
  _rewrite(mixtral_copy, lambda t: t.update({key: torch.zeros(47, 32)}))
  with pytest.raises(ValueError, match=re.escape(f"{key} has shape (47, 32), expected (48, 32)")):
    load_hf(mixtral_copy)


def test_missing_tensor_names_it(mixtral_copy):
  key = "model.layers.0.self_attn.k_proj.weight"
  _rewrite(mixtral_copy, lambda t: t.pop(key))
  with pytest.raises(ValueError, match=rf"missing tensor\(s\) {re.escape(key)}"):
    load_hf(mixtral_copy)


def test_unexpected_tensor_names_it(mixtral_copy):
  key = "model.layers.0.self_attn.q_proj.bias"
  _rewrite(mixtral_copy, lambda t: t.update({key: torch.zeros(32)}))
  with pytest.raises(ValueError, match=rf"unexpected tensor\(s\) {re.escape(key)}"):
    load_hf(mixtral_copy)


def test_save_hf_unsupported_config(tmp_path):
  dense = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, dense_hidden_dim=64)
  moe = MoEConfig(d_model=32, num_experts=4, top_k=2, expert_hidden_dim=16, router="expert_choice")
  for config in (dense, dense.replace(moe=moe)):
    with pytest.raises(ValueError, match="exportable model types are mixtral, qwen2_moe"):
      save_hf(None, config, tmp_path)
  with pytest.raises(ValueError, match="'llama' cannot be exported"):
    config_to_hf(dense, "llama")


def test_export_refuses_layers_with_their_own_moe_config():
  """transformers' families describe every MoE layer by one config: a model whose layers have their
  own number of experts cannot be exported, and the error says why; identical layers can."""
  from moejax.interop import config_to_hf

  base = dict(
    vocab_size=64, d_model=16, num_layers=2, num_heads=2, dense_hidden_dim=32,
    moe=dict(num_experts=4, top_k=2, expert_hidden_dim=8),
  )  # fmt: skip
  hetero = ModelConfig.from_config(base | dict(layers=({"moe": {}}, {"moe": {"num_experts": 2}})))
  with pytest.raises(ValueError, match=r"mixtral: its layers have their own block specs"):
    config_to_hf(hetero)
  same = ModelConfig.from_config(base | dict(layers=({"moe": {}}, {"moe": {}})))
  assert config_to_hf(same)["model_type"] == "mixtral"

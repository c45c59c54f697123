"""Attention variants against the installed transformers' modules, with the same random weights.

Each HF attention module is built from a tiny HF config and fed position embeddings from the
model's own rotary module, as the HF model does (`position_embeddings = self.rotary_emb(x,
position_ids)`), with an additive causal mask and eager attention. Its weights are random (norm
scales too) and copied into the moejax module with the conversions an importer uses (`hf_to_gqa`,
`hf_to_mla` below). float32 on both sides: max |a - b| <= 1e-5 * max |b|.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax.models import MLA, Attention, ModelConfig, rope_frequencies, yarn_softmax_scale

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from transformers.models.deepseek_v2 import modeling_deepseek_v2 as hf_v2  # noqa: E402
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf_v3  # noqa: E402
from transformers.models.olmoe import modeling_olmoe as hf_olmoe  # noqa: E402
from transformers.models.qwen3_moe import modeling_qwen3_moe as hf_qwen3  # noqa: E402

RTOL = 1e-5
B, S, D, H = 2, 7, 32, 4
# Positions past the YaRN configs' original_max_position_embeddings (64), different per row.
POSITIONS = np.stack([np.arange(S), 60 + 3 * np.arange(S)])
# A tiny YaRN configuration whose correction ramp blends frequencies (pairs 0..3 of 4 partially),
# with mscale != mscale_all_dim so both YaRN factors differ from 1.
YARN = {
  "rope_type": "yarn",
  "factor": 4.0,
  "original_max_position_embeddings": 64,
  "beta_fast": 32,
  "beta_slow": 1,
  "mscale": 0.707,
  "mscale_all_dim": 1.0,
}
THETA = 100.0  # small, so the yarn ramp falls inside the tiny head dims
BASE_GQA = dict(vocab_size=16, d_model=D, num_layers=1, num_heads=H, dense_hidden_dim=8)


def assert_close(actual, expected, rtol=RTOL, what=""):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
  err, scale = np.abs(actual - expected).max(), np.abs(expected).max()
  assert err <= rtol * scale, f"{what}: max err {err:.3e} > {rtol} * {scale:.3e}"


def rngs(seed=0) -> nnx.Rngs:
  return nnx.Rngs(jax.random.key(seed, impl="unsafe_rbg"))


FAST_COMPILE = {"xla_backend_optimization_level": 0}


@functools.cache
def _apply_fn(graphdef):
  return jax.jit(
    lambda state, x, positions: nnx.merge(graphdef, state)(x, positions=positions),
    compiler_options=FAST_COMPILE,
  )


def apply(module, x, positions):
  graphdef, state = nnx.split(module)
  return np.asarray(_apply_fn(graphdef)(state, jnp.asarray(x), jnp.asarray(positions)))


def randomize(module: "torch.nn.Module", seed: int = 0) -> None:
  """Random weights for every HF parameter; norm scales near 1 so they matter but stay tame."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
      if name.endswith(("norm.weight", "layernorm.weight")):
        p.copy_(1.0 + 0.3 * noise)
      else:
        p.copy_(noise * p.shape[-1] ** -0.5)


def run_hf(attn, rotary, x, positions):
  """The HF attention's output, position embeddings made as the HF model makes them."""
  xt = torch.tensor(x)
  pos = torch.tensor(positions, dtype=torch.long)
  position_embeddings = rotary(xt, pos)
  s = x.shape[1]
  mask = torch.full((s, s), torch.finfo(torch.float32).min).triu(1)[None, None]  # additive causal
  with torch.no_grad():
    y, _ = attn(xt, position_embeddings=position_embeddings, attention_mask=mask)
  return y.numpy()


def weights(module) -> dict[str, np.ndarray]:
  return {k: v.detach().numpy() for k, v in module.state_dict().items()}


def load(module: nnx.Module, params: dict[str, np.ndarray]) -> None:
  """Set a moejax module's parameters from {dotted path: array}; every Param must be given."""
  state = nnx.state(module, nnx.Param)
  flat = nnx.to_flat_state(state)
  paths = {".".join(map(str, p)) for p, _ in flat}
  assert paths == set(params), (sorted(paths), sorted(params))
  for p, var in flat:
    value = params[".".join(map(str, p))]
    assert value.shape == var[...].shape, (p, value.shape, var[...].shape)
    var[...] = jnp.asarray(value, jnp.float32)
  nnx.update(module, nnx.from_flat_state(flat))


# ------------------------------------------------------------------------------------------------
# Weight conversions (HF Linear weight [out, in] -> kernel weight.T reshaped).


def hf_to_gqa(w, num_heads, num_kv_heads, head_dim, qk_norm=None):
  d = w["q_proj.weight"].shape[1]
  out = {
    "q_proj.kernel": w["q_proj.weight"].T.reshape(d, num_heads, head_dim),
    "k_proj.kernel": w["k_proj.weight"].T.reshape(d, num_kv_heads, head_dim),
    "v_proj.kernel": w["v_proj.weight"].T.reshape(d, num_kv_heads, head_dim),
    "o_proj.kernel": w["o_proj.weight"].T.reshape(num_heads, head_dim, d),
  }
  if qk_norm == "head":  # Qwen3: [A], shared by heads
    out["q_norm.scale"], out["k_norm.scale"] = w["q_norm.weight"], w["k_norm.weight"]
  elif qk_norm == "proj":  # OLMoE: [H*A] -> [H, A]
    out["q_norm.scale"] = w["q_norm.weight"].reshape(num_heads, head_dim)
    out["k_norm.scale"] = w["k_norm.weight"].reshape(num_kv_heads, head_dim)
  return out


def hf_to_mla(w, c: ModelConfig):
  d, h = c.d_model, c.num_heads
  a_qk = c.qk_nope_head_dim + c.qk_rope_head_dim
  out = {
    "kv_a_proj.kernel": w["kv_a_proj_with_mqa.weight"].T,  # [D, R_kv + A_rope]
    "kv_a_norm.scale": w["kv_a_layernorm.weight"],
    "kv_b_proj.kernel": w["kv_b_proj.weight"].T.reshape(
      c.kv_lora_rank, h, c.qk_nope_head_dim + c.v_head_dim
    ),
    "o_proj.kernel": w["o_proj.weight"].T.reshape(h, c.v_head_dim, d),
  }
  if c.q_lora_rank is None:
    out["q_proj.kernel"] = w["q_proj.weight"].T.reshape(d, h, a_qk)
  else:
    out["q_a_proj.kernel"] = w["q_a_proj.weight"].T  # [D, R_q]
    out["q_a_norm.scale"] = w["q_a_layernorm.weight"]
    out["q_b_proj.kernel"] = w["q_b_proj.weight"].T.reshape(c.q_lora_rank, h, a_qk)
  return out


def inputs(seed=0):
  return np.random.default_rng(seed).normal(size=(B, S, D)).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# GQA variants.


@pytest.mark.parametrize("yarn", [False, True], ids=["default-rope", "yarn"])
def test_qwen3_moe_head_qk_norm(yarn):
  # head_dim 16 != D / H: Qwen3 sets head_dim explicitly.
  rope = {"rope_type": "default", "rope_theta": THETA}
  if yarn:  # Qwen-style YaRN: no mscale keys, attention_factor = 0.1 ln(factor) + 1 on cos/sin
    rope = {"rope_type": "yarn", "rope_theta": THETA, "factor": 4.0}
    rope["original_max_position_embeddings"] = 64
  config = transformers.Qwen3MoeConfig(
    hidden_size=D,
    num_attention_heads=H,
    num_key_value_heads=2,
    head_dim=16,
    rms_norm_eps=1e-6,
    rope_parameters=rope,
    max_position_embeddings=256,
  )
  config._attn_implementation = "eager"
  hf = hf_qwen3.Qwen3MoeAttention(config, layer_idx=0).eval()
  randomize(hf)
  scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
  ours = Attention(
    D, H, 2, 16, rope_theta=THETA, rope_scaling=scaling, qk_norm="head", norm_eps=1e-6, rngs=rngs()
  )
  load(ours, hf_to_gqa(weights(hf), H, 2, 16, qk_norm="head"))
  x = inputs()
  expected = run_hf(hf, hf_qwen3.Qwen3MoeRotaryEmbedding(config), x, POSITIONS)
  assert_close(apply(ours, x, POSITIONS), expected, what="qwen3 attention")


def test_olmoe_proj_qk_norm_and_clip_qkv():
  clip = 0.6
  config = transformers.OlmoeConfig(
    hidden_size=D, num_attention_heads=H, num_key_value_heads=2, clip_qkv=clip, rms_norm_eps=1e-5
  )
  config._attn_implementation = "eager"
  hf = hf_olmoe.OlmoeAttention(config, layer_idx=0).eval()
  randomize(hf)
  ours = Attention(D, H, 2, qk_norm="proj", clip_qkv=clip, norm_eps=1e-5, rngs=rngs())
  load(ours, hf_to_gqa(weights(hf), H, 2, D // H, qk_norm="proj"))
  x = 3.0 * inputs()
  # The clamp must bite, and after the norm: q after the norm exceeds the clip somewhere.
  q = torch.nn.functional.linear(torch.tensor(x), hf.q_proj.weight)
  assert float(hf.q_norm(q).detach().abs().max()) > clip
  expected = run_hf(hf, hf_olmoe.OlmoeRotaryEmbedding(config), x, POSITIONS)
  assert_close(apply(ours, x, POSITIONS), expected, what="olmoe attention")
  unclipped = Attention(D, H, 2, qk_norm="proj", norm_eps=1e-5, rngs=rngs())
  load(unclipped, hf_to_gqa(weights(hf), H, 2, D // H, qk_norm="proj"))
  assert not np.allclose(apply(unclipped, x, POSITIONS), expected, rtol=1e-3)


# ------------------------------------------------------------------------------------------------
# Multi-head latent attention.

MLA_DIMS = dict(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12)


def mla_config(q_lora_rank, rope_scaling, rope_interleave) -> ModelConfig:
  return ModelConfig(
    vocab_size=16,
    d_model=D,
    num_layers=1,
    num_heads=H,
    dense_hidden_dim=8,
    attention="mla",
    q_lora_rank=q_lora_rank,
    rope_theta=THETA,
    rope_scaling=rope_scaling,
    rope_interleave=rope_interleave,
    **MLA_DIMS,
  )


def check_mla(hf_module, hf_config, rotary, ours_config):
  hf_config._attn_implementation = "eager"
  hf = hf_module(hf_config, layer_idx=0).eval()
  randomize(hf)
  ours = MLA(ours_config, rngs=rngs())
  load(ours, hf_to_mla(weights(hf), ours_config))
  x = inputs()
  expected = run_hf(hf, rotary(hf_config), x, POSITIONS)
  assert_close(apply(ours, x, POSITIONS), expected, what="mla")
  return ours, x, expected


@pytest.mark.parametrize(
  "q_lora_rank,yarn", [(None, True), (12, True), (12, False)], ids=["no-q-lora", "q-lora", "plain"]
)
def test_deepseek_v2_mla(q_lora_rank, yarn):
  rope = {"rope_theta": THETA, **(YARN if yarn else {"rope_type": "default"})}
  config = transformers.DeepseekV2Config(
    hidden_size=D,
    num_attention_heads=H,
    num_key_value_heads=H,
    q_lora_rank=q_lora_rank,
    rope_parameters=rope,
    max_position_embeddings=256,
    **MLA_DIMS,
  )
  # HF DeepSeek-V2 always rotates interleaved pairs (a complex multiply).
  scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
  check_mla(
    hf_v2.DeepseekV2Attention,
    config,
    hf_v2.DeepseekV2RotaryEmbedding,
    mla_config(q_lora_rank, scaling, rope_interleave=True),
  )


@pytest.mark.parametrize("interleave", [True, False], ids=["interleaved", "rotate-half"])
def test_deepseek_v3_mla(interleave):
  rope = {"rope_theta": THETA, **YARN}
  config = transformers.DeepseekV3Config(
    hidden_size=D,
    num_attention_heads=H,
    num_key_value_heads=H,
    q_lora_rank=12,
    rope_parameters=rope,
    rope_interleave=interleave,
    max_position_embeddings=256,
    **MLA_DIMS,
  )
  check_mla(
    hf_v3.DeepseekV3Attention,
    config,
    hf_v3.DeepseekV3RotaryEmbedding,
    mla_config(12, YARN, rope_interleave=interleave),
  )
  # The layouts really differ: the other one gives other outputs.
  if interleave:
    hf = hf_v3.DeepseekV3Attention(config, layer_idx=0).eval()
    randomize(hf)
    wrong_config = mla_config(12, YARN, rope_interleave=False)
    wrong = MLA(wrong_config, rngs=rngs())
    load(wrong, hf_to_mla(weights(hf), wrong_config))
    expected = run_hf(hf, hf_v3.DeepseekV3RotaryEmbedding(config), inputs(), POSITIONS)
    assert not np.allclose(apply(wrong, inputs(), POSITIONS), expected, rtol=1e-3)


def test_mla_parameter_paths_and_logical_axes():
  model = MLA(mla_config(12, None, True), rngs=rngs())
  meta = {
    ".".join(map(str, p)): (v[...].shape, v.get_metadata()["logical_axes"])
    for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
  }
  assert meta == {
    "q_a_proj.kernel": ((D, 12), ("embed", None)),
    "q_a_norm.scale": ((12,), (None,)),
    "q_b_proj.kernel": ((12, H, 16), (None, "heads", "kv")),
    "kv_a_proj.kernel": ((D, 16 + 8), ("embed", None)),
    "kv_a_norm.scale": ((16,), (None,)),
    "kv_b_proj.kernel": ((16, H, 8 + 12), (None, "heads", "kv")),
    "o_proj.kernel": ((H, 12, D), ("heads", "kv", "embed")),
  }
  plain = MLA(mla_config(None, None, True), rngs=rngs())
  assert plain.q_proj.kernel.get_metadata()["logical_axes"] == ("embed", "heads", "kv")
  assert plain.q_a_proj is None and plain.q_proj.kernel[...].shape == (D, H, 16)


@pytest.mark.parametrize(
  "extra",
  [{}, {"truncate": False}, {"attention_factor": 0.8, "beta_fast": 16, "beta_slow": 2}],
  ids=["deepseek", "no-truncate", "explicit"],
)
def test_yarn_frequencies_match_hf(extra):
  rope = {"rope_theta": 1e4, **YARN, "original_max_position_embeddings": 4096, **extra}
  config = transformers.DeepseekV3Config(
    hidden_size=D,
    num_attention_heads=H,
    rope_parameters=rope,
    max_position_embeddings=4096 * 4,
    **MLA_DIMS | {"qk_rope_head_dim": 64},
  )
  inv_freq, factor = transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS["yarn"](config)
  scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
  ours, our_factor = rope_frequencies(
    64, 1e4, ModelConfig(**BASE_GQA, rope_scaling=scaling).rope_scaling
  )
  np.testing.assert_allclose(ours, inv_freq.numpy(), rtol=1e-6)
  assert our_factor == pytest.approx(factor, rel=1e-12)
  expected_softmax = hf_v3.yarn_apply_mscale(rope, 1.0)
  assert yarn_softmax_scale(scaling) == pytest.approx(expected_softmax, rel=1e-12)

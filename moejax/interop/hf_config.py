"""Hugging Face `config.json` <-> moejax `ModelConfig`, for the six MoE families moejax can import.

    config = config_from_hf(json.load(open("config.json")), dtype="bfloat16")
    hf = config_to_hf(config)          # a config.json dict (Mixtral / Qwen-MoE / OLMoE / DeepSeek)

Every rule below is read from transformers 5.23's `modeling_<family>.py`; a field missing from
config.json takes the default of the family's HF config class, as `from_pretrained` would.

    family       router (MoEConfig)                         attention             MoE layers
    mixtral      softmax_topk, renormalised                 gqa                   all
    qwen2_moe    softmax_topk, norm_topk_prob (False),      gqa, qkv_bias         (i+1) % step == 0,
                 + one shared expert with a sigmoid gate                          i not mlp_only
    qwen3_moe    softmax_topk, norm_topk_prob (False)       gqa, qk_norm="head"   as qwen2_moe
    olmoe        softmax_topk, norm_topk_prob (False)       gqa, qk_norm="proj",  all
                                                            clip_qkv
    deepseek_v2  softmax_topk (never renormalised) x        mla, interleaved      i >= first_k_
                 routed_scaling_factor, groups (max) for    RoPE                  dense_replace
                 group_limited_greedy; + shared experts
    deepseek_v3  sigmoid, e_score_correction_bias =         mla, rope_interleave  as deepseek_v2
                 aux_free_bias, groups (top-2 sum),
                 norm_topk_prob (True) x scaling; + shared

Auxiliary-loss coefficients. transformers' `load_balancing_loss_func` is computed once over all MoE
layers' tokens and, not dividing by K, scores K for uniform routing; moejax sums per-layer losses that
score 1. `load_balance_coef = router_aux_loss_coef * K / L_moe` gives the same loss scale (and
`config_to_hf` inverts it). DeepSeek's `aux_loss_alpha` (hub configs; transformers ignores it) is
already per layer with uniform value 1: it becomes `seq_balance_coef` when `seq_aux` (the released
models), `load_balance_coef` otherwise.

Not represented (ValueError naming the field): attention or MLP biases other than Qwen2-MoE's qkv
bias, activations other than SiLU, partial rotary embeddings, RoPE types other than default and
yarn, and DeepSeek's `moe_layer_freq` != 1 (transformers ignores it). Sliding-window attention only
warns: moejax attends over the whole causal context, which agrees on sequences within the window.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any

from moejax.models.config import ModelConfig, to_dtype
from moejax.moe.config import MoEConfig

SUPPORTED_MODEL_TYPES = (
  "mixtral",
  "qwen2_moe",
  "qwen3_moe",
  "olmoe",
  "deepseek_v2",
  "deepseek_v3",
)
# `config_to_hf` tries the families in this order when no model_type is given.
EXPORT_MODEL_TYPES = SUPPORTED_MODEL_TYPES

ARCHITECTURES = {
  "mixtral": "MixtralForCausalLM",
  "qwen2_moe": "Qwen2MoeForCausalLM",
  "qwen3_moe": "Qwen3MoeForCausalLM",
  "olmoe": "OlmoeForCausalLM",
  "deepseek_v2": "DeepseekV2ForCausalLM",
  "deepseek_v3": "DeepseekV3ForCausalLM",
}

# The defaults of transformers 5.23's config classes for the fields read here.
_COMMON = dict(hidden_act="silu", tie_word_embeddings=False, head_dim=None)
_DEFAULTS = {
  "mixtral": dict(
    _COMMON,
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=4096 * 32,
    rms_norm_eps=1e-5,
    sliding_window=None,
    num_experts_per_tok=2,
    num_local_experts=8,
    router_aux_loss_coef=0.001,
    router_jitter_noise=0.0,
    rope_theta=1e6,  # MixtralConfig.default_theta
  ),
  "qwen2_moe": dict(
    _COMMON,
    vocab_size=151936,
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=24,
    num_attention_heads=16,
    num_key_value_heads=16,
    max_position_embeddings=32768,
    rms_norm_eps=1e-6,
    use_sliding_window=False,
    decoder_sparse_step=1,
    moe_intermediate_size=1408,
    shared_expert_intermediate_size=5632,
    num_experts_per_tok=4,
    num_experts=60,
    norm_topk_prob=False,
    router_aux_loss_coef=0.001,
    mlp_only_layers=None,
    qkv_bias=True,
  ),
  "qwen3_moe": dict(
    _COMMON,
    vocab_size=151936,
    hidden_size=2048,
    intermediate_size=6144,
    num_hidden_layers=24,
    num_attention_heads=32,
    num_key_value_heads=4,
    max_position_embeddings=32768,
    rms_norm_eps=1e-6,
    attention_bias=False,
    use_sliding_window=False,
    decoder_sparse_step=1,
    moe_intermediate_size=768,
    num_experts_per_tok=8,
    num_experts=128,
    norm_topk_prob=False,
    router_aux_loss_coef=0.001,
    mlp_only_layers=None,
  ),
  "olmoe": dict(
    _COMMON,
    vocab_size=50304,
    hidden_size=2048,
    intermediate_size=2048,
    num_hidden_layers=16,
    num_attention_heads=16,
    num_key_value_heads=None,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    attention_bias=False,
    clip_qkv=None,
    num_experts_per_tok=8,
    num_experts=64,
    router_aux_loss_coef=0.01,
    norm_topk_prob=False,
  ),
  "deepseek_v2": dict(
    _COMMON,
    vocab_size=102400,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    max_position_embeddings=2048,
    rms_norm_eps=1e-6,
    attention_bias=False,
    mlp_bias=False,
    first_k_dense_replace=0,
    kv_lora_rank=512,
    q_lora_rank=1536,
    n_group=None,
    n_routed_experts=64,
    n_shared_experts=2,
    qk_nope_head_dim=128,
    qk_rope_head_dim=64,
    routed_scaling_factor=1.0,
    topk_group=None,
    topk_method="greedy",
    v_head_dim=128,
    num_experts_per_tok=None,
    moe_intermediate_size=1407,
  ),
  "deepseek_v3": dict(
    _COMMON,
    vocab_size=129280,
    hidden_size=7168,
    intermediate_size=18432,
    moe_intermediate_size=2048,
    num_hidden_layers=61,
    num_attention_heads=128,
    n_shared_experts=1,
    n_routed_experts=256,
    routed_scaling_factor=2.5,
    kv_lora_rank=512,
    q_lora_rank=1536,
    qk_rope_head_dim=64,
    v_head_dim=128,
    qk_nope_head_dim=128,
    n_group=8,
    topk_group=4,
    num_experts_per_tok=8,
    first_k_dense_replace=3,
    norm_topk_prob=True,
    max_position_embeddings=4096,
    rms_norm_eps=1e-6,
    rope_interleave=True,
    attention_bias=False,
  ),
}
# SiLU-gated FFNs are SwiGLU; transformers' ACT2FN names for SiLU.
_ACTIVATIONS = {"silu": "swiglu", "swish": "swiglu"}


def _unsupported(model_type: str, field: str, value: Any, why: str) -> None:
  raise ValueError(f"{model_type} config.json field {field}={value!r} is not supported: {why}")


class _Reader:
  """config.json values with the family's transformers defaults; errors name the field."""

  def __init__(self, hf: Mapping[str, Any], model_type: str):
    self.hf, self.model_type = hf, model_type

  def __call__(self, key: str, *aliases: str) -> Any:
    for name in (key, *aliases):
      if name in self.hf:
        return self.hf[name]
    return _DEFAULTS[self.model_type].get(key)

  def int(self, key: str, *aliases: str) -> int:
    value = self(key, *aliases)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
      _unsupported(self.model_type, key, value, "expected a non-negative integer")
    return value

  def off(self, key: str, why: str) -> None:
    """Fail unless the field is false-y (an unsupported feature switched off)."""
    value = self(key)
    if value:
      _unsupported(self.model_type, key, value, why)


def config_from_hf(hf: Mapping[str, Any], *, dtype: Any = "float32") -> ModelConfig:
  """A transformers config.json dict -> ModelConfig (compute and parameter dtype `dtype`).

  MoE dispatch is "dropless" (every token reaches its K experts, as in transformers), so the model
  is causal and decodes token by token. ValueError for an unsupported model_type or feature.
  """
  model_type = hf.get("model_type")
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise ValueError(
      f"model_type {model_type!r} is not supported; supported model types are "
      f"{', '.join(SUPPORTED_MODEL_TYPES)}"
    )
  get = _Reader(hf, model_type)
  dtype = to_dtype(dtype)
  act = get("hidden_act")
  if act not in _ACTIVATIONS:
    _unsupported(model_type, "hidden_act", act, f"supported are {', '.join(_ACTIVATIONS)}")
  num_layers, d_model, heads = (
    get.int("num_hidden_layers"),
    get.int("hidden_size"),
    get.int("num_attention_heads"),
  )
  theta, rope_scaling = _rope(hf, get)
  fields = dict(
    vocab_size=get.int("vocab_size"),
    d_model=d_model,
    num_layers=num_layers,
    num_heads=heads,
    activation=_ACTIVATIONS[act],
    norm_eps=float(get("rms_norm_eps")),
    rope_theta=theta,
    rope_scaling=rope_scaling,
    tie_embeddings=bool(get("tie_word_embeddings")),
    dtype=dtype,
    param_dtype=dtype,
    z_loss_coef=float(get("router_z_loss_coef") or 0.0),
  )
  if model_type.startswith("deepseek"):
    fields |= _deepseek(get, model_type, num_layers, d_model)
  else:
    fields |= _gqa(get, model_type, num_layers, d_model, heads)
  return ModelConfig(**fields)


def _rope(hf: Mapping[str, Any], get: _Reader) -> tuple[float, tuple | None]:
  """(rope_theta, rope_scaling) from transformers 5's `rope_parameters` or the older
  `rope_theta` / `rope_scaling` fields."""
  params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
  theta = params.pop("rope_theta", None) or get("rope_theta") or 10000.0
  kind = params.pop("type", None)
  params.setdefault("rope_type", kind or "default")
  partial = params.pop("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
  if partial not in (None, 1, 1.0):
    _unsupported(get.model_type, "partial_rotary_factor", partial, "moejax rotates whole heads")
  if params["rope_type"] == "default" and len(params) == 1:
    return float(theta), None
  if params["rope_type"] == "yarn":
    # transformers fills these in `standardize_rope_params` / `_compute_yarn_parameters`.
    max_len = get.int("max_position_embeddings")
    original = params.get("original_max_position_embeddings") or hf.get(
      "original_max_position_embeddings", max_len
    )
    params["original_max_position_embeddings"] = original
    if params.get("factor") is None:
      params["factor"] = max_len / original
  return float(theta), tuple(sorted(params.items()))


def _moe_layers_qwen(get: _Reader, num_layers: int) -> tuple[set[int], int]:
  step = get.int("decoder_sparse_step")
  if step < 1:
    _unsupported(get.model_type, "decoder_sparse_step", step, "must be >= 1")
  mlp_only = set(get("mlp_only_layers") or ())
  return {i for i in range(num_layers) if i not in mlp_only and (i + 1) % step == 0}, step


def _layer_pattern(moe_layers: set[int], num_layers: int, period: int) -> dict[str, Any]:
  """ModelConfig's (first_k_dense, moe_every, mlp_only_layers) for Qwen's MoE layers, a subset of
  the grid i = period - 1 + u * period (period = decoder_sparse_step)."""
  first = min(moe_layers)
  grid = set(range(first, num_layers, period))
  if grid == moe_layers:  # leading dense layers absorbed: no mlp_only_layers, scan_layers works
    return dict(first_k_dense=first, moe_every=period)
  first = period - 1
  grid = set(range(first, num_layers, period))
  return dict(
    first_k_dense=first, moe_every=period, mlp_only_layers=tuple(sorted(grid - moe_layers))
  )


def _aux_coef(coef: float, top_k: int, num_moe_layers: int) -> float:
  """transformers' router_aux_loss_coef -> moejax's per-layer load_balance_coef (module doc)."""
  return float(coef) * top_k / max(num_moe_layers, 1)


def _gqa(get: _Reader, model_type: str, num_layers: int, d_model: int, heads: int) -> dict:
  kv_heads = get("num_key_value_heads") or heads
  head_dim = get("head_dim") or d_model // heads
  fields = dict(num_kv_heads=kv_heads, head_dim=head_dim)
  if model_type == "mixtral":
    window = get("sliding_window")
    if window:
      warnings.warn(
        f"mixtral sliding_window={window}: moejax attends over the whole causal context, so "
        f"logits match transformers only for sequences of at most {window} tokens",
        stacklevel=3,
      )
    top_k, experts = get.int("num_experts_per_tok"), get.int("num_local_experts", "num_experts")
    moe = MoEConfig(
      d_model=d_model,
      num_experts=experts,
      top_k=top_k,
      expert_hidden_dim=get.int("intermediate_size"),
      norm_topk_prob=True,
      jitter_noise=float(get("router_jitter_noise") or 0.0),
    )
    moe_layers, pattern = set(range(num_layers)), {}
  else:
    if model_type == "qwen2_moe":
      fields["qkv_bias"] = bool(get("qkv_bias"))
    else:
      get.off("attention_bias", "moejax has q/k/v biases without an o_proj bias (Qwen2-MoE's)")
    if model_type in ("qwen2_moe", "qwen3_moe") and get("use_sliding_window"):
      warnings.warn(
        f"{model_type} use_sliding_window=True: moejax attends over the whole causal context, so "
        f"logits match transformers only for sequences of at most {get('sliding_window')} tokens",
        stacklevel=3,
      )
    if model_type == "olmoe":
      if head_dim * heads != d_model:
        _unsupported(
          model_type, "head_dim", head_dim, f"OLMoE's q_norm covers hidden_size={d_model}"
        )
      fields |= dict(qk_norm="proj", clip_qkv=get("clip_qkv"))
    elif model_type == "qwen3_moe":
      fields["qk_norm"] = "head"
    top_k = get.int("num_experts_per_tok")
    experts = get.int("num_experts", "num_local_experts")
    shared = {}
    if model_type == "qwen2_moe" and get.int("shared_expert_intermediate_size"):
      shared = dict(
        num_shared_experts=1,
        shared_expert_hidden_dim=get.int("shared_expert_intermediate_size"),
        shared_expert_gate=True,
      )
    hidden = get.int("intermediate_size" if model_type == "olmoe" else "moe_intermediate_size")
    moe = None
    if experts:
      moe = MoEConfig(
        d_model=d_model,
        num_experts=experts,
        top_k=top_k,
        expert_hidden_dim=hidden,
        norm_topk_prob=bool(get("norm_topk_prob")),
        **shared,
      )
    if model_type == "olmoe":
      moe_layers, pattern = set(range(num_layers)), {}
    else:
      fields["dense_hidden_dim"] = get.int("intermediate_size")
      moe_layers, step = _moe_layers_qwen(get, num_layers) if experts else (set(), 1)
      pattern = _layer_pattern(moe_layers, num_layers, step) if moe_layers else {}
  if not moe_layers:
    moe = None
  coef = _aux_coef(get("router_aux_loss_coef") or 0.0, top_k, len(moe_layers))
  return fields | pattern | dict(moe=moe, load_balance_coef=coef)


def _deepseek(get: _Reader, model_type: str, num_layers: int, d_model: int) -> dict:
  get.off("attention_bias", "moejax's MLA has no projection biases")
  get.off("mlp_bias", "moejax's FFNs have no biases")
  freq = get("moe_layer_freq")
  if freq not in (None, 1):
    _unsupported(model_type, "moe_layer_freq", freq, "transformers ignores it (MoE every layer)")
  first = get("first_k_dense_replace") or 0
  top_k = get("num_experts_per_tok")
  if not isinstance(top_k, int) or top_k < 1:
    _unsupported(model_type, "num_experts_per_tok", top_k, "must be a positive integer")
  experts, hidden = (
    get.int("n_routed_experts", "num_local_experts"),
    get.int("moe_intermediate_size"),
  )
  groups, topk_groups = get("n_group") or 1, get("topk_group") or 1
  router: dict[str, Any]
  if model_type == "deepseek_v2":
    method = get("topk_method")
    if method not in ("greedy", "group_limited_greedy"):
      _unsupported(model_type, "topk_method", method, "supported: greedy, group_limited_greedy")
    if method == "greedy":
      groups = topk_groups = 1
    # transformers' DeepseekV2TopkRouter never renormalises (norm_topk_prob is read by DeepSeek's
    # own modeling code only, and False in every released V2): weights = p * routed_scaling_factor.
    router = dict(router="softmax_topk", norm_topk_prob=False)
  else:
    # transformers 5.23 masks the dropped groups with -inf, as moejax does (older versions used 0.0,
    # which differs only when a biased score s + b is negative).
    router = dict(router="sigmoid", aux_free_bias=True, norm_topk_prob=bool(get("norm_topk_prob")))
  n_shared = get("n_shared_experts") or 0
  moe = MoEConfig(
    d_model=d_model,
    num_experts=experts,
    top_k=top_k,
    expert_hidden_dim=hidden,
    routed_scaling_factor=float(get("routed_scaling_factor")),
    num_groups=groups,
    topk_groups=topk_groups if groups > 1 else 1,
    num_shared_experts=n_shared,
    shared_expert_hidden_dim=hidden if n_shared else None,
    **router,
  )
  moe_layers = set(range(first, num_layers))
  # DeepSeek's `aux_loss_alpha` / `seq_aux` (hub config.json; not transformers config fields).
  alpha = float(get("aux_loss_alpha") or 0.0)
  seq_aux = bool(get("seq_aux"))
  return dict(
    attention="mla",
    q_lora_rank=get("q_lora_rank"),
    kv_lora_rank=get.int("kv_lora_rank"),
    qk_nope_head_dim=get.int("qk_nope_head_dim"),
    qk_rope_head_dim=get.int("qk_rope_head_dim"),
    v_head_dim=get.int("v_head_dim"),
    # DeepSeek-V2 always rotates interleaved pairs; V3 iff rope_interleave.
    rope_interleave=model_type == "deepseek_v2" or bool(get("rope_interleave")),
    dense_hidden_dim=get.int("intermediate_size"),
    moe=moe if moe_layers else None,
    first_k_dense=min(first, num_layers),
    load_balance_coef=0.0 if seq_aux else alpha,
    seq_balance_coef=alpha if seq_aux else 0.0,
  )


# --------------------------------------------------------------------------------------------------
# Export.


def config_to_hf(config: ModelConfig, model_type: str | None = None) -> dict[str, Any]:
  """ModelConfig -> a transformers config.json dict of `model_type` (default: the first family of
  EXPORT_MODEL_TYPES that can express it). ValueError saying why each family cannot."""
  types = EXPORT_MODEL_TYPES if model_type is None else (model_type,)
  if model_type is not None and model_type not in EXPORT_MODEL_TYPES:
    raise ValueError(
      f"model_type {model_type!r} cannot be exported; exportable model types are "
      f"{', '.join(EXPORT_MODEL_TYPES)}"
    )
  reasons = []
  for name in types:
    why = _export_mismatch(config, name)
    if why is None:
      return _export(config, name)
    reasons.append(f"{name}: {why}")
  raise ValueError(
    "this ModelConfig cannot be exported to transformers; exportable model types are "
    f"{', '.join(EXPORT_MODEL_TYPES)}, and they do not fit because\n  " + "\n  ".join(reasons)
  )


def _export_mismatch(c: ModelConfig, model_type: str) -> str | None:
  """Why `c` has no exact equivalent in `model_type`, or None if it has one."""
  m = c.moe
  if m is None:
    return "the model has no MoE layers"
  if c.layers is not None and c.block_specs != c.replace(layers=None).block_specs:
    return (
      "its layers have their own block specs (ModelConfig.layers: per-layer MoEConfig, block kind "
      "or attention); transformers' families describe every MoE layer by one config"
    )
  if c.activation != "swiglu" or m.activation != "swiglu":
    return "transformers' MoE families use SwiGLU FFNs (activation='swiglu')"
  if m.router_bias or m.dispatch != "dropless":
    return "needs router_bias=False and dispatch='dropless'"
  deepseek = model_type.startswith("deepseek")
  if (c.attention == "mla") != deepseek:
    return "DeepSeek families use attention='mla', the others 'gqa'"
  if c.rope_interleave and c.attention == "gqa":
    return "the GQA families rotate halves (rope_interleave=False)"
  if not c.rope_interleave and model_type == "deepseek_v2":
    return "DeepSeek-V2 rotates interleaved pairs (rope_interleave=True)"
  want_norm = {"qwen3_moe": "head", "olmoe": "proj"}.get(model_type)
  if c.qk_norm != want_norm:
    return f"needs qk_norm={want_norm!r}, got {c.qk_norm!r}"
  if c.clip_qkv is not None and model_type != "olmoe":
    return "clip_qkv is OLMoE's"
  if model_type == "olmoe" and c.resolved_head_dim * c.num_heads != c.d_model:
    return "OLMoE's q_norm covers hidden_size: needs head_dim * num_heads == d_model"
  if c.qkv_bias and model_type != "qwen2_moe":
    return "qkv_bias is Qwen2-MoE's"
  layers = set(c.moe_layers)
  everywhere = layers == set(range(c.num_layers))
  if model_type in ("mixtral", "olmoe") and not everywhere:
    return "every layer must be MoE"
  if deepseek and layers != set(range(min(layers), c.num_layers)):
    return "MoE layers must be all layers from first_k_dense on"
  groups = m.num_groups > 1
  shared = m.num_shared_experts > 0
  if model_type in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2"):
    if m.router not in ("softmax_topk", "topk_softmax") or m.aux_free_bias:
      return "needs a softmax router without aux_free_bias"
    if groups and model_type != "deepseek_v2":
      return "group-limited routing is DeepSeek's"
  if model_type == "mixtral" and (
    not (m.norm_topk_prob or m.router == "topk_softmax") or m.routed_scaling_factor != 1 or shared
  ):
    return "Mixtral renormalises the top-k weights, has no scaling factor and no shared experts"
  if model_type in ("qwen3_moe", "olmoe") and (m.routed_scaling_factor != 1 or shared):
    return "no routed_scaling_factor and no shared experts"
  if model_type == "qwen2_moe" and (
    m.num_shared_experts != 1 or not m.shared_expert_gate or m.routed_scaling_factor != 1
  ):
    return "Qwen2-MoE has exactly one shared expert with a sigmoid gate and no scaling factor"
  if deepseek:
    if m.shared_expert_gate or (
      shared and m.shared_hidden_dim != m.num_shared_experts * m.expert_hidden_dim
    ):
      return "DeepSeek shared experts are ungated, each as wide as a routed expert"
    if model_type == "deepseek_v2" and (m.router != "softmax_topk" or m.norm_topk_prob):
      return "transformers' DeepSeek-V2 router is softmax_topk that never renormalises"
    if model_type == "deepseek_v3" and m.router != "sigmoid":
      return "DeepSeek-V3 routes with router='sigmoid'"
  return None


def _export(c: ModelConfig, model_type: str) -> dict[str, Any]:
  m = c.moe
  num_moe = c.num_moe_layers
  rope = {"rope_theta": c.rope_theta, "rope_type": "default"}
  if c.rope_scaling is not None:
    rope |= dict(c.rope_scaling)
  hf: dict[str, Any] = dict(
    architectures=[ARCHITECTURES[model_type]],
    model_type=model_type,
    vocab_size=c.vocab_size,
    hidden_size=c.d_model,
    num_hidden_layers=c.num_layers,
    num_attention_heads=c.num_heads,
    hidden_act="silu",
    rms_norm_eps=c.norm_eps,
    rope_theta=c.rope_theta,  # transformers 4 reads this; 5 reads rope_parameters
    rope_parameters=rope,
    tie_word_embeddings=c.tie_embeddings,
    num_experts_per_tok=m.top_k,
    max_position_embeddings=_max_len(c),
    attention_dropout=0.0,
    initializer_range=0.02,
    use_cache=True,
    dtype=c.param_dtype.name,
    torch_dtype=c.param_dtype.name,
  )
  if c.attention == "gqa":
    hf |= dict(num_key_value_heads=c.resolved_num_kv_heads, head_dim=c.resolved_head_dim)
  if c.z_loss_coef:  # not a transformers field (it ignores it); config_from_hf reads it back
    hf["router_z_loss_coef"] = c.z_loss_coef
  router_coef = c.load_balance_coef * max(num_moe, 1) / m.top_k
  if model_type == "mixtral":
    hf |= dict(
      intermediate_size=m.expert_hidden_dim,
      num_local_experts=m.num_experts,
      router_aux_loss_coef=router_coef,
      router_jitter_noise=m.jitter_noise,
      sliding_window=None,
    )
  elif model_type in ("qwen2_moe", "qwen3_moe"):
    step, mlp_only = _qwen_pattern(c)
    hf |= dict(
      intermediate_size=c.dense_hidden_dim or m.expert_hidden_dim,
      moe_intermediate_size=m.expert_hidden_dim,
      num_experts=m.num_experts,
      norm_topk_prob=bool(m.norm_topk_prob or m.router == "topk_softmax"),
      decoder_sparse_step=step,
      mlp_only_layers=mlp_only,
      router_aux_loss_coef=router_coef,
      use_sliding_window=False,
    )
    if model_type == "qwen2_moe":
      hf |= dict(qkv_bias=c.qkv_bias, shared_expert_intermediate_size=m.shared_hidden_dim)
    else:
      hf["attention_bias"] = False
  elif model_type == "olmoe":
    hf |= dict(
      intermediate_size=m.expert_hidden_dim,
      num_experts=m.num_experts,
      norm_topk_prob=bool(m.norm_topk_prob or m.router == "topk_softmax"),
      clip_qkv=c.clip_qkv,
      router_aux_loss_coef=router_coef,
      attention_bias=False,
    )
  else:
    hf |= dict(
      num_key_value_heads=c.num_heads,
      intermediate_size=c.dense_hidden_dim or m.expert_hidden_dim,
      moe_intermediate_size=m.expert_hidden_dim,
      n_routed_experts=m.num_experts,
      n_shared_experts=m.num_shared_experts,
      routed_scaling_factor=m.routed_scaling_factor,
      n_group=m.num_groups,
      topk_group=m.topk_groups,
      first_k_dense_replace=min(c.moe_layers),
      q_lora_rank=c.q_lora_rank,
      kv_lora_rank=c.kv_lora_rank,
      qk_nope_head_dim=c.qk_nope_head_dim,
      qk_rope_head_dim=c.qk_rope_head_dim,
      v_head_dim=c.v_head_dim,
      attention_bias=False,
      aux_loss_alpha=c.seq_balance_coef or c.load_balance_coef,
      seq_aux=c.seq_balance_coef > 0 or c.load_balance_coef == 0,
    )
    if model_type == "deepseek_v2":
      hf |= dict(
        topk_method="group_limited_greedy" if m.num_groups > 1 else "greedy",
        norm_topk_prob=False,
        mlp_bias=False,
      )
    else:
      hf |= dict(
        norm_topk_prob=m.norm_topk_prob,
        rope_interleave=c.rope_interleave,
        num_nextn_predict_layers=0,
      )
  return hf


def _qwen_pattern(c: ModelConfig) -> tuple[int, list[int]]:
  """(decoder_sparse_step, mlp_only_layers) giving exactly c's MoE layers."""
  layers = set(c.moe_layers)
  for step in (c.moe_every, 1):
    grid = {i for i in range(c.num_layers) if (i + 1) % step == 0}
    if layers <= grid:
      return step, sorted(grid - layers)
  raise AssertionError("decoder_sparse_step=1 expresses any set of MoE layers")


def _max_len(c: ModelConfig) -> int:
  """max_position_embeddings: moejax has no length limit; YaRN's extended length if scaled."""
  s = dict(c.rope_scaling or ())
  if "factor" in s:
    return math.ceil(s["factor"] * s["original_max_position_embeddings"])
  return 4096

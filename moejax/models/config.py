"""`ModelConfig`: the frozen, self-validating description of a decoder-only MoE language model.

The layer pattern follows DeepSeekMoE / DeepSeek-V2 (`first_k_dense_replace`, `moe_layer_freq`):

    layer i is MoE  iff  moe is not None and i >= first_k_dense and (i - first_k_dense) % moe_every == 0
                         and i not in mlp_only_layers

so `first_k_dense=1, moe_every=1` is DeepSeek-V2/V3 (dense first layer, MoE after), `moe_every=2` is
GShard / Switch (every other layer), and `moe=None` is a dense Llama-style model. Hugging Face's
Qwen2/3-MoE `decoder_sparse_step=s` is `first_k_dense=s-1, moe_every=s` (plus their
`mlp_only_layers`); DeepSeek's `first_k_dense_replace=k` is `first_k_dense=k`.

Attention layouts of the released MoE families (fields below; HF = transformers' modeling files):

    Mixtral         attention="gqa"
    Qwen2-MoE       attention="gqa", qkv_bias=True
    Qwen3-MoE       attention="gqa", qk_norm="head"
    OLMoE           attention="gqa", qk_norm="proj", clip_qkv (None in the released model)
    DeepSeek-V2     attention="mla", rope_interleave=True, rope_scaling yarn (q_lora_rank None for Lite)
    DeepSeek-V3     attention="mla", rope_interleave=config.rope_interleave, rope_scaling yarn

Per-layer block specs. `layers` (one `BlockSpec` per layer) says what each layer is instead: its block
kind (a name registered with `moejax.models.register_block`), its attention ("gqa" | "mla") and its
FFN, dense or MoE with its own `MoEConfig` (e.g. its own num_experts). In an experiment config each
layer is a dict whose `moe` entry *overrides* the model's `moe` block (unset MoE fields come from
`config.model.moe`); `{"moe": None}` is a dense layer and a layer without a `moe` key takes the
model's `moe` as is:

    config.model.layers = ({"moe": {"num_experts": 8}}, {"moe": None},
                           {"moe": {"num_experts": 6}}, {"moe": {"num_experts": 4}})

With `layers` given the pattern fields must keep their defaults (moe_every=1, first_k_dense=0, no
mlp_only_layers): the list already says every layer's FFN. `block_specs` is the resolved list either
way, so code below the config reads one thing.

Causality: with dropless dispatch and a token-choice router each token's output depends only on
itself and earlier tokens. Expert-choice routing, and capacity dispatch (a token's copy can be dropped
because later tokens filled the expert first), make it depend on the whole batch, future tokens
included: usable for training experiments, not for autoregressive decoding as is.

Build it from an experiment's `config.model` with `ModelConfig.from_config`; `to_dict()` goes back.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp

from moejax.models.rope import normalize_rope_scaling
from moejax.moe.config import ACTIVATIONS, MoEConfig

# dtype names accepted in configs (strings keep experiment files free of jnp imports).
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


# The MLA widths: set (q_lora_rank optionally) with attention="mla", None with "gqa".
_MLA_FIELDS = ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")


def _fail(field: str, value: Any, allowed: str) -> None:
  raise ValueError(f"ModelConfig.{field}={value!r} is invalid: {allowed}")


def to_dtype(value: Any, field: str = "dtype") -> jnp.dtype:
  """'float32' | 'bfloat16' | 'float16' or a jnp dtype -> jnp.dtype; ValueError naming `field`."""
  try:
    dtype = jnp.dtype(DTYPES.get(value, value) if isinstance(value, str) else value)
  except TypeError:
    dtype = None
  if dtype is None or dtype.name not in DTYPES:
    _fail(field, value, f"known dtypes are {', '.join(DTYPES)}")
  return dtype


# The attention kinds a block can have.
ATTENTIONS = ("gqa", "mla")


@dataclasses.dataclass(frozen=True, kw_only=True)
class BlockSpec:
  """One layer of the stack: which block kind, which attention, which FFN.

  Inside a `ModelConfig` the spec is resolved: `attention` is never None and `moe` carries the
  model's dtypes.
  """

  # Block kind: a name registered with `moejax.models.register_block` ("transformer": pre-norm).
  kind: str = "transformer"
  # "gqa" | "mla"; None = the model's `attention`.
  attention: str | None = None
  # The layer's MoE FFN; None = a dense FFN of width `dense_hidden_dim`.
  moe: MoEConfig | None = None

  def replace(self, **changes) -> BlockSpec:
    return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
  """A decoder-only transformer LM; dimension names follow DESIGN.md (V vocab, D width, L layers).

  The defaults give a Llama-style dense model: RoPE, pre-RMSNorm, SwiGLU, untied embeddings, MHA.
  `dtype`/`param_dtype` also apply to the MoE layers: the nested `moe` is stored with them.
  """

  # Vocabulary size V.
  vocab_size: int
  # Model width D.
  d_model: int
  # Transformer blocks L.
  num_layers: int
  # Query heads H.
  num_heads: int
  # Key/value heads (grouped-query attention); None = num_heads (multi-head attention).
  num_kv_heads: int | None = None
  # Width of each head; None = d_model // num_heads.
  head_dim: int | None = None
  # Hidden width of the dense FFN layers; required when the model has any dense layer.
  dense_hidden_dim: int | None = None
  # Activation of the dense FFN layers: one of moejax.moe.config.ACTIVATIONS.
  activation: str = "swiglu"
  # Learned biases on q/k/v projections (Qwen2 / Qwen2-MoE have them).
  qkv_bias: bool = False
  # RoPE base theta (Llama 2: 1e4, Mixtral: 1e6).
  rope_theta: float = 10000.0
  # RMSNorm epsilon.
  norm_eps: float = 1e-6
  # "gqa" (MHA / GQA / MQA, attention.py) or "mla" (DeepSeek-V2/V3 multi-head latent attention, mla.py).
  attention: str = "gqa"
  # GQA only. None; "head": RMSNorm over head_dim on each q/k head, scale [A] (Qwen3-MoE); "proj":
  # RMSNorm over the whole q / k projection, scales [H, A] / [H_kv, A] (OLMoE).
  qk_norm: str | None = None
  # GQA only: clamp q, k, v to [-clip_qkv, clip_qkv] after the qk norm (OLMoE); None = no clamp.
  clip_qkv: float | None = None
  # RoPE on interleaved pairs (2j, 2j+1) instead of rotate-half (j, j+A/2): DeepSeek-V2 and V3.
  rope_interleave: bool = False
  # HF `rope_parameters` / `rope_scaling` minus rope_theta, as a sorted tuple of (key, value) items
  # (a dict is accepted and converted); rope_type "default" or "yarn" (see rope.py). None = plain.
  rope_scaling: tuple[tuple[str, Any], ...] | None = None
  # MLA: rank of the query compression (None = a plain q projection, DeepSeek-V2-Lite), of the
  # key/value compression (required), and the per-head widths of the unrotated and rotated q/k parts
  # and of the values (all required).
  q_lora_rank: int | None = None
  kv_lora_rank: int | None = None
  qk_nope_head_dim: int | None = None
  qk_rope_head_dim: int | None = None
  v_head_dim: int | None = None
  # Layers that are dense whatever the pattern (Qwen2/3-MoE `mlp_only_layers`); needs scan_layers
  # False (the stack would not be periodic).
  mlp_only_layers: tuple[int, ...] = ()
  # Use the token embedding [V, D] as the output projection too (Press & Wolf 2017).
  tie_embeddings: bool = False
  # The MoE layer; None = a dense model.
  moe: MoEConfig | None = None
  # Every moe_every-th layer after the dense prefix is MoE (DeepSeek's moe_layer_freq).
  moe_every: int = 1
  # The first first_k_dense layers are dense (DeepSeek's first_k_dense_replace).
  first_k_dense: int = 0
  # One BlockSpec per layer (block kind, attention, FFN: dense or MoE with its own MoEConfig);
  # None = derived from the pattern fields moe, moe_every, first_k_dense, mlp_only_layers.
  layers: tuple[BlockSpec, ...] | None = None
  # Run the repeating part of the stack as one `nnx.scan`: trace and compile time stop growing with
  # depth (with `layers`: the longest periodic run of identical layers; see transformer.layer_layout). Measured on XLA:CPU (D=64, E=8, fwd+bwd): 16 layers compile in 12 s scanned vs 37 s
  # unscanned; at 4 layers scanning gains nothing.
  scan_layers: bool = False
  # Activation (compute) dtype and parameter dtype; logits and losses are float32 regardless.
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  # Coefficients of the MoE auxiliary losses, summed over MoE layers into aux["aux_loss"]:
  # Switch load balance (Fedus et al. 2021), DeepSeek-V3 sequence-wise balance, ST-MoE router z-loss.
  load_balance_coef: float = 0.01
  seq_balance_coef: float = 0.0
  z_loss_coef: float = 0.0

  def __post_init__(self):
    for name in ("vocab_size", "d_model", "num_layers", "num_heads", "moe_every"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        _fail(name, value, "must be a positive integer")
    for name in ("num_kv_heads", "head_dim", "dense_hidden_dim"):
      value = getattr(self, name)
      if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        _fail(name, value, "must be a positive integer or None")
    if not isinstance(self.first_k_dense, int) or not 0 <= self.first_k_dense <= self.num_layers:
      _fail("first_k_dense", self.first_k_dense, f"must lie in [0, num_layers={self.num_layers}]")
    if self.attention not in ATTENTIONS:
      _fail("attention", self.attention, "must be 'gqa' or 'mla'")
    if self.clip_qkv is not None and not (
      isinstance(self.clip_qkv, (int, float)) and self.clip_qkv > 0 and math.isfinite(self.clip_qkv)
    ):
      _fail("clip_qkv", self.clip_qkv, "must be a finite number > 0 or None")
    if not isinstance(self.rope_interleave, bool):
      _fail("rope_interleave", self.rope_interleave, "must be a bool")
    try:
      object.__setattr__(self, "rope_scaling", normalize_rope_scaling(self.rope_scaling))
    except ValueError as e:
      _fail("rope_scaling", self.rope_scaling, str(e))
    self._check_mlp_only_layers()
    if self.activation not in ACTIVATIONS:
      _fail("activation", self.activation, f"known activations are {', '.join(ACTIVATIONS)}")
    for name in ("rope_theta", "norm_eps"):
      value = getattr(self, name)
      if not (value > 0 and math.isfinite(value)):
        _fail(name, value, "must be a finite number > 0")
    for name in ("load_balance_coef", "seq_balance_coef", "z_loss_coef"):
      value = getattr(self, name)
      if not (value >= 0 and math.isfinite(value)):
        _fail(name, value, "must be a finite number >= 0")
    # Frozen: normalise through object.__setattr__ (dtype strings -> jnp dtypes).
    object.__setattr__(self, "dtype", to_dtype(self.dtype, "dtype"))
    object.__setattr__(self, "param_dtype", to_dtype(self.param_dtype, "param_dtype"))
    if self.moe is not None:
      if not isinstance(self.moe, MoEConfig):
        _fail("moe", self.moe, "must be a MoEConfig or None (use from_config for a ConfigDict)")
      if self.moe.d_model != self.d_model:
        _fail("moe.d_model", self.moe.d_model, f"must equal d_model={self.d_model}")
      moe = self.moe.replace(dtype=self.dtype, param_dtype=self.param_dtype)
      object.__setattr__(self, "moe", moe)
    object.__setattr__(self, "_block_specs", self._resolve_layers())
    attentions = {spec.attention for spec in self.block_specs}
    if "gqa" in attentions:
      self._check_gqa(mla_too="mla" in attentions)
    if "mla" in attentions:
      self._check_mla()
    if self.dense_hidden_dim is None and self.num_moe_layers < self.num_layers:
      _fail(
        "dense_hidden_dim",
        None,
        f"is required: {self.num_layers - self.num_moe_layers} of the {self.num_layers} layers "
        "are dense",
      )

  def _resolve_layers(self) -> tuple[BlockSpec, ...]:
    """`layers` checked and resolved (attention filled in, the model's dtypes on each MoEConfig),
    or the specs the pattern fields give."""
    if self.layers is None:
      moe = lambda i: self.moe if self._pattern_is_moe(i) else None
      return tuple(BlockSpec(attention=self.attention, moe=moe(i)) for i in range(self.num_layers))
    from moejax.models.registry import block_kinds  # the registry module imports nothing of ours

    if not isinstance(self.layers, (tuple, list)) or len(self.layers) != self.num_layers:
      n = len(self.layers) if isinstance(self.layers, (tuple, list)) else "not a tuple"
      _fail(
        "layers", self.layers, f"must be a tuple of num_layers={self.num_layers} BlockSpecs ({n})"
      )
    for name, default in (("moe_every", 1), ("first_k_dense", 0), ("mlp_only_layers", ())):
      if getattr(self, name) != default:
        _fail(
          name,
          getattr(self, name),
          f"must be {default!r} when `layers` is given (it lists every layer's FFN)",
        )
    specs = []
    for i, spec in enumerate(self.layers):
      if not isinstance(spec, BlockSpec):
        _fail(f"layers[{i}]", spec, "must be a BlockSpec (use from_config for dicts)")
      if spec.kind not in block_kinds():
        _fail(f"layers[{i}].kind", spec.kind, f"known block kinds are {', '.join(block_kinds())}")
      attention = self.attention if spec.attention is None else spec.attention
      if attention not in ATTENTIONS:
        _fail(f"layers[{i}].attention", attention, "must be 'gqa', 'mla' or None (the model's)")
      moe = spec.moe
      if moe is not None:
        if not isinstance(moe, MoEConfig):
          _fail(f"layers[{i}].moe", moe, "must be a MoEConfig or None (a dense layer)")
        if moe.d_model != self.d_model:
          _fail(f"layers[{i}].moe.d_model", moe.d_model, f"must equal d_model={self.d_model}")
        moe = moe.replace(dtype=self.dtype, param_dtype=self.param_dtype)
      specs.append(spec.replace(attention=attention, moe=moe))
    specs = tuple(specs)
    object.__setattr__(self, "layers", specs)
    return specs

  def _check_gqa(self, mla_too: bool = False) -> None:
    if self.head_dim is None and self.d_model % self.num_heads:
      _fail(
        "num_heads",
        self.num_heads,
        f"must divide d_model={self.d_model} when head_dim is None (or set head_dim)",
      )
    if self.num_heads % self.resolved_num_kv_heads:
      _fail("num_kv_heads", self.num_kv_heads, f"must divide num_heads={self.num_heads}")
    if self.resolved_head_dim % 2:
      _fail("head_dim", self.resolved_head_dim, "must be even (rotary embeddings rotate pairs)")
    if self.qk_norm not in (None, "head", "proj"):
      _fail("qk_norm", self.qk_norm, "must be None, 'head' or 'proj'")
    for name in _MLA_FIELDS:
      if getattr(self, name) is not None and not mla_too:
        _fail(name, getattr(self, name), "is for attention='mla' only; must be None with 'gqa'")

  def _check_mla(self) -> None:
    for name in _MLA_FIELDS:
      value, required = getattr(self, name), name != "q_lora_rank"
      if value is None and not required:
        continue
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        _fail(
          name,
          value,
          "must be a positive integer with attention='mla'" + ("" if required else " (or None)"),
        )
    if self.qk_rope_head_dim % 2:
      _fail(
        "qk_rope_head_dim", self.qk_rope_head_dim, "must be even (rotary embeddings rotate pairs)"
      )
    if self.num_kv_heads not in (None, self.num_heads):
      _fail(
        "num_kv_heads",
        self.num_kv_heads,
        f"must be None or num_heads={self.num_heads} with attention='mla' (every head has its own "
        "keys and values, expanded from the shared latent)",
      )
    if self.head_dim is not None:
      _fail(
        "head_dim",
        self.head_dim,
        "must be None with attention='mla' (set qk_nope_head_dim, qk_rope_head_dim, v_head_dim)",
      )
    if self.qk_norm is not None:
      _fail("qk_norm", self.qk_norm, "must be None with attention='mla'")
    if self.clip_qkv is not None:
      _fail("clip_qkv", self.clip_qkv, "must be None with attention='mla'")

  def _check_mlp_only_layers(self) -> None:
    value = self.mlp_only_layers
    try:
      layers = tuple(sorted(set(value)))
    except TypeError:
      layers = None
    if layers is None or not all(
      isinstance(i, int) and not isinstance(i, bool) and 0 <= i < self.num_layers for i in layers
    ):
      _fail("mlp_only_layers", value, f"must be layer indices in [0, num_layers={self.num_layers})")
    if layers and self.scan_layers:
      _fail(
        "mlp_only_layers",
        value,
        "must be empty with scan_layers=True (the scanned stack must be periodic)",
      )
    object.__setattr__(self, "mlp_only_layers", layers)

  # ------------------------------------------------------------------------------------------------
  # Derived values.

  @property
  def resolved_num_kv_heads(self) -> int:
    """num_kv_heads, with None read as num_heads."""
    return self.num_kv_heads or self.num_heads

  @property
  def resolved_head_dim(self) -> int:
    """head_dim, with None read as d_model // num_heads."""
    return self.head_dim or self.d_model // self.num_heads

  def _pattern_is_moe(self, i: int) -> bool:
    return (
      self.moe is not None
      and i >= self.first_k_dense
      and (i - self.first_k_dense) % self.moe_every == 0
      and i not in self.mlp_only_layers
    )

  @property
  def block_specs(self) -> tuple[BlockSpec, ...]:
    """One resolved BlockSpec per layer: `layers`, or what the pattern fields give."""
    return self._block_specs

  def layer_moe(self, i: int) -> MoEConfig | None:
    """The MoEConfig of layer i (0-based), None for a dense layer."""
    return self.block_specs[i].moe

  def is_moe_layer(self, i: int) -> bool:
    """Whether layer i (0-based) has an MoE FFN."""
    return self.block_specs[i].moe is not None

  @property
  def moe_layers(self) -> tuple[int, ...]:
    """Indices of the MoE layers, in order: the rows of aux["expert_counts"]."""
    return tuple(i for i in range(self.num_layers) if self.is_moe_layer(i))

  @property
  def moe_num_experts(self) -> tuple[int, ...]:
    """E of each MoE layer, in `moe_layers` order. Per-expert aux rows are zero-padded to the
    largest (`max_num_experts`); row l's real experts are its first moe_num_experts[l]."""
    return tuple(self.block_specs[i].moe.num_experts for i in self.moe_layers)

  @property
  def max_num_experts(self) -> int:
    """The width of per-expert aux arrays: the largest E of the MoE layers (the `moe` block's E when
    there are none, 0 without it)."""
    if self.num_moe_layers:
      return max(self.moe_num_experts)
    return 0 if self.moe is None else self.moe.num_experts

  @property
  def num_moe_layers(self) -> int:
    return len(self.moe_layers)

  def replace(self, **changes) -> ModelConfig:
    return dataclasses.replace(self, **changes)

  # ------------------------------------------------------------------------------------------------
  # ConfigDict round trip.

  @classmethod
  def from_config(cls, config: Any) -> ModelConfig:
    """Build from an experiment's `config.model` (an ml_collections ConfigDict or a mapping).

    Keys are ModelConfig field names; `moe` (optional, None = dense) holds MoEConfig field names, its
    `d_model` defaulting to the model's. dtypes may be strings ('float32', 'bfloat16'). `layers`
    (optional) is a sequence of BlockSpecs or of dicts with BlockSpec keys, whose `moe` dicts override
    the model's `moe` block (see the module docstring).
    """
    fields = _as_dict(config)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - names)
    if unknown:
      raise ValueError(f"ModelConfig has no field(s) {unknown}; known fields are {sorted(names)}")
    moe = fields.pop("moe", None)
    if moe is not None and not isinstance(moe, MoEConfig):
      moe = _moe_config(_as_dict(moe), fields, "moe")
    layers = fields.pop("layers", None)
    if layers is not None:
      layers = _layers_from_config(layers, moe, fields)
    return cls(moe=moe, layers=layers, **fields)

  def to_dict(self) -> dict[str, Any]:
    """Plain dict (dtypes as strings, `moe` as a dict or None, `layers` as a tuple of dicts whose
    `moe` dicts are complete) that `from_config` reads back."""
    out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    out["dtype"], out["param_dtype"] = self.dtype.name, self.param_dtype.name
    out["rope_scaling"] = None if self.rope_scaling is None else dict(self.rope_scaling)
    out["moe"] = _moe_dict(self.moe)
    if self.layers is not None:
      out["layers"] = tuple(
        {"kind": spec.kind, "attention": spec.attention, "moe": _moe_dict(spec.moe)}
        for spec in self.layers
      )
    return out


def _moe_dict(moe: MoEConfig | None) -> dict[str, Any] | None:
  if moe is None:
    return None
  out = dataclasses.asdict(moe)
  out["dtype"], out["param_dtype"] = (
    jnp.dtype(out["dtype"]).name,
    jnp.dtype(out["param_dtype"]).name,
  )
  return out


def _moe_config(moe: dict[str, Any], model: dict[str, Any], field: str) -> MoEConfig:
  """A MoEConfig from a dict of its fields; d_model and dtypes default to the model's; errors name
  `ModelConfig.<field>`."""
  moe_names = {f.name for f in dataclasses.fields(MoEConfig)}
  unknown = sorted(set(moe) - moe_names)
  if unknown:
    raise ValueError(
      f"ModelConfig.{field}: MoEConfig has no field(s) {unknown}; known fields are "
      f"{sorted(moe_names)}"
    )
  moe.setdefault("d_model", model.get("d_model"))
  for name in ("dtype", "param_dtype"):
    moe[name] = to_dtype(moe.get(name, model.get(name, "float32")), f"{field}.{name}")
  if field == "moe":
    return MoEConfig(**moe)
  try:
    return MoEConfig(**moe)
  except (ValueError, TypeError) as e:
    raise ValueError(str(e).replace("MoEConfig.", f"ModelConfig.{field}.", 1)) from e


def _layers_from_config(
  layers: Any, moe: MoEConfig | None, model: dict[str, Any]
) -> tuple[BlockSpec, ...]:
  """`config.model.layers` -> BlockSpecs; each layer's `moe` dict overrides the model's `moe`."""
  if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence):
    _fail("layers", layers, "must be a tuple with one BlockSpec or dict per layer")
  base = {} if moe is None else _moe_dict(moe)
  spec_names = {f.name for f in dataclasses.fields(BlockSpec)}
  specs = []
  for i, layer in enumerate(layers):
    if isinstance(layer, BlockSpec):
      specs.append(layer)
      continue
    try:
      layer = _as_dict(layer)
    except TypeError:
      _fail(f"layers[{i}]", layer, "must be a BlockSpec or a dict with keys kind, attention, moe")
    unknown = sorted(set(layer) - spec_names)
    if unknown:
      raise ValueError(
        f"ModelConfig.layers[{i}] has no field(s) {unknown}; known fields are {sorted(spec_names)}"
      )
    if "moe" not in layer:  # the model's MoE block as is (dense if there is none)
      layer["moe"] = moe
    elif layer["moe"] is not None and not isinstance(layer["moe"], MoEConfig):
      try:
        overrides = _as_dict(layer["moe"])
      except TypeError:
        _fail(f"layers[{i}].moe", layer["moe"], "must be a dict of MoEConfig fields or None")
      layer["moe"] = _moe_config({**base, **overrides}, model, f"layers[{i}].moe")
    specs.append(BlockSpec(**layer))
  return tuple(specs)


def _as_dict(config: Any) -> dict[str, Any]:
  if hasattr(config, "to_dict"):  # ml_collections.ConfigDict (resolves FieldReferences)
    return dict(config.to_dict())
  if isinstance(config, Mapping):
    return dict(config)
  raise TypeError(f"expected a ConfigDict or a mapping, got {type(config).__name__}")

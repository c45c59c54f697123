"""Hugging Face checkpoint import and export for the MoE families transformers ships.

    model, config = load_hf("path/to/Qwen3-30B-A3B", dtype="bfloat16")   # a local directory
    logits, aux = model(tokens)
    save_hf(model, config, "out/")        # config.json + model.safetensors, hub layout
    hf_model = transformers.AutoModelForCausalLM.from_pretrained("out/")

Supported model types: mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v2, deepseek_v3 (import and
export; see hf_config.py for how each config maps onto `ModelConfig`). Only `safetensors` is needed:
neither torch nor transformers is imported.

Import. The model is built abstractly (`nnx.eval_shape`: no memory) in the unscanned layout and each
parameter is read from the checkpoint (`safetensors.safe_open(..., framework="flax")`, which also
reads bfloat16), converted, and placed, one tensor at a time: the checkpoint is never held twice.
Before anything is read, the checkpoint's tensor names, dtypes and shapes are checked against the
parameters: a missing or unexpected tensor, or a shape that does not fit, is a ValueError naming the
tensor (and the expected and found shapes). Tensors transformers ignores are skipped: rotary
`inv_freq` buffers, a tied `lm_head.weight`, DeepSeek-V3's multi-token-prediction layers (index >=
num_hidden_layers). The returned model is in eval mode (router jitter off), like `from_pretrained`'s.

Tensor layouts (A head width, F expert width; HF Linear weights are [out, in]):

    model.embed_tokens.weight [V, D]            embed.embedding [V, D]
    lm_head.weight [V, D]                       lm_head.kernel [D, V]            (= weight.T)
    *.{q,k,v}_proj.weight [H*A, D]              attn.{q,k,v}_proj.kernel [D, H, A] (.T, reshaped)
    *.o_proj.weight [D, H*A]                    attn.o_proj.kernel [H, A, D]
    *.{q,k,v}_proj.bias [H*A]                   attn.*.bias [H, A]
    *.q_norm.weight [A] or [H*A] (OLMoE)        attn.q_norm.scale [A] or [H, A]
    MLA: q_proj, q_a_proj, q_a_layernorm, q_b_proj, kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj,
         o_proj -> attn.{q_proj, q_a_proj, q_a_norm, q_b_proj, kv_a_proj, kv_a_norm, kv_b_proj, o_proj}
    mlp.{gate,up,down}_proj.weight              mlp.w_gate, w_up [D, F], w_down [F, D]   (dense)
    {moe}.gate.weight [E, D]                    moe.router.kernel [D, E]
    {moe}.gate.e_score_correction_bias [E]      moe.router.aux_free_bias [E]     (DeepSeek-V3)
    {moe}.experts.{e}.{gate,up,down}_proj       moe.experts.w_gate, w_up [E, D, F], w_down [E, F, D]
      (Mixtral hub: experts.{e}.w1 / w3 / w2 under block_sparse_moe)
    {moe}.experts.gate_up_proj [E, 2F, D]       (transformers 5 fused layout: gate rows, then up)
    {moe}.experts.down_proj [E, D, F]
    {moe}.shared_expert(s).*, shared_expert_gate.weight [1, D]   moe.shared_experts.*, .gate [D, 1]

Export (`save_hf`) writes the hub layout: per-expert keys, Mixtral's under `block_sparse_moe`.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from moejax.interop.hf_config import (
  SUPPORTED_MODEL_TYPES,
  config_from_hf,
  config_to_hf,
)
from moejax.models.config import ModelConfig, to_dtype
from moejax.models.transformer import Transformer
from moejax.moe.config import MoEConfig
from moejax.moe.experts import expert_kind
from moejax.moe.layer import AuxFreeBias
from moejax.surgery import Copy, Experts, Flat, FusedExperts, Linear, canonical_names, fill
from moejax.surgery import shapes as canonical_shapes

# safetensors dtype names -> the ModelConfig dtype a checkpoint of that dtype loads as.
_CHECKPOINT_DTYPES = {"F32": "float32", "F64": "float32", "BF16": "bfloat16", "F16": "float16"}
# Tensors transformers never loads.
_ALWAYS_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


# --------------------------------------------------------------------------------------------------
# The name table: moejax parameter path -> source.


def _attention_sources(c: ModelConfig, hf: str, mj: str) -> dict[str, Any]:
  if c.attention == "mla":
    src = {
      f"{mj}.kv_a_proj.kernel": Linear(f"{hf}.kv_a_proj_with_mqa.weight"),
      f"{mj}.kv_a_norm.scale": Copy(f"{hf}.kv_a_layernorm.weight"),
      f"{mj}.kv_b_proj.kernel": Linear(f"{hf}.kv_b_proj.weight"),
      f"{mj}.o_proj.kernel": Linear(f"{hf}.o_proj.weight", num_in=2),
    }
    if c.q_lora_rank is None:
      src[f"{mj}.q_proj.kernel"] = Linear(f"{hf}.q_proj.weight")
    else:
      src[f"{mj}.q_a_proj.kernel"] = Linear(f"{hf}.q_a_proj.weight")
      src[f"{mj}.q_a_norm.scale"] = Copy(f"{hf}.q_a_layernorm.weight")
      src[f"{mj}.q_b_proj.kernel"] = Linear(f"{hf}.q_b_proj.weight")
    return src
  src = {f"{mj}.{p}_proj.kernel": Linear(f"{hf}.{p}_proj.weight") for p in "qkv"}
  src[f"{mj}.o_proj.kernel"] = Linear(f"{hf}.o_proj.weight", num_in=2)
  if c.qkv_bias:
    src |= {f"{mj}.{p}_proj.bias": Flat(f"{hf}.{p}_proj.bias") for p in "qkv"}
  if c.qk_norm is not None:
    norm = Copy if c.qk_norm == "head" else Flat
    src |= {f"{mj}.{p}_norm.scale": norm(f"{hf}.{p}_norm.weight") for p in "qk"}
  return src


def _ffn_sources(hf: str, mj: str) -> dict[str, Any]:
  """A SwiGLU MLP with HF names gate_proj / up_proj / down_proj."""
  return {
    f"{mj}.w_gate": Linear(f"{hf}.gate_proj.weight"),
    f"{mj}.w_up": Linear(f"{hf}.up_proj.weight"),
    f"{mj}.w_down": Linear(f"{hf}.down_proj.weight"),
  }


# Mixtral's hub checkpoints name the gated FFN's projections w1 (gate), w3 (up), w2 (down).
_MIXTRAL_NAMES = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}


def _moe_sources(
  model_type: str, m: MoEConfig, layer: str, mj: str, has: Callable[[str], bool]
) -> dict[str, Any]:
  # Mixtral hub checkpoints name the block `block_sparse_moe`; transformers 5 renames it `mlp`.
  block = "block_sparse_moe"
  if model_type != "mixtral" or has(f"{layer}.mlp.gate.weight"):
    block = "mlp"
  hf = f"{layer}.{block}"
  src = {f"{mj}.router.kernel": Linear(f"{hf}.gate.weight")}
  if m.aux_free_bias:
    src[f"{mj}.router.aux_free_bias"] = Copy(f"{hf}.gate.e_score_correction_bias")
  # The expert kind names its leaves' per-expert projections.
  names = dict(expert_kind(m).checkpoint_names)
  if has(f"{hf}.experts.gate_up_proj") and set(names) == {"w_gate", "w_up", "w_down"}:
    src |= {
      f"{mj}.experts.w_gate": FusedExperts(f"{hf}.experts.gate_up_proj", 0),
      f"{mj}.experts.w_up": FusedExperts(f"{hf}.experts.gate_up_proj", 1),
      f"{mj}.experts.w_down": FusedExperts(f"{hf}.experts.down_proj", None),
    }
  else:
    for param, name in names.items():
      name = _MIXTRAL_NAMES.get(name, name) if block == "block_sparse_moe" else name
      keys = tuple(f"{hf}.experts.{e}.{name}.weight" for e in range(m.num_experts))
      src[f"{mj}.experts.{param}"] = Experts(keys)
  if m.num_shared_experts:
    shared = "shared_expert" if model_type == "qwen2_moe" else "shared_experts"
    src |= _ffn_sources(f"{hf}.{shared}", f"{mj}.shared_experts")
    if m.shared_expert_gate:
      src[f"{mj}.shared_experts.gate"] = Linear(f"{hf}.shared_expert_gate.weight")
  return src


def param_sources(
  model_type: str, config: ModelConfig, has: Callable[[str], bool] = lambda key: False
) -> dict[str, Any]:
  """Every parameter path of the unscanned `Transformer(config)` -> how it is read from a
  `model_type` checkpoint. `has(key)` tells which layout the checkpoint uses (fused experts,
  Mixtral's block name); the default picks the hub layout, which is what `save_hf` writes."""
  c = config
  src: dict[str, Any] = {
    "embed.embedding": Copy("model.embed_tokens.weight"),
    "final_norm.scale": Copy("model.norm.weight"),
  }
  if not c.tie_embeddings:
    src["lm_head.kernel"] = Linear("lm_head.weight")
  for i in range(c.num_layers):
    hf, mj = f"model.layers.{i}", f"blocks.{i}"
    src[f"{mj}.attn_norm.scale"] = Copy(f"{hf}.input_layernorm.weight")
    src[f"{mj}.ffn_norm.scale"] = Copy(f"{hf}.post_attention_layernorm.weight")
    src |= _attention_sources(c, f"{hf}.self_attn", f"{mj}.attn")
    if c.is_moe_layer(i):
      src |= _moe_sources(model_type, c.layer_moe(i), hf, f"{mj}.moe", has)
    else:
      src |= _ffn_sources(f"{hf}.mlp", f"{mj}.mlp")
  return src


def _ignored(model_type: str, config: ModelConfig, key: str) -> bool:
  """Whether transformers skips this checkpoint tensor when loading."""
  if _ALWAYS_IGNORED.search(key):
    return True
  if config.tie_embeddings and key == "lm_head.weight":
    return True
  if model_type == "deepseek_v3":  # multi-token-prediction modules follow the decoder layers
    match = re.match(r"model\.layers\.(\d+)\.", key)
    return match is not None and int(match.group(1)) >= config.num_layers
  return False


# --------------------------------------------------------------------------------------------------
# Reading a checkpoint directory.


class _Checkpoint:
  """The tensors of `model.safetensors` or of the shards listed in `model.safetensors.index.json`."""

  def __init__(self, path: Path, stack: contextlib.ExitStack):
    from safetensors import safe_open

    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if index.is_file():
      weight_map = json.loads(index.read_text())["weight_map"]
      files = sorted(set(weight_map.values()))
    elif single.is_file():
      weight_map, files = None, [single.name]
    else:
      raise FileNotFoundError(
        f"no weights in {path}: expected {single.name} or {index.name} (safetensors; convert "
        "pytorch_model.bin checkpoints with save_pretrained(..., safe_serialization=True))"
      )
    self.handles, self.file_of = {}, {}
    for name in files:
      file = path / name
      if not file.is_file():
        raise FileNotFoundError(f"{file} (a shard listed in {index}) does not exist")
      handle = stack.enter_context(safe_open(str(file), framework="flax"))
      self.handles[name] = handle
      self.file_of |= dict.fromkeys(handle.keys(), name)
    if weight_map is not None:
      absent = sorted(k for k, f in weight_map.items() if self.file_of.get(k) != f)
      if absent:
        raise ValueError(f"{index} lists tensors its shards do not hold: {absent[:5]}")
    self.path = path

  def keys(self) -> set[str]:
    return set(self.file_of)

  def _slice(self, key: str):
    return self.handles[self.file_of[key]].get_slice(key)

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(self._slice(key).get_shape())

  def dtype(self, key: str) -> str:
    return self._slice(key).get_dtype()

  def read(self, key: str) -> np.ndarray:
    """The tensor in host memory (numpy; bfloat16 as ml_dtypes.bfloat16)."""
    with jax.default_device(jax.local_devices(backend="cpu")[0]):
      return np.asarray(self.handles[self.file_of[key]].get_tensor(key))


def _check(ckpt: _Checkpoint, sources: dict, shapes: dict, model_type: str, config) -> None:
  """Every needed tensor present, floating point, of the expected shape; no unexpected tensor."""
  expected: dict[str, tuple[tuple[int, ...], str]] = {}
  for path, source in sources.items():
    for key, shape in source.hf_shapes(shapes[path]).items():
      expected[key] = (shape, path)
  keys = ckpt.keys()
  missing = [k for k in expected if k not in keys]
  if missing:
    names = ", ".join(f"{k} (for {expected[k][1]})" for k in missing[:8])
    more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
    raise ValueError(f"checkpoint {ckpt.path} is missing tensor(s) {names}{more}")
  for key, (shape, path) in expected.items():
    dtype = ckpt.dtype(key)
    if dtype not in _CHECKPOINT_DTYPES:
      raise ValueError(
        f"tensor {key} has dtype {dtype}; supported are {', '.join(_CHECKPOINT_DTYPES)} "
        "(dequantise FP8 / integer checkpoints first)"
      )
    found = ckpt.shape(key)
    if found != shape:
      raise ValueError(
        f"tensor {key} has shape {found}, expected {shape} (for moejax parameter {path}); "
        "does config.json match the weights?"
      )
  unexpected = sorted(k for k in keys if k not in expected and not _ignored(model_type, config, k))
  if unexpected:
    more = f" and {len(unexpected) - 8} more" if len(unexpected) > 8 else ""
    raise ValueError(
      f"checkpoint {ckpt.path} has unexpected tensor(s) {', '.join(unexpected[:8])}{more}: a "
      f"{model_type} model with this config.json has no such parameter"
    )


def read_config(path: Path) -> dict[str, Any]:
  if not path.is_dir():
    raise FileNotFoundError(f"{path} is not a directory (expected a local Hugging Face model dir)")
  file = path / "config.json"
  if not file.is_file():
    raise FileNotFoundError(f"{file} does not exist")
  return json.loads(file.read_text())


def _rngs() -> nnx.Rngs:
  return nnx.Rngs(params=0, jitter=1)


def _path(path: tuple) -> str:
  return ".".join(map(str, path))


# --------------------------------------------------------------------------------------------------
# Public API.


def load_hf(
  path: str | Path, *, dtype: Any = None, scan_layers: bool = False
) -> tuple[Transformer, ModelConfig]:
  """Load a local Hugging Face checkpoint directory as a moejax `Transformer` (eval mode).

  `dtype` (None: the checkpoint's, read from its token embedding) is both the parameter and the
  compute dtype. `scan_layers=True` returns the scanned layout, each stacked parameter assembled
  from its layers' tensors. Raises FileNotFoundError for a missing directory, config.json or
  weights file, ValueError for an unsupported model_type (naming the supported ones), an
  unsupported config field, or a tensor that is missing, unexpected or of the wrong shape.
  """
  path = Path(path)
  hf = read_config(path)
  model_type = hf.get("model_type")
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise ValueError(
      f"{path / 'config.json'}: model_type {model_type!r} is not supported; supported model types "
      f"are {', '.join(SUPPORTED_MODEL_TYPES)}"
    )
  with contextlib.ExitStack() as stack:
    ckpt = _Checkpoint(path, stack)
    if dtype is None:
      embed = "model.embed_tokens.weight"
      found = ckpt.dtype(embed) if embed in ckpt.file_of else "F32"
      dtype = _CHECKPOINT_DTYPES.get(found, "float32")
    config = config_from_hf(hf, dtype=to_dtype(dtype)).replace(scan_layers=scan_layers)
    model = _fill(config, model_type, ckpt)
  model.eval()
  return model, config


def _sources(config: ModelConfig, model_type: str, ckpt: _Checkpoint):
  """(abstract model, sources, {canonical path: (shape, dtype)}) of `Transformer(config)`, the
  sources checked against the checkpoint's tensors."""
  model = nnx.eval_shape(lambda: Transformer(config, rngs=_rngs()))
  specs = canonical_shapes(model, config)
  shapes = {name: shape for name, (shape, _) in specs.items()}
  sources = param_sources(model_type, config.replace(scan_layers=False), ckpt.file_of.__contains__)
  if sources.keys() != shapes.keys():  # a bug in the name table, not in the checkpoint
    raise RuntimeError(
      "moejax.interop's name table is out of date: no source for "
      f"{sorted(shapes.keys() - sources.keys())}, no parameter for "
      f"{sorted(sources.keys() - shapes.keys())}"
    )
  _check(ckpt, sources, shapes, model_type, config)
  return model, sources, specs


def _fill(config: ModelConfig, model_type: str, ckpt: _Checkpoint) -> Transformer:
  """`Transformer(config)` (either layout) with every parameter read from `ckpt` exactly once;
  a scanned parameter is assembled from its layers' tensors, never from an unscanned copy."""
  model, sources, _ = _sources(config, model_type, ckpt)
  # Router-jitter RNG streams are not in checkpoints: they start fresh.
  nnx.update(model, nnx.from_flat_state(_init_rng_state(config)))
  # Converted on the host (a stacked one layer by layer into its buffer), then moved to the default
  # device once.
  fill(model, lambda name, shape: sources[name].load(ckpt.read, shape), config)
  return model


def read_hf(path: str | Path, config: ModelConfig) -> dict[str, np.ndarray]:
  """The canonical values (`moejax.surgery`) of a Hugging Face checkpoint directory for a model
  with `config` (as `config_from_hf` reads its config.json, any dtype and layout), checked as
  `load_hf` checks them."""
  path = Path(path)
  model_type = read_config(path).get("model_type")
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise ValueError(f"{path / 'config.json'}: model_type {model_type!r} is not supported")
  with contextlib.ExitStack() as stack:
    ckpt = _Checkpoint(path, stack)
    _, sources, specs = _sources(config, model_type, ckpt)
    return {
      name: np.asarray(sources[name].load(ckpt.read, shape)).astype(dtype, copy=False)
      for name, (shape, dtype) in specs.items()
    }


def _init_rng_state(config: ModelConfig):
  """The freshly initialised RNG-stream variables of `Transformer(config)` (jit: the parameter
  initialisers it also traces are dead code and never run)."""
  state = jax.jit(lambda: nnx.state(Transformer(config, rngs=_rngs()), nnx.RngState))()
  return nnx.to_flat_state(state)


def save_hf(
  model: Transformer, config: ModelConfig, path: str | Path, *, model_type: str | None = None
) -> Path:
  """Write `model` as a transformers checkpoint: config.json + model.safetensors (hub layout).

  `model_type` (default: the first family that expresses `config` exactly; see
  hf_config.config_to_hf) picks the family; ValueError says which families can be exported and why
  each does not fit. The directory is created if needed. Returns it.
  """
  from safetensors.numpy import save_file  # writes ml_dtypes.bfloat16 arrays as BF16

  hf = config_to_hf(config, model_type)
  model_type = hf["model_type"]
  # Each variable is copied to the host once; a scanned one is read layer by layer from that copy.
  host, where = {}, {}
  for p, var in nnx.to_flat_state(nnx.state(model)):
    if isinstance(var, (nnx.Param, AuxFreeBias)):
      names, stacked = canonical_names(config, p)
      where |= {name: (p, u if stacked else None) for u, name in enumerate(names)}
      host[p] = var

  def value(name: str) -> np.ndarray:
    p, u = where[name]
    if not isinstance(host[p], np.ndarray):
      host[p] = np.asarray(host[p].get_value())
    return host[p] if u is None else host[p][u]

  tensors: dict[str, np.ndarray] = {}
  for name, source in param_sources(model_type, config.replace(scan_layers=False)).items():
    for key, tensor in source.export(value(name)).items():
      # transformers keeps DeepSeek-V3's routing bias in float32 (_keep_in_fp32_modules_strict).
      dtype = np.float32 if key.endswith("e_score_correction_bias") else config.param_dtype
      tensors[key] = np.ascontiguousarray(tensor.astype(dtype, copy=False))
  if model_type == "deepseek_v3":
    for i in config.moe_layers:  # transformers always has the bias: a zero one routes the same
      moe = config.layer_moe(i)
      if not moe.aux_free_bias:
        key = f"model.layers.{i}.mlp.gate.e_score_correction_bias"
        tensors[key] = np.zeros((moe.num_experts,), np.float32)
  path = Path(path)
  path.mkdir(parents=True, exist_ok=True)
  save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
  (path / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
  return path

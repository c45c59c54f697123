"""The shared skeleton of every experiment config, and the `arg` string parser of big_vision.

An experiment file (experiments/<family>.py) starts from `base_config()` and overrides what its
family studies. Every field the trainer reads exists here, with a one-line comment, so the config can
be locked: a typo in an override (`--config.train.stpes=10`) fails before anything compiles.

The `model.moe` block is not written out here: `moe_config()` generates it from the fields, defaults
and comments of `moejax.moe.MoEConfig` (`dataclass_skeleton`, `field_comments`), so a field added to
MoEConfig is settable as `--config.model.moe.FIELD=...` at once. `describe(config)` lists every
field of a config with its value and comment.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import textwrap
import tokenize
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any

import ml_collections
from ml_collections import config_dict


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses 'tiny' or 'variant=base,experts=64' into a ConfigDict over `defaults`.

  A bare word sets the boolean default of that name (`tiny` -> tiny=True) or, if there is no such
  boolean, the `variant` field. Values are converted to the type of the default.
  """
  out = ml_collections.ConfigDict(defaults)
  for part in filter(None, (arg or "").split(",")):
    if "=" not in part:
      if isinstance(defaults.get(part), bool):
        out[part] = True
      elif "variant" in defaults:
        out.variant = part
      else:
        raise ValueError(f"config arg {part!r} is not a known flag; known: {sorted(defaults)}")
      continue
    key, value = part.split("=", 1)
    if key not in defaults:
      raise ValueError(f"config arg {key!r} is unknown; known: {sorted(defaults)}")
    default = defaults[key]
    if isinstance(default, bool):
      out[key] = value.lower() in ("1", "true", "yes")
    elif default is None:
      out[key] = value
    else:
      out[key] = type(default)(value)
  return out


# Types a config field may hold, so that `--config.a.b=value` can parse it.
_FIELD_TYPES = {t.__name__: t for t in (bool, int, float, str, tuple)}


def _comment_lines(source: str) -> dict[int, str]:
  """Line number (1-based) -> text of each line of `source` that holds only a `#` comment."""
  lines = source.splitlines()
  out = {}
  for tok in tokenize.generate_tokens(io.StringIO(source).readline):
    if tok.type == tokenize.COMMENT and lines[tok.start[0] - 1].lstrip().startswith("#"):
      out[tok.start[0]] = tok.string.lstrip("#").strip()
  return out


def _comment_above(comments: Mapping[int, str], lineno: int) -> str:
  """The block of comment lines directly above line `lineno`, joined into one line."""
  block = []
  while lineno - 1 in comments:
    lineno -= 1
    block.append(comments[lineno])
  return " ".join(part for part in reversed(block) if part)


def field_comments(cls: type) -> dict[str, str]:
  """The `# comment` lines directly above each field of the dataclass `cls`, joined into one line.

  A field without a comment of its own that directly follows another field (no blank line between)
  shares that field's comment, as `topk_groups` shares the one above `num_groups`. Fields of
  dataclass bases are included; a class whose source cannot be read gives empty comments.
  """
  out = {}
  for klass in reversed(cls.__mro__):
    if not dataclasses.is_dataclass(klass):
      continue
    try:
      source = textwrap.dedent(inspect.getsource(klass))
    except (OSError, TypeError):
      continue
    comments = _comment_lines(source)
    class_def = next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef))
    previous_end, previous = None, ""
    for node in class_def.body:
      if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
        previous_end = None
        continue
      text = _comment_above(comments, node.lineno)
      if not text and previous_end == node.lineno - 1:
        text = previous
      out[node.target.id] = text
      previous_end, previous = node.end_lineno, text
  return {f.name: out.get(f.name, "") for f in dataclasses.fields(cls)}


def _placeholder_type(cls: type, field: dataclasses.Field) -> type:
  """The type of `field` without its `| None`: `int | None` -> int, `tuple[int, ...]` -> tuple."""
  hint = field.type
  if isinstance(hint, str):  # `from __future__ import annotations`
    try:
      hint = typing.get_type_hints(cls)[field.name]
    except Exception:  # a name only the class's scope knows: read the string instead
      names = [part.strip().split("[")[0] for part in hint.split("|")]
      names = [name for name in names if name not in ("None", "NoneType")]
      hint = _FIELD_TYPES.get(names[0]) if len(names) == 1 else hint
  if typing.get_origin(hint) in (typing.Union, types.UnionType):
    args = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    hint = args[0] if len(args) == 1 else hint
  hint = typing.get_origin(hint) or hint
  if hint in _FIELD_TYPES.values():
    return hint
  raise TypeError(
    f"{cls.__name__}.{field.name}: no config type for the annotation {field.type!r}; a field "
    f"without a default needs one of {', '.join(_FIELD_TYPES)} (optionally `| None`)"
  )


def dataclass_skeleton(
  cls: type, *, exclude: Iterable[str] = (), defaults: Mapping[str, Any] | None = None
) -> ml_collections.ConfigDict:
  """A ConfigDict with one key per field of the dataclass `cls`, holding the field's default.

  `defaults` overrides or supplies defaults (a field without one must get one here or becomes a
  placeholder). A default of None becomes `config_dict.placeholder(T)` with T from the annotation
  (`int | None` -> int), so the command line can set it; tuples stay tuples. The field comments are
  `field_comments(cls)`. `exclude` names fields left out (the caller sets them elsewhere).
  """
  exclude, defaults = set(exclude), dict(defaults or {})
  fields = {f.name: f for f in dataclasses.fields(cls)}
  unknown = sorted((exclude | set(defaults)) - set(fields))
  if unknown:
    raise ValueError(f"{cls.__name__} has no field(s) {unknown}; known fields are {sorted(fields)}")
  out = {}
  for name, field in fields.items():
    if name in exclude:
      continue
    if name in defaults:
      value = defaults[name]
    elif field.default is not dataclasses.MISSING:
      value = field.default
    elif field.default_factory is not dataclasses.MISSING:
      value = field.default_factory()
    else:
      value = None
    if value is None:
      value = config_dict.placeholder(_placeholder_type(cls, field))
    elif isinstance(value, list):
      value = tuple(value)  # the command line sets tuples, not lists
    elif not isinstance(value, (bool, int, float, str, tuple)):
      raise TypeError(
        f"{cls.__name__}.{name}: its default {value!r} cannot be a config value; give it a "
        f"bool, int, float, str or tuple default, or exclude it from the skeleton"
      )
    out[name] = value
  return ml_collections.ConfigDict(out)


# Fields of `MoEConfig` that the model sets, not the `model.moe` block.
MOE_SET_BY_MODEL = ("d_model", "dtype", "param_dtype")
# The skeleton's values for MoEConfig fields without a default: a small CPU-friendly layer.
MOE_SKELETON_DEFAULTS = dict(num_experts=8, top_k=2, expert_hidden_dim=256)


def moe_config(**overrides) -> ml_collections.ConfigDict:
  """The model.moe block, generated from `moejax.moe.MoEConfig`: its fields, defaults and comments.

  A field added to MoEConfig is settable as `--config.model.moe.FIELD=...` with nothing to add here;
  `describe(config)` shows its comment. d_model, dtype and param_dtype come from config.model.
  """
  # Imported here, not at the top, so that `import moejax.train` and `--help` do not import jax.
  from moejax.moe.config import MoEConfig

  moe = dataclass_skeleton(MoEConfig, exclude=MOE_SET_BY_MODEL, defaults=MOE_SKELETON_DEFAULTS)
  moe.update(overrides)
  return moe


def base_config() -> ml_collections.ConfigDict:
  """Every field the trainer reads, with small CPU-friendly defaults. Not locked: lock after edits."""
  config = ml_collections.ConfigDict()

  config.model = ml_collections.ConfigDict(
    dict(
      # Vocabulary size V; None = the tokenizer's.
      vocab_size=config_dict.placeholder(int),
      # Model width D.
      d_model=128,
      # Transformer blocks L.
      num_layers=4,
      # Attention heads H and key/value heads (GQA when fewer).
      num_heads=4,
      num_kv_heads=4,
      # Per-head width (None: d_model // num_heads).
      head_dim=config_dict.placeholder(int),
      # Hidden width of dense FFN layers.
      dense_hidden_dim=512,
      # Dense FFN activation: swiglu | geglu | gelu | relu.
      activation="swiglu",
      # RoPE base frequency.
      rope_theta=10_000.0,
      # RMSNorm epsilon.
      norm_eps=1e-6,
      # Share the token embedding with the output projection.
      tie_embeddings=False,
      # Every n-th layer after the dense prefix is MoE (1: all of them).
      moe_every=1,
      # The first k layers are dense (DeepSeek's first_k_dense_replace).
      first_k_dense=0,
      # One block spec per layer, e.g. ({"moe": {"num_experts": 8}}, {"moe": None}, ...): each
      # layer's moe dict overrides the moe block below, None = a dense layer (None: the pattern
      # fields above say which layers are MoE; see moejax.models.config).
      layers=config_dict.placeholder(tuple),
      # Scan over (groups of) layers: faster compiles for deep models.
      scan_layers=True,
      # Activation and parameter dtypes: float32 | bfloat16 (logits and losses stay float32).
      dtype="float32",
      param_dtype="float32",
      # Coefficients of the auxiliary losses added to the LM loss (per MoE layer, averaged).
      load_balance_coef=0.01,
      seq_balance_coef=0.0,
      z_loss_coef=0.001,
      # The MoE layers; see moejax.moe.MoEConfig.
      moe=moe_config(),
    )
  )

  config.data = ml_collections.ConfigDict(
    dict(
      # stdlib (embedded, no download) | text | tfds | synthetic.
      source="stdlib",
      # Directory or glob of text files for source=text.
      path=config_dict.placeholder(str),
      # tfds dataset name (lm1b, wikitext/wikitext-103-raw-v1, tiny_shakespeare, ...) and its data_dir.
      tfds_name=config_dict.placeholder(str),
      tfds_data_dir=config_dict.placeholder(str),
      # The text feature of the tfds examples.
      tfds_text_key="text",
      # Let tfds download and prepare a missing dataset (False: fail fast when offline).
      tfds_download=True,
      # byte | sentencepiece.
      tokenizer="byte",
      # A SentencePiece .model file (None: train one on the training split).
      spm_model=config_dict.placeholder(str),
      # Vocabulary size when training a SentencePiece model.
      spm_vocab_size=512,
      # Fraction of documents held out for validation (deterministic by document).
      val_fraction=0.05,
      # Cap on the bytes read for stdlib/text sources.
      max_bytes=16_000_000,
      # Domains of the synthetic corpus.
      num_domains=4,
    )
  )

  config.train = ml_collections.ConfigDict(
    dict(
      # Optimizer steps.
      steps=1000,
      # Global batch size (sequences per step, over all processes).
      batch_size=16,
      # Tokens per sequence S.
      seq_len=128,
      # Cut each batch into this many micro-batches whose gradients are summed (gradient
      # accumulation; the MoE auxiliary losses are per micro-batch). On one CPU device they run
      # concurrently on host threads; see moejax.train.trainer.
      microbatches=1,
      # Peak learning rate of the warmup + cosine schedule.
      learning_rate=3e-3,
      # Linear warmup steps.
      warmup_steps=50,
      # The cosine decays to learning_rate * min_lr_ratio.
      min_lr_ratio=0.1,
      # AdamW decoupled weight decay (matrices only; norms and biases are not decayed).
      weight_decay=0.1,
      # AdamW moments.
      b1=0.9,
      b2=0.95,
      eps=1e-8,
      # Clip the global gradient norm to this value (0: off).
      grad_clip=1.0,
      # Save a checkpoint every n steps (and at the end).
      checkpoint_every=100,
      # Checkpoints kept on disk.
      keep_checkpoints=3,
      # Evaluate on the validation split every n steps (and at the end).
      eval_every=100,
      # Validation batches per evaluation.
      eval_batches=8,
      # Log training metrics every n steps.
      log_every=10,
      # Seed of parameters, data order and router noise.
      seed=0,
      # Where the first parameters come from (moejax.surgery): hf:DIR (a Hugging Face checkpoint;
      # its config.json replaces config.model, only config.model.param_dtype is kept), run:DIR (a
      # moejax run's latest checkpoint), DIR, or module:function (a surgery function: upcycling,
      # pruning, merging); None: random initialisation. Resuming from this run's own checkpoints
      # comes first.
      init_from=config_dict.placeholder(str),
      # The older spelling of init_from=hf:DIR.
      init_from_hf=config_dict.placeholder(str),
      # Show a progress bar.
      progress_bar=True,
      # Write plots at the end of training.
      plots=True,
    )
  )

  # The device mesh (expert parallelism builds on it); -1 takes the remaining devices.
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, expert=1, tensor=1))
  config.parallel = ml_collections.ConfigDict(
    dict(
      # Mesh axes that split the experts of MoE layers. "expert,tensor" folds the tensor-parallel
      # devices of attention into expert parallelism (MoE Parallel Folding, Liu et al. 2025).
      expert_axes="expert",
    )
  )
  return config


def _dict_comments(fn) -> dict[str, str]:
  """`block.key` -> the comment above `key=` in `config.block = ConfigDict(dict(key=...))` in `fn`."""
  source = textwrap.dedent(inspect.getsource(fn))
  comments, out = _comment_lines(source), {}
  for node in ast.walk(ast.parse(source)):
    if not (
      isinstance(node, ast.Assign)
      and len(node.targets) == 1
      and isinstance(node.targets[0], ast.Attribute)
    ):
      continue
    calls = [c for c in ast.walk(node.value) if isinstance(c, ast.Call)]
    call = next((c for c in calls if isinstance(c.func, ast.Name) and c.func.id == "dict"), None)
    previous_end, previous = None, ""
    for keyword in call.keywords if call else ():
      text = _comment_above(comments, keyword.lineno)
      if not text and previous_end == keyword.lineno - 1:
        text = previous
      out[f"{node.targets[0].attr}.{keyword.arg}"] = text
      previous_end, previous = keyword.end_lineno, text
  return out


@functools.cache
def field_docs() -> dict[str, str]:
  """Dotted config path -> its one-line comment, for every field of `base_config()`."""
  from moejax.moe.config import MoEConfig

  docs = _dict_comments(base_config)
  docs.update({f"model.moe.{k}": v for k, v in field_comments(MoEConfig).items()})
  return docs


def describe(config: ml_collections.ConfigDict) -> str:
  """Every field of `config`, one a line: `path = value  # comment` (see `field_docs`)."""
  docs = field_docs()

  def leaves(node, prefix):
    for key, value in node.items():
      path = f"{prefix}{key}"
      if isinstance(value, Mapping):
        yield from leaves(value, f"{path}.")
      else:
        yield path, value

  lines = []
  for path, value in leaves(config.to_dict(), ""):
    comment = docs.get(path)
    lines.append(f"{path} = {value!r}" + (f"  # {comment}" if comment else ""))
  return "\n".join(lines)

"""The shared skeleton of every experiment config, and the `arg` string parser of big_vision.

An experiment file (experiments/<family>.py) starts from `base_config()` and overrides what its
family studies. Every field the trainer reads exists here, with a one-line comment, so the config can
be locked: a typo in an override (`--config.train.stpes=10`) fails before anything compiles.
"""

from __future__ import annotations

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


def moe_config(**overrides) -> ml_collections.ConfigDict:
  """The model.moe block: keys are `moejax.moe.MoEConfig` fields (d_model comes from model)."""
  moe = ml_collections.ConfigDict(
    dict(
      # Routed experts E.
      num_experts=8,
      # Experts per token K (cap for top_p; mean experts per token for expert_choice).
      top_k=2,
      # Hidden width F of each routed expert.
      expert_hidden_dim=256,
      # softmax_topk | topk_softmax | sigmoid | expert_choice | top_p.
      router="softmax_topk",
      # Renormalise the selected weights to sum to one.
      norm_topk_prob=True,
      # Scale of the combine weights (DeepSeek-V3: 2.5).
      routed_scaling_factor=1.0,
      # Group-limited routing (sigmoid router): groups and groups kept per token.
      num_groups=1,
      topk_groups=1,
      # Probability mass for the top_p router.
      top_p=1.0,
      # C = ceil(T*K/E * capacity_factor) for capacity dispatch and expert choice.
      capacity_factor=1.25,
      # dropless | capacity.
      dispatch="dropless",
      # swiglu | geglu | gelu | relu.
      activation="swiglu",
      # Shared experts every token visits (DeepSeekMoE, Qwen2-MoE).
      num_shared_experts=0,
      # Hidden width of each shared expert (None: expert_hidden_dim).
      shared_expert_hidden_dim=config_dict.placeholder(int),
      # Qwen2-MoE's sigmoid gate on the shared experts.
      shared_expert_gate=False,
      # Multiplicative router-input jitter in training (0: off).
      jitter_noise=0.0,
      # Learned bias on router logits (gpt-oss).
      router_bias=False,
      # Auxiliary-loss-free balancing bias (DeepSeek-V3), updated every step outside the optimizer.
      aux_free_bias=False,
      # Its update rate gamma.
      aux_free_bias_rate=0.001,
      # Grouped-matmul backend: auto | xla | blas | cpu | reference.
      gmm_backend="auto",
      # Expert-parallel all_to_all: auto (ragged on TPU/GPU, padded on CPU) | padded | ragged.
      ep_transport="auto",
      # Least-Loaded EP: spill load above alpha x the mean device load (None: off) ...
      llep_alpha=config_dict.placeholder(float),
      # ... to devices hosting at most this many foreign experts.
      llep_slots=1,
    )
  )
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
      # Start from a Hugging Face checkpoint directory (moejax.interop.load_hf): its config.json
      # replaces config.model (only config.model.param_dtype is kept); None: random initialisation.
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

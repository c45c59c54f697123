"""Training-step throughput on CPU: moejax's Trainer vs transformers' MixtralForCausalLM (PyTorch).

    python bench/train_step.py --out runs/bench_train_step.json

For every `--configs` entry (an experiment file and its `get_config` arg, as `--config` takes them),
one process measures, on the same random token batches [B, S]:

- `moejax`: the real `moejax.train.trainer.Trainer` step: forward, LM loss + MoE auxiliary losses,
  backward, global-norm clipping, AdamW (warmup-cosine schedule, decay on matrices only), the
  aux-loss-free bias update (a no-op unless the config enables the bias) and the step's metrics, all
  in one jitted, donating call; the host batch is put on the mesh inside the step, as in training.
  A config with `train.microbatches` > 1 (the tiny one has 2) runs one jitted call per micro-batch,
  side by side on CPU threads, and one for the sum and the update (`moejax.train.trainer`).
- `hf`: `MixtralForCausalLM` of the same shapes (vocabulary, width, layers, heads, kv heads, head
  width, experts, top-k, expert width, RoPE theta, RMSNorm eps, tied embeddings), float32,
  `output_router_logits=True`: `model(input_ids, labels=targets).loss.backward()`, then
  `clip_grad_norm_` and a `torch.optim.AdamW` step with the config's betas, eps and weight decay
  (matrices only) at its peak learning rate.

Both sides use the vocabulary of the config's tokenizer (the byte tokenizer's 264 unless
`config.model.vocab_size` is set). Only Mixtral-shaped configs compare: a softmax top-k router that
renormalises, SwiGLU experts, no shared experts, every layer MoE. Differences left in: moejax adds
the ST-MoE router z-loss when `z_loss_coef > 0` (transformers' Mixtral has none), and transformers'
load-balance loss is computed once over all layers' tokens, moejax's per layer and summed; its
`router_aux_loss_coef` is set so that both aux terms are equal under uniform routing (see
`hf_aux_loss_coef`).

The first step (compilation for moejax) and `--warmup` more are not timed. Then the two take
turns (`moejax.benchmarking.time_interleaved`), so that a machine whose speed drifts slows both
alike: in each turn, `--lead` untimed steps (default 1), then one timed step. The timed step thus
follows a step of its own, as in training, not the other side's: PyTorch's OpenMP workers spin for
a while after a step, on the cores the next step needs, and without the lead step moejax paid for
that (230 vs 217 ms at the tiny config). The table reports each side's median wall time over
`--repeats` turns, every step waited for (`jax.block_until_ready` on the new state and metrics;
PyTorch on CPU is synchronous), and tokens/s = B * S / time. PyTorch runs with
`torch.set_num_threads` set to the cores XLA:CPU uses. A config whose batch holds more than
`--max-tokens` tokens runs with fewer sequences (the table shows `B (of B_config)`), so that a
2-core machine finishes; `--batch-size` and `--seq-len` set the shapes outright.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib.util
import itertools
import pathlib
import sys
from collections.abc import Callable, Sequence
from typing import Any

import flax
import jax
import ml_collections
import numpy as np

from moejax import hostmem, sharding
from moejax.benchmarking import (
  cpu_count,
  cpu_name,
  keep_latest,
  markdown_table,
  time_interleaved,
  torch_threads,
  write_rows,
)
from moejax.data import BYTE_VOCAB_SIZE
from moejax.models import ModelConfig
from moejax.train.trainer import Trainer, build_model_config

_REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_CONFIGS = "experiments/mixtral.py:tiny,experiments/mixtral.py:variant=small"
# transformers 5.23's attention implementations that run on CPU; "sdpa" is its default.
HF_ATTENTION = ("sdpa", "eager")
# Its experts implementations; None lets `MixtralForCausalLM` choose ("grouped_mm" in 5.23, see
# bench/moe_layer.py).
HF_EXPERTS = ("grouped_mm", "eager", "batched_mm")


# --------------------------------------------------------------------------------------------------
# Configs.


def load_config(spec: str) -> ml_collections.ConfigDict:
  """'experiments/mixtral.py:variant=small' -> that file's `get_config("variant=small")`.

  A relative path is read from the working directory, else from the repository root.
  """
  path, _, arg = spec.partition(":")
  file = pathlib.Path(path)
  if not file.is_absolute() and not file.exists():
    file = _REPO / file
  if not file.exists():
    raise FileNotFoundError(f"--configs: no config file {path!r} (in . or {_REPO})")
  module_spec = importlib.util.spec_from_file_location(f"_bench_config_{file.stem}", file)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> None:
  """Applies 'model.num_layers=1'-style overrides (values are Python literals, else strings)."""
  for item in overrides:
    key, sep, text = item.partition("=")
    if not sep:
      raise ValueError(f"--set {item!r}: expected FIELD=VALUE, e.g. model.num_layers=1")
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    *parents, name = key.split(".")
    node = config
    for parent in parents:
      node = node[parent]
    if name not in node:
      raise KeyError(f"--set {item!r}: the config has no field {key!r}")
    node[name] = value


def tokenizer_vocab_size(config: ml_collections.ConfigDict) -> int:
  """The vocabulary the trainer would get from the config's tokenizer, without building it."""
  if config.data.tokenizer == "byte":
    return BYTE_VOCAB_SIZE
  return int(config.data.spm_vocab_size)  # a SentencePiece model trained to that size


def step_shapes(
  config: ml_collections.ConfigDict,
  batch_size: int | None,
  seq_len: int | None,
  max_tokens: int,
) -> tuple[int, int, bool]:
  """(B, S, reduced): the config's shapes, or the overrides; B shrinks to fit `max_tokens`."""
  s = seq_len or int(config.train.seq_len)
  if batch_size:
    return batch_size, s, False
  b = int(config.train.batch_size)
  if max_tokens and b * s > max_tokens:
    return max(1, max_tokens // s), s, True
  return b, s, False


def random_batches(vocab_size: int, b: int, s: int, count: int, seed: int) -> list[dict]:
  """`count` batches of uniform random tokens: inputs, targets int32 [B, S], mask float32 [B, S]."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(count):
    tokens = rng.integers(0, vocab_size, (b, s + 1), dtype=np.int32)  # [B, S+1]
    out.append(
      {
        "inputs": tokens[:, :-1].copy(),
        "targets": tokens[:, 1:].copy(),
        "mask": np.ones((b, s), np.float32),
      }
    )
  return out


def describe(c: ModelConfig) -> str:
  """'V264 L4 D128 H4/2 E8 top-2 F256': the shapes that set a step's cost."""
  moe = c.moe
  return (
    f"V{c.vocab_size} L{c.num_layers} D{c.d_model} H{c.num_heads}/{c.resolved_num_kv_heads} "
    f"E{moe.num_experts} top-{moe.top_k} F{moe.expert_hidden_dim}"
  )


# --------------------------------------------------------------------------------------------------
# moejax.


def moejax_runner(
  config: ml_collections.ConfigDict, model_config: ModelConfig, batches: list[dict]
) -> tuple[Callable[[], None], Callable[[], dict[str, Any]]]:
  """(step, summary): `step()` runs one `Trainer.train_step` on the next of `batches` (cycled) and
  waits for it; `summary()` gives the parameter count and the latest step's LM loss."""
  trainer = Trainer(config, model_config, sharding.make_mesh(config.mesh))
  params, rest, opt_state = jax.block_until_ready(trainer.init())
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  batch_iter = itertools.cycle(batches)
  metrics = {}

  def step():
    nonlocal params, rest, opt_state, metrics
    # The step donates params, rest and opt_state: each call consumes the previous call's outputs.
    params, rest, opt_state, metrics = trainer.train_step(params, rest, opt_state, next(batch_iter))
    jax.block_until_ready((params, rest, opt_state, metrics))

  return step, lambda: {"params": num_params, "loss": float(metrics["loss"])}


# --------------------------------------------------------------------------------------------------
# transformers.


def hf_aux_loss_coef(c: ModelConfig) -> float:
  """The `router_aux_loss_coef` giving transformers' load-balance loss moejax's weight on its own.

  moejax adds `load_balance_coef * loss_l` per MoE layer l, each loss 1.0 under uniform routing;
  transformers adds `router_aux_loss_coef * loss` once, its loss pooled over all layers' tokens and
  top_k under uniform routing. Equal at uniform routing: coef * L_moe / top_k.
  """
  return c.load_balance_coef * c.num_moe_layers / c.moe.top_k


def check_mixtral_shaped(c: ModelConfig) -> None:
  """Raises ValueError naming the field when `MixtralForCausalLM` cannot have the model's shapes."""
  moe = c.moe
  problems = []
  if moe is None or c.num_moe_layers != c.num_layers:
    problems.append(f"every layer MoE (moe_every=1, first_k_dense=0; got {c.moe_layers})")
  else:
    if moe.router != "softmax_topk" or not moe.norm_topk_prob:
      problems.append(f"moe.router='softmax_topk' with norm_topk_prob (got {moe.router!r})")
    if moe.activation != "swiglu":
      problems.append(f"moe.activation='swiglu' (got {moe.activation!r})")
    if moe.num_shared_experts or moe.router_bias:
      problems.append("no shared experts and no router bias")
  if c.qkv_bias:
    problems.append("qkv_bias=False")
  if c.dtype.name != "float32" or c.param_dtype.name != "float32":
    problems.append("dtype=param_dtype='float32'")
  if problems:
    raise ValueError("hf_runner: MixtralForCausalLM needs " + "; ".join(problems))


def build_hf_model(
  c: ModelConfig,
  *,
  seq_len: int,
  attention: str,
  experts: str | None,
  seed: int,
) -> Any:
  """`MixtralForCausalLM` (float32, train mode) with the shapes of the moejax model `c`."""
  import torch
  from transformers import MixtralConfig, MixtralForCausalLM

  check_mixtral_shaped(c)
  hf_config = MixtralConfig(
    vocab_size=c.vocab_size,
    hidden_size=c.d_model,
    intermediate_size=c.moe.expert_hidden_dim,
    num_hidden_layers=c.num_layers,
    num_attention_heads=c.num_heads,
    num_key_value_heads=c.resolved_num_kv_heads,
    head_dim=c.resolved_head_dim,
    num_local_experts=c.moe.num_experts,
    num_experts_per_tok=c.moe.top_k,
    max_position_embeddings=max(seq_len, 4096),
    rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
    rms_norm_eps=c.norm_eps,
    tie_word_embeddings=c.tie_embeddings,
    router_jitter_noise=c.moe.jitter_noise,
    output_router_logits=True,
    router_aux_loss_coef=hf_aux_loss_coef(c),
    use_cache=False,
    attn_implementation=attention,
    experts_implementation=experts,
  )
  torch.manual_seed(seed)
  return MixtralForCausalLM(hf_config).float().train()


def hf_runner(
  config: ml_collections.ConfigDict,
  model_config: ModelConfig,
  batches: list[dict],
  *,
  attention: str,
  experts: str | None,
) -> tuple[Callable[[], None], Callable[[], dict[str, Any]]]:
  """(step, summary) for a MixtralForCausalLM training step over `batches` (cycled), as
  `moejax_runner`; `summary()` also names the attention / experts implementations the model
  resolved. Run the steps inside `torch_threads`."""
  import torch

  t = config.train
  s = batches[0]["inputs"].shape[1]
  model = build_hf_model(
    model_config, seq_len=s, attention=attention, experts=experts, seed=int(t.seed)
  )
  num_params = sum(p.numel() for p in model.parameters())
  # AdamW as moejax's optimizer.py sets it up: decoupled decay on matrices only.
  matrices = [p for p in model.parameters() if p.ndim >= 2]
  vectors = [p for p in model.parameters() if p.ndim < 2]
  optimizer = torch.optim.AdamW(
    [
      {"params": matrices, "weight_decay": float(t.weight_decay)},
      {"params": vectors, "weight_decay": 0.0},
    ],
    lr=float(t.learning_rate),
    betas=(float(t.b1), float(t.b2)),
    eps=float(t.eps),
  )
  torch_batches = [
    (torch.from_numpy(b["inputs"]).long(), torch.from_numpy(b["targets"]).long()) for b in batches
  ]
  batch_iter = itertools.cycle(torch_batches)

  def step():
    inputs, targets = next(batch_iter)
    optimizer.zero_grad(set_to_none=True)
    # `labels` are shifted by one inside the loss; `shift_labels` passes targets already aligned
    # with the inputs, so both sides predict the same tokens.
    output = model(input_ids=inputs, labels=targets, shift_labels=targets, use_cache=False)
    output.loss.backward()
    if t.grad_clip and t.grad_clip > 0:
      torch.nn.utils.clip_grad_norm_(model.parameters(), float(t.grad_clip))
    optimizer.step()
    return output

  run, latest = keep_latest(step)

  def summary():
    last = latest()
    lm_loss = last.loss.item() - model.config.router_aux_loss_coef * last.aux_loss.item()
    return {
      "params": num_params,
      "loss": lm_loss,
      "attention": model.config._attn_implementation,
      "experts": model.config._experts_implementation,
    }

  return run, summary


# --------------------------------------------------------------------------------------------------
# Table and command line.


def format_table(rows: list[dict[str, Any]], header: str) -> str:
  columns = [
    ("config", "config", "s"),
    ("batch", "batch_label", "s"),
    ("seq", "seq_len", "d"),
    ("model", "model", "s"),
    ("params moejax", "moejax_params", ","),
    ("params hf", "hf_params", ","),
    ("moejax ms/step", "moejax_ms", ".1f"),
    ("hf ms/step", "hf_ms", ".1f"),
    ("moejax tokens/s", "moejax_tokens_per_s", ",.0f"),
    ("hf tokens/s", "hf_tokens_per_s", ",.0f"),
    ("moejax/hf", "moejax_over_hf", ".2f"),
  ]
  return markdown_table(rows, columns, header)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  p.add_argument("--configs", default=DEFAULT_CONFIGS, help="comma-separated FILE:ARG configs")
  p.add_argument(
    "--set",
    action="append",
    default=[],
    metavar="FIELD=VALUE",
    help="config override applied to every config, e.g. model.num_layers=1 (repeatable)",
  )
  p.add_argument(
    "--repeats", type=int, default=9, help="timed steps (turns); the median is reported"
  )
  p.add_argument("--warmup", type=int, default=2, help="untimed steps after the first")
  p.add_argument(
    "--lead", type=int, default=1, help="untimed steps before each timed one, in every turn"
  )
  p.add_argument("--batch-size", type=int, default=None, help="sequences per step (all configs)")
  p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (all configs)")
  p.add_argument(
    "--max-tokens",
    type=int,
    default=4096,
    help="without --batch-size, shrink a config's batch to at most this many tokens (0: never)",
  )
  p.add_argument("--skip-hf", action="store_true", help="no PyTorch / transformers column")
  p.add_argument("--hf-attention", default="sdpa", choices=HF_ATTENTION)
  p.add_argument(
    "--hf-experts", default=None, choices=HF_EXPERTS, help="default: transformers' choice"
  )
  p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
  p.add_argument("--seed", type=int, default=0, help="seed of the random token batches")
  p.add_argument("--out", default=None, help="write the rows as a JSON list to this file")
  return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
  args = parse_args(argv)
  # Freed buffers are reused across steps, for JAX and PyTorch alike (see moejax/hostmem.py).
  host_memory = "retained" if hostmem.retain_host_memory() else "glibc default"
  threads = args.threads or cpu_count()
  timing = dict(repeats=args.repeats, warmup=args.warmup, lead=args.lead)

  versions = f"jax {jax.__version__}, flax {flax.__version__}"
  versions_note = f"; host memory {host_memory}"
  if not args.skip_hf:
    import torch
    import transformers

    versions += f", torch {torch.__version__}, transformers {transformers.__version__}"
  devices = jax.devices()

  rows, hf_impl = [], None
  for spec in filter(None, args.configs.split(",")):
    config = load_config(spec)
    apply_overrides(config, args.set)
    config_batch = int(config.train.batch_size)
    b, s, reduced = step_shapes(config, args.batch_size, args.seq_len, args.max_tokens)
    config.train.batch_size, config.train.seq_len = b, s
    model_config = build_model_config(config, tokenizer_vocab_size(config))
    batches = random_batches(
      model_config.vocab_size, b, s, 1 + args.warmup + (1 + args.lead) * args.repeats, args.seed
    )

    runners = {"moejax": moejax_runner(config, model_config, batches)}
    if not args.skip_hf:
      runners["hf"] = hf_runner(
        config, model_config, batches, attention=args.hf_attention, experts=args.hf_experts
      )
    # The two step in turns (see time_interleaved); torch's thread count does not touch XLA's.
    with torch_threads(threads) if not args.skip_hf else contextlib.nullcontext():
      ms = time_interleaved({name: run for name, (run, _) in runners.items()}, **timing)
    moejax = {"ms": ms["moejax"], **runners["moejax"][1]()}
    hf = {} if args.skip_hf else {"ms": ms["hf"], **runners["hf"][1]()}
    if hf:
      hf_impl = (hf["attention"], hf["experts"])
    for name, value in ms.items():
      print(f"{spec}: {name} {value:.1f} ms/step", file=sys.stderr, flush=True)

    tokens = b * s
    moejax_tps = tokens / moejax["ms"] * 1e3
    hf_tps = tokens / hf["ms"] * 1e3 if hf else None
    rows.append(
      {
        "config": spec.rsplit("/", 1)[-1].replace(".py:", ":"),
        "config_spec": spec,
        "batch": b,
        "seq_len": s,
        "config_batch_size": config_batch,
        "batch_reduced": reduced,
        "batch_label": f"{b} (of {config_batch})" if reduced else str(b),
        "tokens_per_step": tokens,
        "model": describe(model_config),
        "vocab_size": model_config.vocab_size,
        "moejax_params": moejax["params"],
        "hf_params": hf.get("params"),
        "moejax_ms": moejax["ms"],
        "hf_ms": hf.get("ms"),
        "moejax_tokens_per_s": moejax_tps,
        "hf_tokens_per_s": hf_tps,
        "moejax_over_hf": None if hf_tps is None else moejax_tps / hf_tps,
        "moejax_lm_loss": moejax["loss"],
        "hf_lm_loss": hf.get("loss"),
        "hf_attention": hf.get("attention"),
        "hf_experts": hf.get("experts"),
        "hf_router_aux_loss_coef": None if not hf else hf_aux_loss_coef(model_config),
        "overrides": list(args.set),
        "dtype": "float32",
        "threads": threads,
        "host_memory": host_memory,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "lead": args.lead,
        "platform": devices[0].platform,
        "versions": versions,
      }
    )

  hf_desc = "hf skipped"
  if hf_impl is not None:
    hf_desc = (
      f"hf MixtralForCausalLM attn_implementation={hf_impl[0]}, experts_implementation="
      f"{hf_impl[1]}, torch.optim.AdamW + clip_grad_norm_"
    )
  header = (
    f"Training step (fwd + bwd + clip + AdamW), float32, random tokens; {devices[0].platform} "
    f"x{len(devices)} ({cpu_name()}); {versions}{versions_note}; threads: XLA:CPU {cpu_count()} cores, "
    f"torch.set_num_threads({threads}); moejax Trainer.train_step (jit, donated state); {hf_desc}; "
    f"median of {args.repeats} steps each, the two taking turns of {args.lead} untimed + 1 timed "
    f"step, after the first + {args.warmup} warm-up steps; "
    f"moejax/hf = ratio of tokens/s"
  )
  print(format_table(rows, header))
  write_rows(args.out, rows)
  return rows


if __name__ == "__main__":
  main()

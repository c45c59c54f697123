"""The training loop: `train_and_evaluate(config, workdir)`.

    data (grain) -> jitted train step (donated state) on the mesh -> metrics (JSONL, TensorBoard,
    progress bar) -> orbax checkpoints (atomic, resumable) -> periodic evaluation -> plots

The model is split once into a static graph and three pytrees: trainable `params` (nnx.Param), the
other state `rest` (the aux-loss-free routing bias, router-noise RNG counters) and the optimizer
state. The step is a pure function of those and the batch, so it jits with donation and shards by
the parameters' logical axes. Rerunning the same command resumes from the latest checkpoint, data
iterator position and RNG included, and reproduces an uninterrupted run step for step.

Micro-batches (`config.train.microbatches = M`, gradient accumulation). The batch's rows are cut
into M consecutive micro-batches; one jitted call computes each micro-batch's gradient and a second
sums them, token-weighted, and applies the optimizer. The LM loss and its gradient are the whole
batch's exactly; the MoE auxiliary losses are each micro-batch's, weighted by its tokens (as in
Megatron-Core: the load-balance statistics are per micro-batch). Expert counts, the aux-loss-free
bias update and the load metrics are the whole batch's (each aux key merges as `moejax.moe.stats`
declares it). Each micro-batch draws its own router noise
(its index folded into every RNG key). On one CPU device the micro-batches run concurrently on host
threads: XLA:CPU runs one program's chain of small ops on one core at a time, and two programs
fill both (the Mixtral tiny step on 2 cores: ~230 -> ~207 ms with M = 2). While they run, the
host grouped matmuls split each call over the cores per micro-batch only (`moejax.kernels.limit_host_threads`):
a program in flight already keeps its core busy (a further 234 -> 212 ms). Elsewhere they run one
after the other.
"""

from __future__ import annotations

import contextlib
import math
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from moejax import sharding, surgery
from moejax.data import DataConfig, build_datasets
from moejax.kernels import host_threads, limit_host_threads
from moejax.models import ModelConfig, Transformer, lm_loss
from moejax.moe import stats
from moejax.train import plots
from moejax.train.checkpoint import Checkpointer
from moejax.train.metrics import MetricsWriter
from moejax.train.optimizer import make_optimizer
from moejax.train.run_info import write_run_info


def rules_from_config(config: ml_collections.ConfigDict) -> dict:
  """The logical axis rules of a run: LOGICAL_RULES with `config.parallel.expert_axes`."""
  parallel = config.get("parallel") or {}
  return sharding.logical_rules(parallel.get("expert_axes"))


def init_from(config: ml_collections.ConfigDict) -> str | None:
  """`config.train.init_from` (see `moejax.surgery`), or `hf:DIR` for the older `init_from_hf`."""
  t = config.train
  spec, hf = t.get("init_from"), t.get("init_from_hf")
  if spec and hf:
    raise ValueError(
      f"config.train.init_from={spec!r} and init_from_hf={hf!r} are both set; set one "
      "(init_from=hf:DIR is the same as init_from_hf=DIR)"
    )
  return f"hf:{hf}" if hf else spec or None


def build_model_config(config: ml_collections.ConfigDict, vocab_size: int) -> ModelConfig:
  """ModelConfig from `config.model`, the vocabulary taken from the tokenizer when unset; from the
  checkpoint's config.json when the run starts from a Hugging Face checkpoint
  (`config.train.init_from=hf:DIR`)."""
  spec = init_from(config)
  kind, hf_path = surgery.init_kind(spec) if spec else (None, None)
  if kind == "hf":
    from moejax.interop import config_from_hf
    from moejax.interop.hf import read_config

    model_config = config_from_hf(read_config(Path(hf_path)), dtype=config.model.param_dtype)
    if model_config.vocab_size < vocab_size:
      raise ValueError(
        f"config.train.init_from={spec!r}: the checkpoint's vocab_size "
        f"{model_config.vocab_size} is smaller than the tokenizer's {vocab_size}"
      )
    return model_config
  model = config.model.copy_and_resolve_references()
  if model.vocab_size is None:
    model.vocab_size = vocab_size
  elif model.vocab_size < vocab_size:
    raise ValueError(
      f"config.model.vocab_size={model.vocab_size} is smaller than the tokenizer's {vocab_size}"
    )
  return ModelConfig.from_config(model)


def _microbatches(train: ml_collections.ConfigDict, processes: int, mesh) -> int:
  """`train.microbatches`, checked against the batch: every process cuts its rows evenly, and the
  mesh's batch shards split every micro-batch evenly."""
  m = train.get("microbatches", 1)
  if isinstance(m, bool) or not isinstance(m, int) or m < 1:
    raise ValueError(f"config.train.microbatches={m!r}; allowed: an int >= 1")
  local = train.batch_size // max(processes, 1)
  if local % m:
    raise ValueError(
      f"config.train.microbatches={m} must divide the batch_size={train.batch_size} rows "
      f"({local} per process over {processes} processes)"
    )
  axes = sharding.mesh_axes_of("batch", sharding.LOGICAL_RULES)
  shards = math.prod(mesh.shape[a] for a in axes)
  rows = train.batch_size // m
  if m > 1 and rows % shards:
    raise ValueError(
      f"config.train.microbatches={m} leaves micro-batches of {rows} rows, which the mesh's "
      f"{shards} batch shards ({' x '.join(axes)}) cannot split evenly; allowed: a value that "
      f"leaves a multiple of {shards} rows"
    )
  return m


def _is_var(x) -> bool:
  return isinstance(x, nnx.Variable)


def _fold_rng_keys(rest, index):
  """`rest` with `index` folded into every RNG key (of any batch shape)."""

  def fold(v):
    if not isinstance(v, nnx.RngKey):
      return v
    f = lambda key: jax.random.fold_in(key, index)
    for _ in range(v[...].ndim):
      f = jax.vmap(f)
    return v.replace(f(v[...]))

  return jax.tree.map(fold, rest, is_leaf=_is_var)


def _to_host(tree) -> Any:
  return jax.tree.map(np.asarray, jax.device_get(tree))


class Trainer:
  """Owns the model graph, the jitted steps and the shardings of one run."""

  def __init__(self, config: ml_collections.ConfigDict, model_config: ModelConfig, mesh):
    self.config = config
    self.model_config = model_config
    self.mesh = mesh
    self.rules = rules_from_config(config)
    self.tx, self.schedule = make_optimizer(config.train)
    seed = int(config.train.seed)

    def create():
      model = Transformer(model_config, rngs=nnx.Rngs(params=seed, jitter=seed + 1))
      model.train()
      return model

    abstract = nnx.eval_shape(create)
    self.graphdef, abs_params, abs_rest = nnx.split(abstract, nnx.Param, ...)
    abstract.eval()  # the eval graph differs only in its static `deterministic` flags
    self.eval_graphdef = nnx.graphdef(abstract)

    self.param_shardings = sharding.state_shardings(abs_params, mesh, self.rules)
    self.rest_shardings = sharding.state_shardings(abs_rest, mesh, self.rules)

    def init():
      _, params, rest = nnx.split(create(), nnx.Param, ...)
      return params, rest, self.tx.init(params)

    abs_opt = jax.eval_shape(lambda: init()[2])
    # Optimizer moments shard like their parameters (matched by tree position, not by shape);
    # everything else in the optimizer state (step counts) is replicated.
    self.opt_shardings = optax.tree_map_params(
      self.tx,
      lambda _, param_sharding: param_sharding,
      abs_opt,
      self.param_shardings,
      transform_non_params=lambda _: sharding.replicated(mesh),
      is_leaf=_is_var,
    )
    self._init = jax.jit(
      init, out_shardings=(self.param_shardings, self.rest_shardings, self.opt_shardings)
    )
    # Metrics come back replicated: on a multi-host mesh a host can only read what it holds.
    rep = sharding.replicated(mesh)
    state_shardings = (self.param_shardings, self.rest_shardings, self.opt_shardings, rep)
    self.microbatches = _microbatches(config.train, jax.process_count(), mesh)
    self._pool, self._warm = None, False
    if self.microbatches == 1:
      self._train_step = jax.jit(
        self._step, donate_argnums=(0, 1, 2), out_shardings=state_shardings
      )
    else:
      self._micro_step = jax.jit(self._micro)
      self._apply_step = jax.jit(self._apply, donate_argnums=(0, 2), out_shardings=state_shardings)
      if mesh.size == 1 and mesh.devices.flat[0].platform == "cpu":
        self._pool = ThreadPoolExecutor(self.microbatches, thread_name_prefix="moejax-microbatch")
    self._eval_step = jax.jit(self._eval, out_shardings=rep)

  def context(self) -> contextlib.ExitStack:
    """The mesh and logical rules that the model reads while it is traced (expert parallelism)."""
    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(self.mesh))
    stack.enter_context(sharding.use_rules(self.rules))
    return stack

  def init(self):
    with self.context():
      return self._init()

  def init_from(self, spec: str, params, rest):
    """(params, rest, opt_state) starting from `spec` (`moejax.surgery`: hf:DIR, run:DIR, DIR or
    module:function): its parameters and aux-loss-free biases, this run's router-noise RNG state,
    a fresh optimizer state."""
    model = nnx.merge(self.graphdef, params, rest)
    values = surgery.initial_values(spec, self.model_config, surgery.canonical(model))
    surgery.fill(model, values)
    _, params, rest = nnx.split(model, nnx.Param, ...)
    params = jax.device_put(params, self.param_shardings)
    rest = jax.device_put(rest, self.rest_shardings)
    with self.context():
      opt_state = jax.jit(self.tx.init, out_shardings=self.opt_shardings)(params)
    return params, rest, opt_state

  def _grads(self, params, rest, batch):
    """(grads, loss, num_tokens, aux, new_rest) of one batch: the gradient of its mean token loss
    plus the MoE auxiliary losses."""
    graphdef = self.graphdef

    def loss_fn(params):
      # The router-noise RNG counters in `rest` are mutated inside the grad trace, which needs
      # Variables created at that trace level: rebuild them here (tree.map makes new ones).
      model = nnx.merge(graphdef, params, jax.tree.map(lambda x: x, rest))
      logits, aux = model(batch["inputs"], token_mask=batch["mask"])
      loss, num_tokens = lm_loss(logits, batch["targets"], batch["mask"])
      new_rest = nnx.state(model, nnx.Not(nnx.Param))
      return loss + aux["aux_loss"], (loss, num_tokens, aux, new_rest)

    grads, (loss, num_tokens, aux, new_rest) = jax.grad(loss_fn, has_aux=True)(params)
    return grads, loss, num_tokens, aux, new_rest

  def _step(self, params, rest, opt_state, batch):
    grads, loss, num_tokens, aux, new_rest = self._grads(params, rest, batch)
    return self._update(params, new_rest, opt_state, grads, loss, num_tokens, aux)

  def _micro(self, params, rest, batch, index):
    """One micro-batch's (grads, loss, num_tokens, aux, new_rest); its router noise comes from
    every RNG key with `index` folded in, and `new_rest` keeps the unfolded keys (the counters
    advance alike in every micro-batch)."""
    grads, loss, num_tokens, aux, new_rest = self._grads(params, _fold_rng_keys(rest, index), batch)
    new_rest = jax.tree.map(
      lambda new, old: old if isinstance(old, nnx.RngKey) else new, new_rest, rest, is_leaf=_is_var
    )
    return grads, loss, num_tokens, aux, new_rest

  def _apply(self, params, rest, opt_state, micro):
    """Sums the micro-batches' (grads, loss, num_tokens, aux), token-weighted, and steps."""
    weights = [m[2] for m in micro]  # tokens of each micro-batch
    total = sum(weights)
    share = [w / jnp.maximum(total, 1.0) for w in weights]
    mean = lambda *xs: sum(p * x for p, x in zip(share, xs, strict=True))
    grads = jax.tree.map(mean, *[m[0] for m in micro])
    loss = mean(*[m[1] for m in micro])
    # Each aux key merges as moejax.moe.stats declares it (token-weighted mean, sum, or recomputed
    # from the merged expert counts); an undeclared key fails here.
    aux = stats.merge_microbatches([m[3] for m in micro], share)
    return self._update(params, rest, opt_state, grads, loss, total, aux)

  def _update(self, params, rest, opt_state, grads, loss, num_tokens, aux):
    """The optimizer step, the aux-loss-free bias step and the step's metrics."""
    graphdef = self.graphdef
    updates, opt_state = self.tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    # The aux-loss-free bias moves by its own rule, outside the optimizer (DeepSeek-V3).
    model = nnx.merge(graphdef, params, rest)
    model.update_aux_free_bias(aux["expert_counts"])
    rest = nnx.state(model, nnx.Not(nnx.Param))
    counts = aux["expert_counts"]  # [L_moe, E_max]; row l zero-padded past its E_l experts
    load = aux.get("device_load", jnp.zeros((0, 1)))  # [L_moe, devices]
    metrics = {
      "loss": loss,
      "grad_norm": optax.tree.norm(grads),
      "num_tokens": num_tokens,
      "dropped_fraction": jnp.mean(aux["dropped_fraction"]) if counts.shape[0] else 0.0,
      "expert_load": aux["expert_load"],
      "load_imbalance": stats.load_imbalance(counts, self.model_config.moe_num_experts),
      # Expert parallelism: token copies each device computes, max/mean of that, and the bytes a
      # device sends through all_to_all in the forward and backward passes of all MoE layers.
      "device_load": load,
      "device_imbalance": jnp.max(load, axis=-1) / jnp.maximum(jnp.mean(load, axis=-1), 1e-9),
      "a2a_bytes": 2.0 * jnp.sum(aux.get("a2a_bytes", jnp.zeros((0,)))),
      **{k: aux[k] for k in stats.SCALARS if k in aux},
    }
    return params, rest, opt_state, metrics

  def _eval(self, params, rest, batch):
    model = nnx.merge(self.eval_graphdef, params, rest)
    logits, _ = model(batch["inputs"], token_mask=batch["mask"])
    loss, num_tokens = lm_loss(logits, batch["targets"], batch["mask"])
    return loss * num_tokens, num_tokens

  def put_batch(self, batch: dict, part: int = 0, parts: int = 1) -> dict:
    """Host batch (this process's rows) -> a global array sharded over the data axes; with
    `parts` > 1, only the `part`-th of `parts` consecutive slices of the rows."""
    out = {}
    for k in ("inputs", "targets", "mask"):
      local = np.asarray(batch[k])
      rows = local.shape[0] // parts
      local = local[part * rows : (part + 1) * rows]
      out[k] = jax.make_array_from_process_local_data(
        sharding.batch_sharding(self.mesh, local.ndim), local
      )
    return out

  def train_step(self, params, rest, opt_state, batch):
    with self.context():
      if self.microbatches == 1:
        return self._train_step(params, rest, opt_state, self.put_batch(batch))
      m = self.microbatches

      def micro(i):
        with self.context():  # the mesh and rules are thread-local
          out = self._micro_step(params, rest, self.put_batch(batch, i, m), np.int32(i))
          # A worker waits for its result, so that the micro-batches run side by side.
          return jax.block_until_ready(out) if self._pool is not None else out

      if self._pool is None:
        results = [micro(i) for i in range(m)]
      else:
        # Each program in flight keeps a core busy: the host grouped matmuls split a call over
        # the cores left to it, not over all of them (see `moejax.kernels.limit_host_threads`). The sequential
        # first call does the same, so that it computes what the threaded ones do, bit for bit.
        with limit_host_threads(max(1, host_threads() // m)):
          if not self._warm:  # the first call compiles, once
            results = [micro(i) for i in range(m)]
            self._warm = True
          else:
            results = [f.result() for f in [self._pool.submit(micro, i) for i in range(m)]]
      # Every micro-batch advances the RNG counters alike: the first one's `rest` is the step's.
      rest = results[0][4]
      return self._apply_step(params, rest, opt_state, [r[:4] for r in results])

  def evaluate(self, params, rest, batches) -> float:
    # Sums stay on device; one transfer at the end instead of a sync per batch.
    total, count = 0.0, 0.0
    for batch in batches:
      with self.context():
        loss_sum, n = self._eval_step(params, rest, self.put_batch(batch))
      total, count = total + loss_sum, count + n
    return float(total) / max(float(count), 1.0)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
  """Trains `config` in `workdir`, resuming from its latest checkpoint; returns final metrics."""
  t = config.train
  # Everything that can be wrong with the config fails here, before the workdir is touched.
  data_config = DataConfig.from_config(
    config.data, seq_len=t.seq_len, batch_size=t.batch_size, seed=t.seed
  )
  datasets = build_datasets(data_config)
  model_config = build_model_config(config, datasets.vocab_size)
  mesh = sharding.make_mesh(config.mesh)

  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  if jax.process_index() == 0:
    write_run_info(workdir, config)
  trainer = Trainer(config, model_config, mesh)

  checkpointer = Checkpointer(workdir, keep=t.keep_checkpoints)
  train_iter = datasets.train_iter()
  params, rest, opt_state = trainer.init()
  start_step = checkpointer.latest_step() or 0
  if not start_step and init_from(config):
    params, rest, opt_state = trainer.init_from(init_from(config), params, rest)
  if start_step:
    (params, rest, opt_state), data_state = checkpointer.restore(
      start_step, (params, rest, opt_state)
    )
    train_iter.set_state(data_state)
  val_batches = list(datasets.val_batches(t.eval_batches))

  final: dict = {}
  with MetricsWriter(
    workdir, total_steps=t.steps, start_step=start_step, progress_bar=t.progress_bar
  ) as writer:
    if start_step == 0:
      eval_loss = trainer.evaluate(params, rest, val_batches)
      first = {"eval_loss": eval_loss, "eval_perplexity": float(np.exp(eval_loss))}
      if len(set(model_config.moe_num_experts)) > 1:
        # Rows of expert_load are zero-padded past each layer's experts: the plots read E_l here.
        first["moe_num_experts"] = list(model_config.moe_num_experts)
      writer.write(0, first)
    tick, tokens = time.perf_counter(), 0
    for step in range(start_step + 1, t.steps + 1):
      batch = next(train_iter)
      params, rest, opt_state, metrics = trainer.train_step(params, rest, opt_state, batch)
      tokens += int(np.asarray(batch["mask"]).sum()) * jax.process_count()
      if step % t.log_every == 0 or step == t.steps:
        m = _to_host(metrics)
        now = time.perf_counter()
        m["tokens_per_s"] = tokens / max(now - tick, 1e-9)
        m["learning_rate"] = float(trainer.schedule(step - 1))
        m["perplexity"] = float(np.exp(m["loss"]))
        tick, tokens = now, 0
        writer.write(step, m)
        writer.update(
          step, {"loss": f"{float(m['loss']):.3f}", "tok/s": f"{m['tokens_per_s']:.0f}"}
        )
        final.update(loss=float(m["loss"]))
      else:
        writer.update(step, None)
      if step % t.eval_every == 0 or step == t.steps:
        eval_loss = trainer.evaluate(params, rest, val_batches)
        writer.write(step, {"eval_loss": eval_loss, "eval_perplexity": float(np.exp(eval_loss))})
        final.update(eval_loss=eval_loss)
      if step % t.checkpoint_every == 0 or step == t.steps:
        checkpointer.save(step, (params, rest, opt_state), train_iter.get_state())
  checkpointer.close()
  if t.plots and jax.process_index() == 0:
    plots.plot_run(workdir)
  return final


def load_run(workdir: str | Path, step: int | None = None):
  """(model, model_config, tokenizer) of a training run's checkpoint (default: its latest).

  Reads `workdir/config.json` (written by `train_and_evaluate`), rebuilds the model on one device
  and restores its parameters and state; the optimizer state is read only to match the checkpoint's
  structure. The model is in eval mode.
  """
  import json

  from moejax.data import make_tokenizer

  workdir = Path(workdir)
  config_path = workdir / "config.json"
  if not config_path.is_file():
    raise FileNotFoundError(f"{config_path} not found: is {workdir} a moejax training workdir?")
  config = ml_collections.ConfigDict(json.loads(config_path.read_text()))
  t = config.train
  data_config = DataConfig.from_config(
    config.data, seq_len=t.seq_len, batch_size=t.batch_size, seed=t.seed
  )
  tokenizer = make_tokenizer(data_config)
  model_config = build_model_config(config, tokenizer.vocab_size)
  mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
  trainer = Trainer(config, model_config, mesh)
  checkpointer = Checkpointer(workdir)
  step = checkpointer.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {workdir / 'checkpoints'}")
  with trainer.context():
    abstract = jax.eval_shape(trainer._init)
  (params, rest, _), _ = checkpointer.restore(step, abstract)
  checkpointer.close()
  model = nnx.merge(trainer.eval_graphdef, params, rest)
  return model, model_config, tokenizer

"""A decoder-only transformer language model whose FFNs are dense or Mixture-of-Experts layers.

    model = Transformer(ModelConfig(vocab_size=256, d_model=64, num_layers=4, num_heads=4,
                                    dense_hidden_dim=128, moe=MoEConfig(...)), rngs=nnx.Rngs(0))
    logits, aux = model(tokens)          # tokens [B, S] -> logits [B, S, V] float32
    loss, n = lm_loss(logits[:, :-1], tokens[:, 1:])
    loss = loss + aux["aux_loss"]

Each block is pre-norm (Xiong et al. 2020), as in Llama and Mixtral (Jiang et al. 2024):

    x = x + Attention(RMSNorm(x))               causal GQA with RoPE (attention.py), or multi-head
                                                latent attention (mla.py) when config.attention="mla"
    x = x + FFN(RMSNorm(x))                     dense SwiGLU, or the MoE layer (moejax.moe.MoE)

then a final RMSNorm (Zhang & Sennrich 2019) and the output projection (the token embedding when
`tie_embeddings`). Which layers are MoE is `ModelConfig.is_moe_layer` (DeepSeek's layer pattern).

Layer stacking. Unscanned, the blocks are a list `blocks.{i}`. With `scan_layers`, the stack is split
so that its repeating part compiles once, whatever the depth:

    prefix_blocks.{i}      the first_k_dense dense layers, a plain list
    scanned_blocks.{j}     one period of moe_every layers (j = 0 is the MoE layer), each parameter
                           stacked over U = (L - first_k_dense) // moe_every periods and run by
                           `nnx.scan`; its logical axes gain a leading "layers"
    suffix_blocks.{r}      the remaining (L - first_k_dense) % moe_every layers, a plain list

A dense model scans all L layers as periods of one. Layer i = first_k_dense + u * moe_every + j sits at
`scanned_blocks.{j}` index [u]. `unstack_layers` / `stack_layers` convert a state between the layouts
(e.g. to import a checkpoint into the unscanned layout and stack it).

KV cache (decoding):

    cache = model.init_cache(batch_size, max_len)       # a pytree of arrays; jit-friendly
    logits, aux, cache = model(prompt, token_mask=mask, positions=pos, cache=cache)    # prefill
    logits, aux, cache = model(next_tokens[:, None], positions=pos[:, -1:] + 1, cache=cache)

    cache = {"index": int32 [] (slots filled so far), "valid": bool [B, max_len] (slot holds a real
             token), "layers": per attention layer, in the layer layout:
                unscanned: [entry of block i]
                scanned:   {"prefix": [entry], "scanned": [entry of period position j, each array
                            with a leading U axis], "suffix": [entry]}}
    entry  = {"k", "v": [B, max_len, H_kv, A]} (GQA; k after RoPE)
           | {"c_kv": [B, max_len, R_kv], "k_pe": [B, max_len, A_rope]} (MLA; see mla.py)

A call with S tokens writes slots index..index+S-1, marks them valid where token_mask is 1, and lets
query s see slot t iff valid[t] and t <= index + s. Left-padded batches thus need only token_mask and
positions counting real tokens; the logits of real tokens equal a full forward's.

Parameter paths (unscanned; A = head_dim, F = dense_hidden_dim):

    embed.embedding [V, D]                  lm_head.kernel [D, V] (untied only)     final_norm.scale [D]
    blocks.{i}.attn_norm.scale [D]          blocks.{i}.attn.{q,k,v,o}_proj.kernel (see attention.py;
                                            MLA's q_a_proj, kv_a_proj, kv_b_proj, ...: see mla.py)
    blocks.{i}.ffn_norm.scale [D]
    blocks.{i}.mlp.w_gate, .w_up [D, F], .w_down [F, D]       dense layers (w_gate: gated only)
    blocks.{i}.moe.router.kernel ..., blocks.{i}.moe.experts.w_up ...   MoE layers (see moejax.moe.layer)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.models.attention import Attention, Projection, cache_attention_mask
from moejax.models.config import ModelConfig
from moejax.models.mla import MLA
from moejax.models.norm import RMSNorm
from moejax.moe import losses
from moejax.moe.experts import dense_ffn, dense_init
from moejax.moe.layer import MoE

# Logical axis of the stacked layer dimension of scanned parameters (replicated by sharding rules).
LAYERS_AXIS = "layers"
# Tells nnx.vmap to prepend that axis to each stacked variable's `logical_axes`.
_SCAN_METADATA = {nnx.PARTITION_NAME: None, "logical_axes": LAYERS_AXIS}
# The three MoE losses that enter aux["aux_loss"], with the ModelConfig field of their coefficient.
_LOSS_COEFS = {
  "load_balance_loss": "load_balance_coef",
  "seq_balance_loss": "seq_balance_coef",
  "router_z_loss": "z_loss_coef",
}


class DenseFFN(nnx.Module):
  """A dense FFN (SwiGLU by default; Shazeer 2020): `w_gate`, `w_up` [D, F], `w_down` [F, D]."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    c = config
    d, f = c.d_model, c.dense_hidden_dim
    param = lambda shape, axes: nnx.Param(
      dense_init(rngs.params(), shape, c.param_dtype), logical_axes=axes
    )
    gated = c.activation in ("swiglu", "geglu")
    self.w_gate = param((d, f), ("embed", "mlp")) if gated else None
    self.w_up = param((d, f), ("embed", "mlp"))
    self.w_down = param((f, d), ("mlp", "embed"))
    self.activation = c.activation
    self.dtype = c.dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    """x [..., D] -> [..., D], computed on the flattened tokens [N, D] (2-D matmuls are faster on
    XLA:CPU; see attention.Projection)."""
    cast = lambda w: None if w is None else w[...].astype(self.dtype)
    y = dense_ffn(
      x.astype(self.dtype).reshape(-1, x.shape[-1]),
      cast(self.w_gate),
      cast(self.w_up),
      cast(self.w_down),
      activation=self.activation,
    )
    return y.reshape(x.shape)


class Block(nnx.Module):
  """One pre-norm transformer block; its FFN is `moe` (an MoE layer) or `mlp` (dense)."""

  def __init__(self, config: ModelConfig, *, use_moe: bool, rngs: nnx.Rngs):
    c = config
    norm = lambda: RMSNorm(c.d_model, eps=c.norm_eps, dtype=c.dtype, param_dtype=c.param_dtype)
    self.attn_norm = norm()
    if c.attention == "mla":
      self.attn = MLA(c, rngs=rngs)
    else:
      self.attn = Attention(
        c.d_model,
        c.num_heads,
        c.resolved_num_kv_heads,
        c.resolved_head_dim,
        rope_theta=c.rope_theta,
        rope_scaling=c.rope_scaling,
        rope_interleave=c.rope_interleave,
        qkv_bias=c.qkv_bias,
        qk_norm=c.qk_norm,
        clip_qkv=c.clip_qkv,
        norm_eps=c.norm_eps,
        dtype=c.dtype,
        param_dtype=c.param_dtype,
        rngs=rngs,
      )
    self.ffn_norm = norm()
    self.moe = MoE(c.moe, rngs=rngs) if use_moe else None
    self.mlp = None if use_moe else DenseFFN(c, rngs=rngs)

  def __call__(
    self,
    x: jax.Array,
    positions: jax.Array | None,
    segment_ids: jax.Array | None,
    token_mask: jax.Array | None,
    cache: dict[str, jax.Array] | None = None,
    cache_index: jax.Array | None = None,
    cache_mask: jax.Array | None = None,
  ):
    """x [B, S, D] -> (x [B, S, D], the MoE layer's aux or None for a dense block).

    With `cache` (this layer's entry; `cache_index`, `cache_mask` as in attention.py) it returns
    (x, aux, the updated entry).
    """
    with jax.named_scope("attention"):
      h = self.attn_norm(x)
      if cache is None:
        y = self.attn(h, positions=positions, segment_ids=segment_ids)
      else:
        y, cache = self.attn(
          h, positions=positions, cache=cache, cache_index=cache_index, cache_mask=cache_mask
        )
      x = x + y
    h = self.ffn_norm(x)
    if self.moe is None:
      with jax.named_scope("mlp"):
        x, aux = x + self.mlp(h), None
    else:
      with jax.named_scope("moe"):
        y, aux = self.moe(h, token_mask=token_mask)
      x = x + y.astype(x.dtype)
    return (x, aux) if cache is None else (x, aux, cache)


def layer_layout(config: ModelConfig) -> tuple[int, int, int, int]:
  """(prefix, period, units, suffix) of the scanned stack: L = prefix + period * units + suffix."""
  if config.moe is None:
    return 0, 1, config.num_layers, 0
  prefix, period = config.first_k_dense, config.moe_every
  units, suffix = divmod(config.num_layers - prefix, period)
  return prefix, period, units, suffix


class Transformer(nnx.Module):
  """Decoder-only LM: embed -> L blocks -> RMSNorm -> logits. See the module docstring."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    c = self.config = config
    v, d = c.vocab_size, c.d_model
    # Std 1/sqrt(D): tied output logits start at unit scale (the final norm gives |h| = sqrt(D)).
    self.embed = nnx.Embed(
      v,
      d,
      dtype=c.dtype,
      param_dtype=c.param_dtype,
      embedding_init=nnx.initializers.normal(stddev=d**-0.5),
      rngs=rngs,
    )
    self.embed.embedding.set_metadata(logical_axes=("vocab", "embed"))
    if c.scan_layers:
      prefix, period, units, suffix = layer_layout(c)
      make = lambda i, r: Block(c, use_moe=c.is_moe_layer(i), rngs=r)
      self.prefix_blocks = nnx.List([make(i, rngs) for i in range(prefix)])

      @nnx.split_rngs(splits=units)
      @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata=_SCAN_METADATA)
      def make_unit(r: nnx.Rngs) -> nnx.List:
        return nnx.List([make(prefix + j, r) for j in range(period)])

      self.scanned_blocks = make_unit(rngs) if units else None
      first_suffix = prefix + period * units
      self.suffix_blocks = nnx.List([make(first_suffix + r, rngs) for r in range(suffix)])
    else:
      self.blocks = nnx.List(
        [Block(c, use_moe=c.is_moe_layer(i), rngs=rngs) for i in range(c.num_layers)]
      )
    self.final_norm = RMSNorm(d, eps=c.norm_eps, dtype=c.dtype, param_dtype=c.param_dtype)
    if c.tie_embeddings:
      self.lm_head = None
    else:
      self.lm_head = Projection(
        (d, v),
        ("embed", "vocab"),
        num_in=1,
        param_dtype=c.param_dtype,
        rngs=rngs,
      )

  def init_cache(self, batch_size: int, max_len: int, dtype=None) -> dict:
    """An empty KV cache for `batch_size` sequences of up to `max_len` tokens (see the module doc).

    {"index": int32 [] slots filled, "valid": bool [B, max_len] slots holding real tokens, "layers":
    one entry per attention layer in the model's layer layout}; arrays in `dtype` (default: the
    activation dtype). Traceable: call it inside jit with static sizes.
    """
    c = self.config
    dtype = c.dtype if dtype is None else jnp.dtype(dtype)
    entry = lambda block: block.attn.init_cache(batch_size, max_len, dtype)
    if c.scan_layers:
      units = layer_layout(c)[2]
      stack = lambda tree: jax.tree.map(lambda a: jnp.zeros((units, *a.shape), a.dtype), tree)
      scanned = self.scanned_blocks or []
      layers = {
        "prefix": [entry(block) for block in self.prefix_blocks],
        "scanned": [stack(entry(block)) for block in scanned],
        "suffix": [entry(block) for block in self.suffix_blocks],
      }
    else:
      layers = [entry(block) for block in self.blocks]
    return {
      "index": jnp.zeros((), jnp.int32),
      "valid": jnp.zeros((batch_size, max_len), bool),
      "layers": layers,
    }

  def __call__(
    self,
    tokens: jax.Array,
    *,
    token_mask: jax.Array | None = None,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    cache: dict | None = None,
  ):
    """tokens [B, S] (int) -> (logits [B, S, V] float32, aux), or (logits, aux, cache) with `cache`.

    `token_mask` [B, S] (1 = real token) keeps padding out of the MoE losses and expert counts; it
    does not mask attention: with causal attention and right padding no real token sees padding, and
    packed or left-padded batches pass `segment_ids` [B, S] (see attention.attention_mask) and
    `positions` [B, S] (RoPE positions, default 0..S-1).

    With `cache` (from `init_cache`, or returned by the previous call) the tokens fill cache slots
    index..index+S-1 (index + S must not exceed max_len), `token_mask` also marks which of them hold
    real tokens (padding is never attended to), each token attends causally to the valid slots, and
    `positions` defaults to index + 0..S-1 (left-padded callers pass positions counting real tokens
    only); `segment_ids` is not supported. The returned cache has index + S.

    aux (L_moe = config.num_moe_layers; rows in layer order, config.moe_layers):
      aux_loss           scalar: sum over MoE layers of load_balance_coef * load_balance_loss
                         + seq_balance_coef * seq_balance_loss + z_loss_coef * router_z_loss
      load_balance_loss, seq_balance_loss, router_z_loss
                         scalars: each loss *averaged* over MoE layers (1.0 = uniform for the
                         balance losses), so aux_loss = L_moe * sum(coef * average)
      expert_counts      [L_moe, E] assignments per expert (input of `update_aux_free_bias`)
      expert_load        [L_moe, E] the same as fractions of each layer's assignments
      dropped_fraction, router_entropy, experts_per_token   [L_moe]
      device_load, native_device_load   [L_moe, devices] token copies each device computes (with
                         and without LLEP; one device outside a mesh; see moe.parallel)
      a2a_bytes          [L_moe] bytes a device sends through all_to_all in the forward pass
    A model without MoE layers gives zero scalars and arrays of shape [0, E] ([0, 0] for a dense
    model) / [0].
    """
    c = self.config
    b, s = tokens.shape
    x = self.embed(tokens)  # [B, S, D] in dtype
    cache_kw, layer_caches = None, None
    if cache is not None:
      if segment_ids is not None:
        raise ValueError("segment_ids cannot be combined with cache=; mark padding with token_mask")
      index = cache["index"]
      real = jnp.ones((b, s), bool) if token_mask is None else token_mask.astype(bool)
      valid = jax.lax.dynamic_update_slice(cache["valid"], real, (0, index))  # [B, T]
      cache_kw = dict(cache_index=index, cache_mask=cache_attention_mask(valid, index, s))
      if positions is None:
        positions = jnp.broadcast_to(index + jnp.arange(s), (b, s))
      layer_caches = cache["layers"]
    args = (positions, segment_ids, token_mask)
    layer_aux = []  # dicts of per-layer MoE aux, each with a leading layer axis
    if c.scan_layers:
      get = lambda key: None if layer_caches is None else layer_caches[key]
      x, prefix = _run_blocks(self.prefix_blocks, x, args, layer_aux, get("prefix"), cache_kw)
      scanned = None if layer_caches is None else []
      if self.scanned_blocks is not None:
        x, aux, scanned = _scan_blocks(self.scanned_blocks, x, args, get("scanned"), cache_kw)
        if aux is not None:
          layer_aux.append(aux)  # [U, ...]
      x, suffix = _run_blocks(self.suffix_blocks, x, args, layer_aux, get("suffix"), cache_kw)
      new_layers = {"prefix": prefix, "scanned": scanned, "suffix": suffix}
    else:
      x, new_layers = _run_blocks(self.blocks, x, args, layer_aux, layer_caches, cache_kw)
    h = self.final_norm(x).reshape(-1, c.d_model)  # [B*S, D]: one 2-D matmul
    with jax.named_scope("logits"):
      if self.lm_head is None:
        table = self.embed.embedding[...].astype(c.dtype)  # [V, D]
        logits = jnp.einsum("nd,vd->nv", h, table, preferred_element_type=jnp.float32)
      else:
        w = self.lm_head.kernel[...].astype(c.dtype)  # [D, V]
        logits = jnp.einsum("nd,dv->nv", h, w, preferred_element_type=jnp.float32)
      logits = logits.reshape(*tokens.shape, -1)  # [B, S, V]
    logits, aux = logits.astype(jnp.float32), self._summarise_aux(layer_aux)
    if cache is None:
      return logits, aux
    return logits, aux, {"index": index + s, "valid": valid, "layers": new_layers}

  def _summarise_aux(self, layer_aux: list[dict[str, jax.Array]]) -> dict[str, jax.Array]:
    c = self.config
    if not layer_aux:
      e = 0 if c.moe is None else c.moe.num_experts
      zero = jnp.zeros((), jnp.float32)
      out = {"aux_loss": zero, **{k: zero for k in _LOSS_COEFS}}
      out |= {k: jnp.zeros((0, e), jnp.float32) for k in ("expert_counts", "expert_load")}
      out |= {
        k: jnp.zeros((0,), jnp.float32)
        for k in ("dropped_fraction", "router_entropy", "experts_per_token", "a2a_bytes")
      }
      out |= {k: jnp.zeros((0, 1), jnp.float32) for k in ("device_load", "native_device_load")}
      return out
    stacked = {k: jnp.concatenate([a[k] for a in layer_aux], axis=0) for k in layer_aux[0]}
    aux_loss = sum(getattr(c, coef) * jnp.sum(stacked[k]) for k, coef in _LOSS_COEFS.items())
    out = {"aux_loss": aux_loss.astype(jnp.float32)}
    out |= {k: jnp.mean(stacked.pop(k)) for k in _LOSS_COEFS}
    return out | stacked

  def update_aux_free_bias(self, expert_counts: jax.Array) -> None:
    """One aux-loss-free bias step for every MoE layer from aux["expert_counts"] [L_moe, E].

    No-op when the MoE layers have no bias (`MoEConfig.aux_free_bias` False) or there are none.
    """
    c = self.config
    if c.moe is None or not c.moe.aux_free_bias or not c.num_moe_layers:
      return
    rows = iter(range(c.num_moe_layers))
    if not c.scan_layers:
      for block in self.blocks:
        if block.moe is not None:
          block.moe.update_aux_free_bias(expert_counts[next(rows)])
      return
    # The prefix is dense by construction; scanned MoE layers update as one stacked [U, E] array.
    if self.scanned_blocks is not None and self.scanned_blocks[0].moe is not None:
      bias = self.scanned_blocks[0].moe.router.aux_free_bias
      units = bias[...].shape[0]
      bias[...] = losses.update_aux_free_bias(
        bias[...], expert_counts[:units], c.moe.aux_free_bias_rate
      )
      rows = iter(range(units, c.num_moe_layers))
    for block in self.suffix_blocks:
      if block.moe is not None:
        block.moe.update_aux_free_bias(expert_counts[next(rows)])


def _run_blocks(blocks, x, args, layer_aux, caches=None, cache_kw=None):
  """Apply a list of blocks in order, appending each MoE layer's aux (with a leading axis of 1).

  Returns x and the blocks' updated cache entries (None without `caches`).
  """
  new_caches = None if caches is None else []
  for i, block in enumerate(blocks):
    if caches is None:
      x, aux = block(x, *args)
    else:
      x, aux, entry = block(x, *args, caches[i], **cache_kw)
      new_caches.append(entry)
    if aux is not None:
      layer_aux.append(jax.tree.map(lambda a: a[None], aux))
  return x, new_caches


def _scan_blocks(units: nnx.List, x, args, caches=None, cache_kw=None):
  """Run the stacked periods with `nnx.scan`.

  Returns x, the periods' MoE aux stacked [U, ...] (None for a dense model), and the updated cache
  entries (a list over period positions j of entries stacked [U, ...]; None without `caches`): the
  cache is a scanned input and output, so each period reads and writes its own slice.
  """

  # graph_updates=False: the graph-update mode refuses variables created at an outer trace level
  # ("Cannot extract graph node from different trace level"), which is what a functional train step
  # -- jax.jit(jax.grad(loss)) merging non-differentiated state inside -- hands it. This mode ignores
  # transform_metadata: inside the body, logical_axes still start with "layers".
  @nnx.scan(in_axes=(nnx.Carry, 0, None, 0, None), out_axes=(nnx.Carry, 0, 0), graph_updates=False)
  def body(x, unit, args, unit_caches, cache_kw):
    moe_aux, new_caches = None, None if unit_caches is None else []
    for j, block in enumerate(unit):
      if unit_caches is None:
        x, aux = block(x, *args)
      else:
        x, aux, entry = block(x, *args, unit_caches[j], **cache_kw)
        new_caches.append(entry)
      moe_aux = aux if aux is not None else moe_aux  # at most one MoE block per period
    return x, moe_aux, new_caches

  return body(x, units, args, caches, cache_kw)


# ----------------------------------------------------------------------------------------------------
# Converting states between the scanned and unscanned layouts.


def _unscanned_index(config: ModelConfig, key: str, index: int) -> int:
  prefix, period, units, _ = layer_layout(config)
  if key == "prefix_blocks":
    return index
  return prefix + period * units + index  # suffix_blocks


def unstack_layers(state: nnx.State, config: ModelConfig) -> nnx.State:
  """A scanned model's state (scan_layers=True) -> the same variables in the unscanned layout.

  `scanned_blocks.{j}.*[u]` becomes `blocks.{prefix + u * period + j}.*` with the leading "layers"
  logical axis removed; prefix and suffix blocks are renumbered; everything else is kept.
  """
  prefix, period, units, _ = layer_layout(config)
  flat = []
  for path, var in nnx.to_flat_state(state):
    head, rest = path[0], path[1:]
    if head in ("prefix_blocks", "suffix_blocks"):
      flat.append((("blocks", _unscanned_index(config, head, int(rest[0])), *rest[1:]), var))
    elif head == "scanned_blocks":
      j, rest = int(rest[0]), rest[1:]
      for u in range(units):
        flat.append((("blocks", prefix + u * period + j, *rest), _slice_var(var, u)))
    else:
      flat.append((path, var))
  return nnx.from_flat_state(flat)


def stack_layers(state: nnx.State, config: ModelConfig) -> nnx.State:
  """The inverse of `unstack_layers`: an unscanned state -> the scanned layout of `config`."""
  prefix, period, units, _ = layer_layout(config)
  flat, stacks = [], {}
  for path, var in nnx.to_flat_state(state):
    if path[0] != "blocks":
      flat.append((path, var))
      continue
    i, rest = int(path[1]), path[2:]
    if i < prefix:
      flat.append((("prefix_blocks", i, *rest), var))
    elif i < prefix + period * units:
      u, j = divmod(i - prefix, period)
      stacks.setdefault((j, *rest), [None] * units)[u] = var
    else:
      flat.append((("suffix_blocks", i - prefix - period * units, *rest), var))
  for (j, *rest), vars_ in stacks.items():
    flat.append((("scanned_blocks", j, *rest), _stack_vars(vars_)))
  return nnx.from_flat_state(flat)


def _slice_var(var: nnx.Variable, u: int) -> nnx.Variable:
  axes = var.get_metadata().get("logical_axes")
  meta = {} if axes is None else {"logical_axes": tuple(axes[1:])}
  return var.replace(var[...][u], **meta)


def _stack_vars(vars_: list[nnx.Variable]) -> nnx.Variable:
  axes = vars_[0].get_metadata().get("logical_axes")
  meta = {} if axes is None else {"logical_axes": (LAYERS_AXIS, *axes)}
  return vars_[0].replace(jnp.stack([v[...] for v in vars_]), **meta)


# ----------------------------------------------------------------------------------------------------
# The language-modelling loss.


def lm_loss(
  logits: jax.Array, targets: jax.Array, mask: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
  """Mean next-token cross-entropy (float32) over the tokens where `mask` is nonzero.

  logits [B, S, V], targets [B, S] (int), mask [B, S] (optional, 1 = counts) -> (mean_loss,
  num_tokens), both float32 scalars; the mean is 0 when no token counts. The caller aligns targets
  with logits (targets = tokens shifted left by one).
  """
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [B, S, V]
  nll = -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]  # [B, S]
  if mask is None:
    return jnp.mean(nll), jnp.asarray(nll.size, jnp.float32)
  m = mask.astype(jnp.float32)
  n = jnp.sum(m)
  return jnp.sum(nll * m) / jnp.maximum(n, 1.0), n

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
`tie_embeddings`). Which layers are MoE, and with which MoEConfig, is `ModelConfig.block_specs`:
DeepSeek's layer pattern, or one `BlockSpec` per layer (`ModelConfig.layers`), whose `kind` picks the
block class from a registry (`register_block`; this pre-norm `Block` is "transformer").

Layer stacking. Unscanned, the blocks are a list `blocks.{i}`. With `scan_layers`, the stack is split
so that its repeating part compiles once, whatever the depth:

    prefix_blocks.{i}      the first_k_dense dense layers, a plain list
    scanned_blocks.{j}     one period of moe_every layers (j = 0 is the MoE layer), each parameter
                           stacked over U = (L - first_k_dense) // moe_every periods and run by
                           `nnx.scan`; its logical axes gain a leading "layers"
    suffix_blocks.{r}      the remaining (L - first_k_dense) % moe_every layers, a plain list

A dense model scans all L layers as periods of one. Layer i = first_k_dense + u * moe_every + j sits at
`scanned_blocks.{j}` index [u]. With `ModelConfig.layers` the same three parts hold the longest
periodic run of identical block specs (see `layer_layout`): a period may then hold several MoE layers,
and a stack without a repeated run is all `prefix_blocks`. `unstack_layers` / `stack_layers` convert a state between the layouts
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
from moejax.models.config import BlockSpec, ModelConfig
from moejax.models.mla import MLA
from moejax.models.norm import RMSNorm
from moejax.models.registry import block_class, register_block
from moejax.moe import losses, stats
from moejax.moe.experts import dense_ffn, dense_init
from moejax.moe.layer import MoE

# Logical axis of the stacked layer dimension of scanned parameters (replicated by sharding rules).
LAYERS_AXIS = "layers"
# Tells nnx.vmap to prepend that axis to each stacked variable's `logical_axes`.
_SCAN_METADATA = {nnx.PARTITION_NAME: None, "logical_axes": LAYERS_AXIS}
# What a block reads out of its MoE layer when asked (`capture`, a static flag): nothing (the
# training path), the Routing, or the Routing plus the layer's input and output.
CAPTURES = (None, "routing", "io")


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
  """One pre-norm transformer block; its FFN is `moe` (an MoE layer) or `mlp` (dense).

  Registered as block kind "transformer". `spec` (resolved, see `ModelConfig.block_specs`) picks its
  attention and its FFN; the other widths come from `config`.
  """

  def __init__(self, config: ModelConfig, spec: BlockSpec, *, rngs: nnx.Rngs):
    c = config
    norm = lambda: RMSNorm(c.d_model, eps=c.norm_eps, dtype=c.dtype, param_dtype=c.param_dtype)
    self.attn_norm = norm()
    if spec.attention == "mla":
      self.attn = MLA(c if c.attention == "mla" else c.replace(attention="mla"), rngs=rngs)
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
    self.moe = MoE(spec.moe, rngs=rngs) if spec.moe is not None else None
    self.mlp = None if spec.moe is not None else DenseFFN(c, rngs=rngs)

  def __call__(
    self,
    x: jax.Array,
    positions: jax.Array | None,
    segment_ids: jax.Array | None,
    token_mask: jax.Array | None,
    cache: dict[str, jax.Array] | None = None,
    cache_index: jax.Array | None = None,
    cache_mask: jax.Array | None = None,
    *,
    capture: str | None = None,
  ):
    """x [B, S, D] -> (x [B, S, D], the MoE layer's aux or None for a dense block).

    With `cache` (this layer's entry; `cache_index`, `cache_mask` as in attention.py) it returns
    (x, aux, the updated entry). With `capture` ("routing" | "io", static) one more value comes
    last: None for a dense block, else {"routing": the MoE layer's Routing} plus, for "io",
    "inputs" (the normed hidden state the MoE layer receives) and "outputs" (its y), [B, S, D].
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
    captured = None
    if self.moe is None:
      with jax.named_scope("mlp"):
        x, aux = x + self.mlp(h), None
    else:
      with jax.named_scope("moe"):
        if capture is None:
          y, aux = self.moe(h, token_mask=token_mask)
        else:
          y, aux, routing = self.moe(h, token_mask=token_mask, return_routing=True)
          captured = {"routing": routing}
          if capture == "io":
            captured |= {"inputs": h, "outputs": y}
      x = x + y.astype(x.dtype)
    out = (x, aux) if cache is None else (x, aux, cache)
    return out if capture is None else (*out, captured)


register_block("transformer", Block)


def layer_layout(config: ModelConfig) -> tuple[int, int, int, int]:
  """(prefix, period, units, suffix) of the scanned stack: L = prefix + period * units + suffix.

  From the pattern fields (`layers` None): the first_k_dense prefix, periods of moe_every layers,
  the remainder as suffix (all L layers as periods of one for a dense model). From `layers`: the
  longest periodic run of identical block specs, at least two periods long (ties: the shorter
  period, then the earlier start); the layers before and after it are the prefix and suffix. A stack
  without such a run is all prefix: (L, 1, 0, 0).
  """
  if config.layers is None:
    if config.moe is None:
      return 0, 1, config.num_layers, 0
    prefix, period = config.first_k_dense, config.moe_every
    units, suffix = divmod(config.num_layers - prefix, period)
    return prefix, period, units, suffix
  return _periodic_run(config.block_specs)


def _periodic_run(specs: tuple[BlockSpec, ...]) -> tuple[int, int, int, int]:
  n = len(specs)
  best, covered = (n, 1, 0, 0), 0
  for period in range(1, n // 2 + 1):
    for prefix in range(n - 2 * period + 1):
      unit = specs[prefix : prefix + period]
      units = 1
      while specs[prefix + units * period : prefix + (units + 1) * period] == unit:
        units += 1
      if units >= 2 and units * period > covered:
        covered = units * period
        best = (prefix, period, units, n - prefix - covered)
  return best


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
    specs = c.block_specs
    make = lambda i, r: block_class(specs[i].kind)(c, specs[i], rngs=r)
    if c.scan_layers:
      prefix, period, units, suffix = layer_layout(c)
      self.prefix_blocks = nnx.List([make(i, rngs) for i in range(prefix)])

      @nnx.split_rngs(splits=units)
      @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata=_SCAN_METADATA)
      def make_unit(r: nnx.Rngs) -> nnx.List:
        return nnx.List([make(prefix + j, r) for j in range(period)])

      self.scanned_blocks = make_unit(rngs) if units else None
      first_suffix = prefix + period * units
      self.suffix_blocks = nnx.List([make(first_suffix + r, rngs) for r in range(suffix)])
    else:
      self.blocks = nnx.List([make(i, rngs) for i in range(c.num_layers)])
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
    capture: str | None = None,
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

    `capture` ("routing" | "io"; a static flag, None on the training path) appends one more value:
    a list, in layer order, of (layer index, {"routing": Routing[, "inputs", "outputs"]}) for each
    MoE layer (see Block). Read routing through `moejax.analysis.capture_routing`, not this.

    aux (L_moe = config.num_moe_layers; rows in layer order, config.moe_layers; each key is declared
    in moejax.moe.stats with how it reduces over layers and micro-batches):
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
    E is `config.max_num_experts`: when the MoE layers have different numbers of experts, row l of a
    per-expert array is zero-padded past its `config.moe_num_experts[l]` real experts.
    A model without MoE layers gives zero scalars and arrays of shape [0, E] ([0, 0] for a dense
    model) / [0].
    """
    c = self.config
    if capture not in CAPTURES:
      raise ValueError(f"capture={capture!r} is invalid: allowed are None, 'routing', 'io'")
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
    run = _Run((positions, segment_ids, token_mask), cache_kw, capture)
    if c.scan_layers:
      prefix, period, units, _ = layer_layout(c)
      get = lambda key: None if layer_caches is None else layer_caches[key]
      x, prefix_caches = run.blocks(self.prefix_blocks, 0, x, get("prefix"))
      scanned = None if layer_caches is None else []
      if self.scanned_blocks is not None:
        x, scanned = run.scan(self.scanned_blocks, prefix, units, x, get("scanned"))
      first = prefix + period * units
      x, suffix = run.blocks(self.suffix_blocks, first, x, get("suffix"))
      new_layers = {"prefix": prefix_caches, "scanned": scanned, "suffix": suffix}
    else:
      x, new_layers = run.blocks(self.blocks, 0, x, layer_caches)
    h = self.final_norm(x).reshape(-1, c.d_model)  # [B*S, D]: one 2-D matmul
    with jax.named_scope("logits"):
      if self.lm_head is None:
        table = self.embed.embedding[...].astype(c.dtype)  # [V, D]
        logits = jnp.einsum("nd,vd->nv", h, table, preferred_element_type=jnp.float32)
      else:
        w = self.lm_head.kernel[...].astype(c.dtype)  # [D, V]
        logits = jnp.einsum("nd,dv->nv", h, w, preferred_element_type=jnp.float32)
      logits = logits.reshape(*tokens.shape, -1)  # [B, S, V]
    logits, aux = logits.astype(jnp.float32), self._summarise_aux(run.layer_aux)
    out = (logits, aux)
    if cache is not None:
      out += ({"index": index + s, "valid": valid, "layers": new_layers},)
    if capture is not None:
      out += (sorted(run.captures, key=lambda item: item[0]),)
    return out

  def _summarise_aux(self, layer_aux: list[tuple[list[int], dict[str, jax.Array]]]) -> dict:
    """The model's aux from (layer indices, their MoE aux stacked over a leading axis) groups."""
    c = self.config
    if not layer_aux:
      return stats.empty(c.max_num_experts)
    for rows, aux in layer_aux:
      stats.check_layer_aux(aux, f"the MoE layer of layer {rows[0]}")
    e_max = c.max_num_experts
    auxes = [stats.pad_experts(aux, e_max) for _, aux in layer_aux]
    stacked = {k: jnp.concatenate([a[k] for a in auxes], axis=0) for k in auxes[0]}
    layers = [i for rows, _ in layer_aux for i in rows]
    order = sorted(range(len(layers)), key=layers.__getitem__)
    if order != list(range(len(layers))):  # a period with several MoE layers: interleave its rows
      stacked = {k: v[jnp.asarray(order)] for k, v in stacked.items()}
    coefs = {f: getattr(c, f) for f in stats.LOSS_COEFS.values()}
    return stats.summarise(stacked, coefs)

  def update_aux_free_bias(self, expert_counts: jax.Array) -> None:
    """One aux-loss-free bias step for every MoE layer from aux["expert_counts"] [L_moe, E_max].

    Each layer reads its row's first E_l columns (its real experts; see `ModelConfig.moe_num_experts`).
    No-op for the MoE layers without a bias (`MoEConfig.aux_free_bias` False) and without MoE layers.
    """
    c = self.config
    if not c.num_moe_layers or not any(c.layer_moe(i).aux_free_bias for i in c.moe_layers):
      return
    row = {layer: r for r, layer in enumerate(c.moe_layers)}
    e_max = c.max_num_experts
    real = lambda counts, e: counts if e == e_max else counts[..., :e]

    def update_list(blocks, first):
      for i, block in enumerate(blocks):
        if block.moe is not None:
          block.moe.update_aux_free_bias(
            real(expert_counts[row[first + i]], block.moe.config.num_experts)
          )

    if not c.scan_layers:
      update_list(self.blocks, 0)
      return
    prefix, period, units, _ = layer_layout(c)
    update_list(self.prefix_blocks, 0)
    if self.scanned_blocks is not None:
      for j, block in enumerate(self.scanned_blocks):
        if block.moe is None or block.moe.router.aux_free_bias is None:
          continue
        # The period's layer j over all U periods: rows r0, r0 + step, ... (step = MoE layers per
        # period), updated as one stacked [U, E] array.
        r0 = row[prefix + j]
        step = row[prefix + period + j] - r0 if units > 1 else 1
        counts = real(expert_counts[r0 : r0 + step * units : step], block.moe.config.num_experts)
        bias = block.moe.router.aux_free_bias
        bias[...] = losses.update_aux_free_bias(
          bias[...], counts, block.moe.config.aux_free_bias_rate
        )
    update_list(self.suffix_blocks, prefix + period * units)


class _Run:
  """One forward pass through the blocks: the static arguments, and what the blocks hand back
  (their MoE aux in groups of layers, and captures)."""

  def __init__(self, args, cache_kw, capture):
    self.args, self.cache_kw, self.capture = args, cache_kw, capture
    self.layer_aux = []  # (layer indices, MoE aux with a leading axis over those layers)
    self.captures = []  # (layer index, capture dict)

  def blocks(self, blocks, first, x, caches=None):
    """Apply a list of blocks (layers first, first + 1, ...) in order.

    Returns x and the blocks' updated cache entries (None without `caches`).
    """
    new_caches = None if caches is None else []
    kw = {} if self.capture is None else {"capture": self.capture}
    for i, block in enumerate(blocks):
      if caches is None:
        x, aux, *captured = block(x, *self.args, **kw)
      else:
        x, aux, entry, *captured = block(x, *self.args, caches[i], **self.cache_kw, **kw)
        new_caches.append(entry)
      if aux is not None:
        self.layer_aux.append(([first + i], jax.tree.map(lambda a: a[None], aux)))
      if captured and captured[0] is not None:
        self.captures.append((first + i, captured[0]))
    return x, new_caches

  def scan(self, units: nnx.List, first, num_units, x, caches=None):
    """Run the stacked periods (layers first + u * period + j) with `nnx.scan`.

    Returns x and the updated cache entries (a list over period positions j of entries stacked
    [U, ...]; None without `caches`): the cache is a scanned input and output, so each period reads
    and writes its own slice. The MoE aux of period position j comes out stacked [U, ...].
    """
    capture = self.capture

    # graph_updates=False: the graph-update mode refuses variables created at an outer trace level
    # ("Cannot extract graph node from different trace level"), which is what a functional train
    # step -- jax.jit(jax.grad(loss)) merging non-differentiated state inside -- hands it. This mode
    # ignores transform_metadata: inside the body, logical_axes still start with "layers".
    @nnx.scan(
      in_axes=(nnx.Carry, 0, None, 0, None), out_axes=(nnx.Carry, 0, 0, 0), graph_updates=False
    )
    def body(x, unit, args, unit_caches, cache_kw):
      moe_aux, captures, new_caches = [], [], None if unit_caches is None else []
      kw = {} if capture is None else {"capture": capture}
      for j, block in enumerate(unit):
        if unit_caches is None:
          x, aux, *captured = block(x, *args, **kw)
        else:
          x, aux, entry, *captured = block(x, *args, unit_caches[j], **cache_kw, **kw)
          new_caches.append(entry)
        moe_aux.append(aux)
        captures.append(captured[0] if captured else None)
      return x, moe_aux, new_caches, captures

    x, moe_aux, new_caches, captures = body(x, units, self.args, caches, self.cache_kw)
    period = len(units)
    for j in range(period):
      layers = [first + u * period + j for u in range(num_units)]
      if moe_aux[j] is not None:
        self.layer_aux.append((layers, moe_aux[j]))
      if captures[j] is not None:
        for u, layer in enumerate(layers):
          self.captures.append((layer, jax.tree.map(lambda a, u=u: a[u], captures[j])))
    return x, new_caches


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

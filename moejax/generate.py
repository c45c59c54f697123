"""Autoregressive generation with a KV cache: greedy decoding, temperature, top-k and top-p sampling.

    tokens = generate(model, prompt, max_new_tokens=20)                          # greedy
    tokens = generate(model, prompt, max_new_tokens=20, temperature=0.8, top_p=0.95,
                      rng=jax.random.key(0))                                      # nucleus sampling

    python -m moejax.generate --hf PATH --prompt "The capital of France is"
    python -m moejax.generate --checkpoint runs/mixtral_tiny --prompt "def main(" --temperature 0.8

`prompt` [B, S0] holds token ids; prompts of different lengths are *left*-padded and `prompt_mask`
[B, S0] marks the real tokens (1), as Hugging Face's `generate` expects. The model runs once over the
prompts (prefill, writing the cache) and then once per new token (decode), all inside one `jax.jit`
with a `fori_loop`; the cache holds max_len = S0 + max_new_tokens slots per layer (GQA: keys and
values; MLA: the compressed latent and the rope key, see moejax.models).

Sampling follows `transformers`' logits processors in its order: temperature, then top-k, then
top-p (the smallest set of tokens whose probability reaches p; the most likely token always stays),
then a categorical draw. `temperature=0` is greedy (argmax; ties go to the lowest id, as torch's).
After `eos_id` a sequence emits `pad_id`.

MoE layers must be causal for the cache to be exact: dropless dispatch with a token-choice router
(see moejax.moe.dispatch). Capacity dispatch and expert choice route each token depending on the
whole batch, so their decoding differs from a full forward pass.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def sample_logits(
  logits: jax.Array,
  rng: jax.Array | None,
  *,
  temperature: float = 0.0,
  top_k: int | None = None,
  top_p: float | None = None,
) -> jax.Array:
  """Next tokens [B] (int32) from logits [B, V]."""
  logits = logits.astype(jnp.float32)
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  neg = jnp.finfo(jnp.float32).min
  if top_k is not None and top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]  # [B, 1]
    logits = jnp.where(logits < kth, neg, logits)
  if top_p is not None and top_p < 1.0:
    order = jnp.argsort(-logits, axis=-1)  # descending
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = mass_before < top_p  # the first token always stays
    keep = (
      jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
    )
    logits = jnp.where(keep, logits, neg)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def _check(name: str, value, ok: bool, allowed: str) -> None:
  if not ok:
    raise ValueError(f"generate: {name}={value!r} is invalid: {allowed}")


def generate(
  model,
  prompt,
  *,
  prompt_mask=None,
  max_new_tokens: int,
  temperature: float = 0.0,
  top_k: int | None = None,
  top_p: float | None = None,
  rng: jax.Array | None = None,
  eos_id: int | None = None,
  pad_id: int = 0,
) -> jax.Array:
  """Prompt [B, S0] -> [B, S0 + max_new_tokens]: the prompt followed by the generated tokens.

  The model is put in eval mode (no router jitter). See the module docstring.
  """
  prompt = jnp.asarray(prompt, jnp.int32)
  _check("prompt", prompt.shape, prompt.ndim == 2 and prompt.shape[1] >= 1, "needs shape [B, S>=1]")
  _check("max_new_tokens", max_new_tokens, max_new_tokens >= 1, "must be >= 1")
  _check("temperature", temperature, temperature >= 0.0, "must be >= 0 (0 = greedy)")
  _check("top_k", top_k, top_k is None or top_k >= 1, "must be None or >= 1")
  _check("top_p", top_p, top_p is None or 0.0 < top_p <= 1.0, "must be None or in (0, 1]")
  if temperature > 0.0 and rng is None:
    raise ValueError("generate: sampling (temperature > 0) needs an `rng` key")
  b, s0 = prompt.shape
  mask = (
    jnp.ones((b, s0), jnp.int32) if prompt_mask is None else jnp.asarray(prompt_mask, jnp.int32)
  )
  _check(
    "prompt_mask",
    mask.shape,
    mask.shape == prompt.shape,
    f"needs the prompt's shape {prompt.shape}",
  )
  rng = jax.random.key(0) if rng is None else rng
  model.eval()
  graphdef, state = nnx.split(model)
  run = _compiled(graphdef, b, s0, max_new_tokens, temperature, top_k, top_p, eos_id, pad_id)
  return run(state, prompt, mask, rng)


@functools.lru_cache(maxsize=32)
def _compiled(graphdef, b, s0, n, temperature, top_k, top_p, eos_id, pad_id):
  """The jitted prefill + decode loop for one model graph and one set of static settings."""
  sample = lambda logits, rng: sample_logits(
    logits, rng, temperature=temperature, top_k=top_k, top_p=top_p
  )

  @jax.jit
  def run(state, prompt, mask, rng):
    model = nnx.merge(graphdef, state)
    cache = model.init_cache(b, s0 + n)
    # Left padding: real tokens count positions from 0; padding takes position 0 and is invisible.
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    logits, _, cache = model(prompt, positions=positions, token_mask=mask, cache=cache)
    rng, sub = jax.random.split(rng)
    first = sample(logits[:, -1], sub)
    out = jnp.full((b, n), pad_id, jnp.int32).at[:, 0].set(first)
    done = jnp.zeros((b,), bool) if eos_id is None else first == eos_id
    position = positions[:, -1] + 1

    def step(i, carry):
      out, cache, position, done, rng = carry
      token = out[:, i - 1]
      logits, _, cache = model(token[:, None], positions=position[:, None], cache=cache)
      rng, sub = jax.random.split(rng)
      nxt = jnp.where(done, pad_id, sample(logits[:, -1], sub))
      out = out.at[:, i].set(nxt)
      if eos_id is not None:
        done = done | (nxt == eos_id)
      return out, cache, position + 1, done, rng

    out, *_ = jax.lax.fori_loop(1, n, step, (out, cache, position, done, rng))
    return jnp.concatenate([prompt, out], axis=1)

  return run


def _main(argv) -> None:
  from absl import app, flags, logging

  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  if not f["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it reads at INFO
  if bool(f.checkpoint) == bool(f.hf):
    raise app.UsageError(
      "give exactly one of --checkpoint (a moejax workdir) or --hf (a HF model dir)"
    )
  if f.hf:
    from moejax.interop.hf import load_hf

    model, _ = load_hf(f.hf)
    try:
      from transformers import AutoTokenizer

      tokenizer = AutoTokenizer.from_pretrained(f.hf)
      encode, decode = tokenizer.encode, tokenizer.decode
      eos = tokenizer.eos_token_id
    except (OSError, ValueError, ImportError) as e:
      raise app.UsageError(f"--hf {f.hf}: no tokenizer could be loaded from it ({e})") from e
  else:
    from moejax.train.trainer import load_run

    model, _, tokenizer = load_run(f.checkpoint)
    encode, decode, eos = (lambda t: list(tokenizer.encode(t))), tokenizer.decode, tokenizer.eos_id
  ids = np.asarray([encode(f.prompt)], np.int32)
  rng = jax.random.key(f.seed)
  out = generate(
    model,
    ids,
    max_new_tokens=f.max_new_tokens,
    temperature=f.temperature,
    top_k=f.top_k,
    top_p=f.top_p,
    rng=rng,
    eos_id=eos,
    pad_id=eos if eos is not None else 0,
  )
  new = [int(t) for t in np.asarray(out)[0, ids.shape[1] :]]
  if eos is not None and eos in new:
    new = new[: new.index(eos)]
  print(f.prompt + decode(new))


def main() -> None:
  from absl import app, flags

  from moejax import hostmem

  hostmem.retain_host_memory()  # see moejax/hostmem.py (MOEJAX_RETAIN_HOST_MEMORY=0: off)

  flags.DEFINE_string("checkpoint", None, "A moejax training workdir (its latest checkpoint).")
  flags.DEFINE_string("hf", None, "A local Hugging Face model directory (config + safetensors).")
  flags.DEFINE_string("prompt", "", "The text to continue.")
  flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate.")
  flags.DEFINE_float("temperature", 0.0, "0 = greedy; > 0 samples.")
  flags.DEFINE_integer("top_k", None, "Keep the k most likely tokens (sampling).")
  flags.DEFINE_float("top_p", None, "Keep the smallest set of tokens with this probability.")
  flags.DEFINE_integer("seed", 0, "Sampling seed.")
  app.run(_main)


if __name__ == "__main__":
  main()

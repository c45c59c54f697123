"""Generation: sampling filters against transformers' logits warpers; cached decoding against
recomputing the whole sequence; the CLI on a trained workdir."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax.generate import generate, sample_logits
from moejax.models import Transformer
from moejax.testing import tiny_model_config, tiny_moe_config

torch = pytest.importorskip("torch")
generation = pytest.importorskip("transformers.generation.logits_process")


def _support(logits, **kw):
  """The set of tokens sample_logits can draw: every token some key drew, over many keys."""
  keys = jax.random.split(jax.random.key(0), 4000)
  draws = jax.vmap(lambda k: sample_logits(logits, k, **kw))(keys)  # [N, B]
  return [set(np.unique(np.asarray(draws[:, i])).tolist()) for i in range(logits.shape[0])]


def _hf_support(logits, temperature, top_k=None, top_p=None):
  scores = torch.tensor(np.asarray(logits)) / temperature
  if top_k is not None:
    scores = generation.TopKLogitsWarper(top_k)(None, scores)
  if top_p is not None:
    scores = generation.TopPLogitsWarper(top_p)(None, scores)
  return [set(np.nonzero(np.isfinite(row.numpy()))[0].tolist()) for row in scores]


@pytest.mark.parametrize("kw", [dict(top_k=3), dict(top_p=0.6), dict(top_k=4, top_p=0.5)])
def test_top_k_top_p_keep_what_transformers_keeps(kw):
  logits = jnp.log(
    jnp.array([[0.4, 0.25, 0.15, 0.1, 0.06, 0.04], [0.05, 0.05, 0.6, 0.1, 0.1, 0.1]])
  )
  assert _support(logits, temperature=0.7, **kw) == _hf_support(logits, 0.7, **kw)


def test_greedy_is_argmax_and_sampling_follows_the_probabilities():
  logits = jnp.array([[0.0, 2.0, 1.0], [3.0, 0.0, 3.0]])
  np.testing.assert_array_equal(sample_logits(logits, None), [1, 0])  # ties: the lowest id
  keys = jax.random.split(jax.random.key(1), 20000)
  draws = np.asarray(jax.vmap(lambda k: sample_logits(logits[:1], k, temperature=1.0))(keys))
  freq = np.bincount(draws[:, 0], minlength=3) / len(draws)
  np.testing.assert_allclose(freq, jax.nn.softmax(logits[0]), atol=0.015)


def _tiny_model(**kw):
  # Layer 0 dense, layers 1-2 MoE (F=32), V=50, dense F=64; otherwise the shared tiny shapes.
  moe = tiny_moe_config(expert_hidden_dim=32)
  cfg = tiny_model_config(
    vocab_size=50, num_layers=3, dense_hidden_dim=64, first_k_dense=1, moe=moe, **kw
  )
  return Transformer(cfg, rngs=nnx.Rngs(0))


# Each generate() call compiles prefill and decoding (~10-20 s on 2 cores): the fast tier keeps the
# unscanned greedy and the EOS checks; scanned and left-padded generation are slow.
@pytest.mark.parametrize("scan_layers", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_greedy_generation_equals_recomputing_the_sequence(scan_layers):
  model = _tiny_model(scan_layers=scan_layers)
  model.eval()
  prompt = jax.random.randint(jax.random.key(3), (2, 5), 0, 50)
  out = np.asarray(generate(model, prompt, max_new_tokens=8))
  assert out.shape == (2, 13)
  np.testing.assert_array_equal(out[:, :5], prompt)
  # No cache: run the whole (right-padded, causal) sequence, take the argmax at the last real token.
  graphdef, state = nnx.split(model)
  full = jax.jit(lambda state, seq: nnx.merge(graphdef, state)(seq)[0])
  seq = np.zeros((2, 13), np.int32)
  seq[:, :5] = prompt
  for n in range(5, 13):
    seq[:, n] = np.asarray(jnp.argmax(full(state, jnp.asarray(seq))[:, n - 1], -1))
  np.testing.assert_array_equal(out, seq)


@pytest.mark.slow
def test_left_padded_prompts_generate_like_unpadded_ones():
  model = _tiny_model()
  short = jax.random.randint(jax.random.key(4), (1, 3), 1, 50)
  long = jax.random.randint(jax.random.key(5), (1, 6), 1, 50)
  alone = [np.asarray(generate(model, p, max_new_tokens=6))[0, p.shape[1] :] for p in (short, long)]
  batch = jnp.concatenate([jnp.pad(short, ((0, 0), (3, 0))), long])
  mask = jnp.array([[0, 0, 0, 1, 1, 1], [1] * 6])
  together = np.asarray(generate(model, batch, prompt_mask=mask, max_new_tokens=6))[:, 6:]
  np.testing.assert_array_equal(together, np.stack(alone))


def test_eos_stops_a_sequence_and_bad_arguments_are_named():
  model = _tiny_model()
  prompt = jax.random.randint(jax.random.key(6), (2, 4), 0, 50)
  free = np.asarray(generate(model, prompt, max_new_tokens=6))
  eos = int(free[0, 4])  # row 0's first generated token
  out = np.asarray(generate(model, prompt, max_new_tokens=6, eos_id=eos, pad_id=49))
  assert out[0, 4] == eos and (out[0, 5:] == 49).all()
  stop = list(free[1, 4:]).index(eos) + 5 if eos in free[1, 4:] else 10
  np.testing.assert_array_equal(out[1, :stop], free[1, :stop])
  with pytest.raises(ValueError, match="max_new_tokens=0"):
    generate(model, prompt, max_new_tokens=0)
  with pytest.raises(ValueError, match="top_p=1.5"):
    generate(model, prompt, max_new_tokens=2, temperature=1.0, top_p=1.5, rng=jax.random.key(0))
  with pytest.raises(ValueError, match="needs an `rng`"):
    generate(model, prompt, max_new_tokens=2, temperature=1.0)

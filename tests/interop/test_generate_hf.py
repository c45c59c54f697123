"""Greedy generation from an imported checkpoint equals transformers' `generate`, token for token.

Prompts of two lengths in one batch (left-padded, with an attention mask) exercise the KV cache's
positions and padding; 20 new tokens exercise the cache over many steps.
"""

import numpy as np
import pytest

from moejax.generate import generate
from moejax.interop import load_hf
from tests.interop.test_hf import CONFIGS, hf_model, saved  # noqa: F401  (saved: a fixture)

torch = pytest.importorskip("torch")

NEW_TOKENS = 20


def _prompts(vocab: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  prompt = rng.integers(2, vocab, (2, 7))
  mask = np.ones_like(prompt)
  prompt[1, :3], mask[1, :3] = 0, 0  # the second prompt is 4 tokens, left-padded
  return prompt, mask


# The fast tier generates with one GQA (mixtral) and one MLA (deepseek_v3) family; test_hf.py checks
# every family's logits there.
@pytest.mark.parametrize(
  "name",
  [
    n if n in ("mixtral", "deepseek_v3") else pytest.param(n, marks=pytest.mark.slow)
    for n in CONFIGS
  ],
)
def test_greedy_generation_matches_transformers(name, saved):  # noqa: F811
  directory, hf = saved(name)
  prompt, mask = _prompts(hf.config.vocab_size)
  hf.generation_config.eos_token_id = None  # generate all NEW_TOKENS
  with torch.no_grad():
    ref = hf.generate(
      torch.as_tensor(prompt),
      attention_mask=torch.as_tensor(mask),
      do_sample=False,
      max_new_tokens=NEW_TOKENS,
      min_new_tokens=NEW_TOKENS,
      pad_token_id=0,
    ).numpy()
  model, _ = load_hf(directory)
  out = np.asarray(generate(model, prompt, prompt_mask=mask, max_new_tokens=NEW_TOKENS))
  np.testing.assert_array_equal(out, ref)

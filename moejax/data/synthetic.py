"""A synthetic multi-domain corpus with known domain labels, for routing-specialisation studies.

Do experts specialise by domain? On natural text the "domain" is a guess; here it is known. The
corpus has K domains (`data.num_domains`), each a distinct generative process over its own alphabet:
24 printable ASCII bytes drawn per domain, so alphabets overlap and a router cannot tell domains
apart from one token alone; it has to read context. Domain d has kind `DOMAIN_KINDS[d % 4]`:

    markov    a sparse first-order Markov chain: each symbol has 3 successors with Dirichlet(1)
              probabilities (entropy about 1 bit per token)
    copy      a random motif of 4..12 symbols repeated, 5% of tokens replaced by noise (rewards
              in-context copying, as induction heads do; Olsson et al., 2022)
    counting  walk the alphabet with the domain's fixed step, with a random jump on 5% of tokens
    zipf      i.i.d. symbols with Zipf(1.1) frequencies over a domain-specific ranking (no structure
              beyond unigram statistics)

An example is one window of one domain: `EOS` then `seq_len` generated tokens, so `inputs` begin at
the separator and every position has a label. Example i of a split belongs to domain `i % K`
(domains are balanced and, after shuffling, interleaved), and its tokens come from a generator seeded
by (`data.synthetic_seed`, split, i): a pure function of the index, so the source is random-access,
needs no storage, and is identical on every machine. The domains' processes depend on
`data.synthetic_seed` only, never on `train.seed`, so runs with different seeds share one task.
"""

from __future__ import annotations

import bisect
import dataclasses

import numpy as np

from moejax.data.tokenizers import BYTE_EOS_ID

DOMAIN_KINDS = ("markov", "copy", "counting", "zipf")
ALPHABET_SIZE = 24
_PRINTABLE = np.arange(33, 127)  # "!" .. "~": decoded samples stay readable
_NOISE = 0.05


@dataclasses.dataclass(frozen=True)
class Domain:
  """One generative process. Symbols are indices into `alphabet` (byte ids)."""

  index: int
  kind: str
  alphabet: np.ndarray  # [A] byte ids
  successors: tuple[tuple[int, ...], ...]  # markov: [A][3] next symbols
  cumulative: tuple[tuple[float, ...], ...]  # markov: [A][3] cumulative probabilities
  step: int  # counting
  unigram: np.ndarray  # zipf: [A] probabilities

  @property
  def name(self) -> str:
    return f"{self.index}:{self.kind}"

  def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
    """`n` tokens (byte ids, int32 [n]) from this domain."""
    a = ALPHABET_SIZE
    if self.kind == "markov":
      u = rng.random(n).tolist()
      x = int(rng.integers(a))
      symbols = []
      for t in range(n):
        x = self.successors[x][min(bisect.bisect_right(self.cumulative[x], u[t]), 2)]
        symbols.append(x)
      symbols = np.asarray(symbols)
    elif self.kind == "copy":
      motif = rng.integers(a, size=int(rng.integers(4, 13)))
      symbols = np.resize(motif, n)
      noise = rng.random(n) < _NOISE
      symbols[noise] = rng.integers(a, size=int(noise.sum()))
    elif self.kind == "counting":
      jumps = np.where(rng.random(n) < _NOISE, rng.integers(a, size=n), 0)
      symbols = (int(rng.integers(a)) + self.step * np.arange(n) + np.cumsum(jumps)) % a
    else:  # zipf
      symbols = rng.choice(a, size=n, p=self.unigram)
    return self.alphabet[symbols].astype(np.int32)


def make_domains(num_domains: int, seed: int) -> list[Domain]:
  """The K domains' processes, a pure function of (`num_domains`, `seed`)."""
  domains = []
  for d in range(num_domains):
    rng = np.random.default_rng([seed, d])
    a = ALPHABET_SIZE
    alphabet = np.sort(rng.choice(_PRINTABLE, size=a, replace=False))
    successors = [tuple(int(s) for s in rng.choice(a, size=3, replace=False)) for _ in range(a)]
    cumulative = [tuple(float(c) for c in np.cumsum(rng.dirichlet(np.ones(3)))) for _ in range(a)]
    # A step coprime with the alphabet size visits every symbol.
    step = int(rng.choice([s for s in range(1, a) if np.gcd(s, a) == 1]))
    ranks = rng.permutation(a)
    unigram = 1.0 / (ranks + 1.0) ** 1.1
    domains.append(
      Domain(
        index=d,
        kind=DOMAIN_KINDS[d % len(DOMAIN_KINDS)],
        alphabet=alphabet,
        successors=tuple(successors),
        cumulative=tuple(cumulative),
        step=step,
        unigram=unigram / unigram.sum(),
      )
    )
  return domains


class SyntheticDomains:
  """Random-access examples of one split: example i is domain i % K, generated from its index."""

  def __init__(self, *, num_domains: int, seq_len: int, num_examples: int, seed: int, split: str):
    self.domains = make_domains(num_domains, seed)
    self._seq_len = seq_len
    self._num_examples = num_examples
    self._seed = seed
    self._split_id = {"train": 0, "validation": 1}[split]

  def __len__(self) -> int:
    return self._num_examples

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    index = int(index)
    if not 0 <= index < self._num_examples:
      raise IndexError(f"example {index} out of range [0, {self._num_examples})")
    domain = self.domains[index % len(self.domains)]
    rng = np.random.default_rng([self._seed, self._split_id, index])
    window = np.concatenate([[BYTE_EOS_ID], domain.sample(rng, self._seq_len)]).astype(np.int32)
    return {
      "inputs": window[:-1],  # [S]
      "targets": window[1:],  # [S]
      "mask": np.ones(self._seq_len, np.float32),  # [S]
      "domain": np.int32(domain.index),  # []
    }

  def __repr__(self) -> str:
    return (
      f"SyntheticDomains({len(self.domains)} domains, {self._num_examples} examples of "
      f"{self._seq_len} tokens)"
    )

"""The grain pipeline: packed windows -> shuffle -> repeat -> shard by process -> batch.

A split's packed token stream (see sources.py) is cut into consecutive windows of S + 1 tokens that
overlap by one token: window i is `stream[i*S : i*S + S + 1]`, and an example is

    inputs  = window[:-1]   # [S]
    targets = window[1:]    # [S]  the next token of every input, so every token is trained on
    mask    = 1             # [S]  (0 only on the padding rows of a short final validation batch)

The windows are a random-access `grain.MapDataset`, so the whole order is a pure function of the seed:

    MapDataset.source(windows)       # [N] examples
      .shuffle(seed)                 # a global permutation, different every epoch (seed, epoch)
      .repeat()                      # infinite
      [process_index::process_count] # this process's shard: disjoint from every other process
      .batch(B // process_count)     # [B_local, S]

Shuffling before sharding makes the data order independent of the topology: global batch k is the
same B examples on one process or on many (process p holds rows p, p + P, ... of it). The training
iterator's state is grain's, a one-entry dict `{"next_index": k}`: JSON, tiny, and enough to resume
exactly after a restart.

Validation is a fixed list: windows in stream order, batched the same way, the last batch padded (pad
ids, mask 0) so every batch has the same shape and every process gets the same number of batches.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from moejax.data import cache
from moejax.data.config import DataConfig
from moejax.data.sources import Corpus, open_corpus, token_streams
from moejax.data.synthetic import SyntheticDomains
from moejax.data.tokenizers import (
  ByteTokenizer,
  SentencePieceTokenizer,
  Tokenizer,
  train_sentencepiece,
)

log = logging.getLogger(__name__)

Batch = dict[str, np.ndarray]


class PackedWindows:
  """Random-access examples of a packed stream: example i is `stream[i*S : i*S + S + 1]`."""

  def __init__(self, stream: np.ndarray, seq_len: int):
    self._stream = stream
    self._seq_len = seq_len

  def __len__(self) -> int:
    return max(0, (len(self._stream) - 1) // self._seq_len)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"window {index} out of range [0, {len(self)})")
    s = self._seq_len
    window = np.asarray(self._stream[index * s : index * s + s + 1], dtype=np.int32)  # [S + 1]
    return {
      "inputs": window[:-1],  # [S]
      "targets": window[1:],  # [S]
      "mask": np.ones(s, np.float32),  # [S]
    }

  def __repr__(self) -> str:
    return f"PackedWindows({len(self)} windows of {self._seq_len} tokens)"


def make_tokenizer(cfg: DataConfig, *, corpus: Corpus | None = None) -> Tokenizer:
  """The tokenizer `data.tokenizer` names.

  `sentencepiece` without `data.spm_model` trains a model on the corpus's train split (`corpus`, or
  the one `cfg` names) and caches it next to the token caches, keyed by the corpus and vocabulary.
  """
  if cfg.tokenizer == "byte":
    return ByteTokenizer()
  if cfg.spm_model is not None:
    return SentencePieceTokenizer.from_file(os.path.expanduser(cfg.spm_model))
  corpus = corpus or open_corpus(cfg)
  key = cache.fingerprint(corpus.fingerprint, cfg.spm_vocab_size, "bpe-v1")
  path = os.path.join(cache.cache_root(cfg.cache_dir), "tokenizers", f"spm-{key[:24]}.model")
  if not os.path.exists(path):
    log.info("training a %d-piece SentencePiece model on %s", cfg.spm_vocab_size, corpus.name)
    proto = train_sentencepiece((b.text for b in corpus.blocks("train")), cfg.spm_vocab_size)
    cache.atomic_write(path, lambda f: f.write(proto))
  return SentencePieceTokenizer.from_file(path)


class Datasets:
  """The train and validation data of one process. Build it with `build_datasets`."""

  def __init__(
    self,
    *,
    config: DataConfig,
    tokenizer: Tokenizer,
    train: Sequence[dict[str, np.ndarray]],
    validation: Sequence[dict[str, np.ndarray]],
    process_index: int,
    process_count: int,
    info: dict[str, Any],
  ):
    self.config = config
    self.tokenizer = tokenizer
    self.train_source = train
    self.validation_source = validation
    self.process_index = process_index
    self.process_count = process_count
    self.local_batch_size = config.batch_size // process_count
    # Facts for logs and experiment records: sizes, cache path and whether it was hit.
    self.info = info

  @property
  def vocab_size(self) -> int:
    return self.tokenizer.vocab_size

  def train_dataset(self) -> grain.IterDataset:
    """The infinite, shuffled, sharded, batched training data as a grain `IterDataset`."""
    cfg = self.config
    ds = grain.MapDataset.source(self.train_source).shuffle(seed=cfg.seed).repeat()
    ds = ds[self.process_index :: self.process_count]
    ds = ds.batch(self.local_batch_size, drop_remainder=True)
    # Windows are slices of an in-memory (or memory-mapped) stream: one thread is plenty.
    read = grain.ReadOptions(
      num_threads=1 if cfg.prefetch else 0, prefetch_buffer_size=cfg.prefetch
    )
    return ds.to_iter_dataset(read)

  def train_iter(self) -> grain.DatasetIterator:
    """A fresh iterator over training batches from step 0; resume it with `set_state`.

    Yields dicts of numpy arrays: `inputs`, `targets` (int32 [B_local, S]), `mask` (float32
    [B_local, S]) and, for `synthetic`, `domain` (int32 [B_local]). `get_state()` is JSON.
    """
    return iter(self.train_dataset())

  @property
  def num_val_batches(self) -> int:
    """Validation batches per process (the same on every process)."""
    return -(-len(self.validation_source) // self.config.batch_size)

  def val_batches(self, num_batches: int | None = None) -> list[Batch]:
    """The validation split as a list of batches: the same on every call, finite, never shuffled.

    Rows past the end of the split (in the last batch) are padding: `pad_id` tokens, `mask` 0 and,
    for `synthetic`, `domain` -1.

    Args:
      num_batches: at most this many (the first ones); None for the whole split.
    """
    n = self.num_val_batches if num_batches is None else min(num_batches, self.num_val_batches)
    batch_size, count = self.config.batch_size, len(self.validation_source)
    template = self.validation_source[0] if count else None
    batches = []
    for k in range(n):
      rows = []
      for j in range(self.local_batch_size):
        i = k * batch_size + j * self.process_count + self.process_index
        rows.append(self.validation_source[i] if i < count else self._padding(template))
      batches.append({key: np.stack([r[key] for r in rows]) for key in template})
    return batches

  def _padding(self, template: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    row = {key: np.full_like(value, self.tokenizer.pad_id) for key, value in template.items()}
    row["mask"] = np.zeros_like(template["mask"])
    if "domain" in row:
      row["domain"] = np.full_like(template["domain"], -1)
    return row

  def __repr__(self) -> str:
    return (
      f"Datasets({self.config.source}, {self.tokenizer!r}, train={self.train_source!r}, "
      f"validation={self.validation_source!r}, process {self.process_index}/{self.process_count})"
    )


def build_datasets(
  cfg: DataConfig, *, process_index: int | None = None, process_count: int | None = None
) -> Datasets:
  """Opens (and on first use tokenizes and caches) the data `cfg` describes, for one process.

  Args:
    cfg: the data config.
    process_index: this process's index; None for `jax.process_index()`.
    process_count: processes reading disjoint shards; None for `jax.process_count()`.

  Raises:
    ValueError: naming the config field, when the batch does not split over the processes or a
      split is too short for one window.
  """
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} is not in [0, process_count={process_count})")
  if cfg.batch_size % process_count:
    raise ValueError(
      f"train.batch_size={cfg.batch_size} is invalid: it must divide evenly over "
      f"{process_count} processes (each reads batch_size // process_count examples per step)"
    )

  if cfg.source == "synthetic":
    tokenizer = ByteTokenizer()
    num_val = (
      0 if cfg.val_fraction == 0 else max(1, round(cfg.synthetic_examples * cfg.val_fraction))
    )
    kwargs = dict(num_domains=cfg.num_domains, seq_len=cfg.seq_len, seed=cfg.synthetic_seed)
    train = SyntheticDomains(num_examples=cfg.synthetic_examples, split="train", **kwargs)
    validation = SyntheticDomains(num_examples=num_val, split="validation", **kwargs)
    info = {"domains": [d.name for d in train.domains]}
  else:
    corpus = open_corpus(cfg)
    tokenizer = make_tokenizer(cfg, corpus=corpus)
    streams = token_streams(corpus, tokenizer, cfg.cache_dir)
    train = PackedWindows(streams.train, cfg.seq_len)
    validation = PackedWindows(streams.validation, cfg.seq_len)
    info = {
      "train_tokens": int(streams.train.size),
      "validation_tokens": int(streams.validation.size),
      "cache_path": streams.path,
      "cache_hit": streams.cache_hit,
      "seconds": streams.seconds,
    }
    if hasattr(corpus, "total_bytes"):
      info["corpus_bytes"] = corpus.total_bytes
    short = "the corpus is too small: raise data.max_bytes, add text, or lower train.seq_len"
    if len(train) == 0:
      raise ValueError(
        f"the train split has {streams.train.size} tokens, fewer than train.seq_len + 1 = "
        f"{cfg.seq_len + 1}; {short}"
      )
    if cfg.val_fraction > 0 and len(validation) == 0:
      raise ValueError(
        f"data.val_fraction={cfg.val_fraction} leaves a validation split of "
        f"{streams.validation.size} tokens, fewer than train.seq_len + 1 = {cfg.seq_len + 1}; "
        f"{short}, or set data.val_fraction=0"
      )
  info.update(train_examples=len(train), validation_examples=len(validation))
  return Datasets(
    config=cfg,
    tokenizer=tokenizer,
    train=train,
    validation=validation,
    process_index=process_index,
    process_count=process_count,
    info=info,
  )

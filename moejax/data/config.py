"""`DataConfig`: the frozen, self-validating description of where training tokens come from.

The experiment ConfigDict keeps data settings under `config.data` and the shape of a batch under
`config.train`; `DataConfig.from_config(config.data, seq_len=..., batch_size=..., seed=...)` joins
the two into one small dataclass that the data package takes instead of the whole ConfigDict. Every
rule that can be checked without touching data is checked in `__post_init__`, and each error names
the config field as the experiment file spells it (`data.source`, `train.batch_size`), the value
given and what is allowed.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any, NoReturn

SOURCES = ("stdlib", "text", "tfds", "synthetic")
TOKENIZERS = ("byte", "sentencepiece")
# Fields that come from `config.train`, not `config.data`; errors about them name `train.<field>`.
_TRAIN_FIELDS = ("seq_len", "batch_size", "seed")


def field_name(field: str) -> str:
  """The field as an experiment config spells it: `data.<field>` or `train.<field>`."""
  return f"train.{field}" if field in _TRAIN_FIELDS else f"data.{field}"


def fail(field: str, value: Any, allowed: str) -> NoReturn:
  """Raises the package's standard error for a bad config value."""
  raise ValueError(f"{field_name(field)}={value!r} is invalid: {allowed}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
  """Where the tokens come from, how they are tokenized, and the batch shape they are cut into.

  The defaults train on the embedded `stdlib` corpus with the byte tokenizer: real text that every
  machine has, with no download.
  """

  # Corpus: one of SOURCES. `stdlib`: the running Python's standard-library sources (embedded
  # default, no download). `text`: local text files (`path`). `tfds`: a TensorFlow Datasets data
  # set read through array_record (`tfds_name`). `synthetic`: K generated domains with known labels.
  source: str = "stdlib"
  # `text` source: a directory (read recursively, hidden and binary files skipped) or a glob
  # (`**` allowed), `~` expanded.
  path: str | None = None
  # `tfds` source: the registered name, e.g. "lm1b", "wikitext/wikitext-103-raw-v1",
  # "tiny_shakespeare".
  tfds_name: str | None = None
  # `tfds` source: where prepared data lives (None: $TFDS_DATA_DIR or ~/tensorflow_datasets).
  tfds_data_dir: str | None = None
  # `tfds` source: the string feature that holds the text of one document.
  tfds_text_key: str = "text"
  # `tfds` source: split names. A data set without `tfds_val_split` gets `val_fraction` of its
  # train documents carved out as validation instead.
  tfds_train_split: str = "train"
  tfds_val_split: str = "validation"
  # `tfds` source: download and prepare the data set when it is not in `tfds_data_dir` yet (needs a
  # network). False: expect prepared data and fail fast otherwise.
  tfds_download: bool = True
  # Tokenizer: one of TOKENIZERS. `byte`: UTF-8 bytes plus a document separator (no training).
  tokenizer: str = "byte"
  # `sentencepiece`: a local .model file. None: train one on the train split (cached).
  spm_model: str | None = None
  # Vocabulary size of a SentencePiece model trained here (must hold 256 byte-fallback pieces).
  spm_vocab_size: int = 512
  # Fraction of documents held out for validation, picked by a hash of each document's name, so the
  # split is the same on every run and machine. 0 = no validation split. A tfds data set with its own
  # validation split uses that instead, reading at most val_fraction * max_bytes of it.
  val_fraction: float = 0.05
  # Cap on the corpus bytes read for `stdlib`, `text` and `tfds` (None = everything). Python's
  # standard library without its tests is about 12 MB, so the default keeps all of it.
  max_bytes: int | None = 16_000_000
  # `synthetic` source: number of domains K, each a distinct generative process.
  num_domains: int = 4
  # `synthetic` source: examples in one train epoch (validation gets val_fraction as many).
  synthetic_examples: int = 65_536
  # `synthetic` source: seed of the domains' processes (kept apart from `train.seed` so that runs
  # with different seeds see the same task).
  synthetic_seed: int = 0
  # Token caches and trained tokenizers live here (None: $MOEJAX_CACHE or ~/.cache/moejax).
  cache_dir: str | None = None
  # Batches prepared ahead by one background thread; 0 = read on the calling thread.
  prefetch: int = 2
  # From `config.train`: tokens per example S, global batch size B, shuffle seed.
  seq_len: int = 256
  batch_size: int = 8
  seed: int = 0

  def __post_init__(self):
    if self.source not in SOURCES:
      fail("source", self.source, f"one of {SOURCES}")
    if self.tokenizer not in TOKENIZERS:
      fail("tokenizer", self.tokenizer, f"one of {TOKENIZERS}")
    if self.source == "text" and not self.path:
      fail("path", self.path, "data.source='text' needs a directory or glob of text files")
    if self.source == "tfds" and not self.tfds_name:
      fail("tfds_name", self.tfds_name, "data.source='tfds' needs a data set name, e.g. 'lm1b'")
    if self.source == "synthetic" and self.tokenizer != "byte":
      fail("tokenizer", self.tokenizer, "data.source='synthetic' emits byte ids; use 'byte'")
    if self.spm_model is not None and not os.path.isfile(os.path.expanduser(self.spm_model)):
      fail("spm_model", self.spm_model, "no such file; give a SentencePiece .model path or None")
    if self.spm_vocab_size < 260:
      fail("spm_vocab_size", self.spm_vocab_size, "at least 260 (256 byte pieces + specials)")
    if not 0.0 <= self.val_fraction < 1.0:
      fail("val_fraction", self.val_fraction, "a fraction in [0, 1)")
    if self.max_bytes is not None and self.max_bytes < 1:
      fail("max_bytes", self.max_bytes, "a positive number of bytes, or None for no cap")
    if not 1 <= self.num_domains <= 256:
      fail("num_domains", self.num_domains, "between 1 and 256")
    if self.synthetic_examples < 1:
      fail("synthetic_examples", self.synthetic_examples, "at least 1")
    if self.prefetch < 0:
      fail("prefetch", self.prefetch, "0 or more batches")
    if self.seq_len < 1:
      fail("seq_len", self.seq_len, "at least 1 token")
    if self.batch_size < 1:
      fail("batch_size", self.batch_size, "at least 1 example")
    if not 0 <= self.seed < 2**32:
      fail("seed", self.seed, "an integer in [0, 2**32)")

  @classmethod
  def from_config(
    cls,
    data: Mapping[str, Any] | Any | None,
    *,
    seq_len: int,
    batch_size: int,
    seed: int,
  ) -> DataConfig:
    """Builds a `DataConfig` from `config.data` (a ConfigDict or mapping) and `config.train` values.

    Args:
      data: the experiment's `config.data`; None or empty for all defaults.
      seq_len: `config.train.seq_len`.
      batch_size: `config.train.batch_size` (global, over all processes).
      seed: `config.train.seed`.

    Raises:
      ValueError: a key of `config.data` is not a `DataConfig` field, or a value is invalid.
    """
    if data is None:
      values = {}
    elif hasattr(data, "to_dict"):  # ml_collections.ConfigDict / FrozenConfigDict
      values = dict(data.to_dict())
    else:
      values = dict(data)
    known = {f.name for f in dataclasses.fields(cls)} - set(_TRAIN_FIELDS)
    for key in values:
      if key not in known:
        raise ValueError(f"data.{key} is not a data config field; known fields: {sorted(known)}")
    return cls(**values, seq_len=seq_len, batch_size=batch_size, seed=seed)

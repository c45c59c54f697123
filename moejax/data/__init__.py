"""Training data: corpora, tokenizers and the grain pipeline that packs them into batches.

    cfg = DataConfig.from_config(config.data, seq_len=256, batch_size=32, seed=0)
    data = build_datasets(cfg)              # tokenizes and caches the corpus on first use
    it = data.train_iter()                  # infinite; state = it.get_state() (JSON) / it.set_state
    batch = next(it)                        # inputs, targets: int32 [B_local, S]; mask: float32
    val = data.val_batches(num_batches=8)   # fixed list of batches of the same structure

Sources (`data.source`): `stdlib` (the default: the running Python's standard library, real text on
every machine with no download), `text` (local files), `tfds` (TensorFlow Datasets via array_record)
and `synthetic` (K generated domains, each example labelled with its `domain`). Tokenizers
(`data.tokenizer`): `byte` (UTF-8 bytes, vocab 264, EOS 256, PAD 257) and `sentencepiece`.

Modules: config.py (DataConfig), tokenizers.py, sources.py (corpora, split, packing, cache),
synthetic.py (the multi-domain generator), pipeline.py (grain pipeline, Datasets), cache.py.
"""

from moejax.data.config import SOURCES, TOKENIZERS, DataConfig
from moejax.data.pipeline import Datasets, PackedWindows, build_datasets, make_tokenizer
from moejax.data.sources import SPLITS, Corpus, open_corpus
from moejax.data.synthetic import DOMAIN_KINDS, SyntheticDomains, make_domains
from moejax.data.tokenizers import (
  BYTE_EOS_ID,
  BYTE_PAD_ID,
  BYTE_VOCAB_SIZE,
  ByteTokenizer,
  SentencePieceTokenizer,
  Tokenizer,
  train_sentencepiece,
)

__all__ = [
  "BYTE_EOS_ID",
  "BYTE_PAD_ID",
  "BYTE_VOCAB_SIZE",
  "DOMAIN_KINDS",
  "SOURCES",
  "SPLITS",
  "TOKENIZERS",
  "ByteTokenizer",
  "Corpus",
  "DataConfig",
  "Datasets",
  "PackedWindows",
  "SentencePieceTokenizer",
  "SyntheticDomains",
  "Tokenizer",
  "build_datasets",
  "make_domains",
  "make_tokenizer",
  "open_corpus",
  "train_sentencepiece",
]

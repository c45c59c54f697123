"""Tokenizers: UTF-8 bytes by default, SentencePiece as an option.

Every tokenizer has the same small interface (`Tokenizer`): `encode(str) -> int32 array`,
`decode(ids) -> str`, `vocab_size`, `eos_id`, `pad_id`, and a `fingerprint` that names its exact
behaviour for the token cache.

`eos_id` is the *document separator*: the packed token stream is `EOS doc0 EOS doc1 ...`, so the same
token ends one document and begins the next (it doubles as BOS), and the model learns where documents
end. `pad_id` fills the rows of a short final validation batch, whose loss `mask` is 0; packed
training batches never contain it.

Byte tokenizer ids (`ByteTokenizer`):

    0..255   the UTF-8 bytes themselves (id == byte value), so any text round-trips exactly
    256      EOS, the document separator
    257      PAD
    258..263 reserved, never produced; vocab_size = 264 rounds 258 up to a multiple of 8 so the
             embedding and output matrices tile evenly

SentencePiece (Kudo & Richardson, 2018) models trained here keep text exactly: no normalisation, no
whitespace folding (indentation is meaningful in code), and byte fallback, so a character the model
has no piece for becomes its UTF-8 bytes instead of <unk>. Their special ids are PAD=0, UNK=1, EOS=2.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterable, Iterator, Sequence
from typing import Protocol, runtime_checkable

import numpy as np

BYTE_EOS_ID = 256
BYTE_PAD_ID = 257
BYTE_VOCAB_SIZE = 264


@runtime_checkable
class Tokenizer(Protocol):
  """What the data pipeline (and generation) needs from a tokenizer."""

  @property
  def vocab_size(self) -> int:
    """Rows the embedding needs: every id `encode` can return is below it."""
    ...

  @property
  def eos_id(self) -> int:
    """The document separator."""
    ...

  @property
  def pad_id(self) -> int:
    """Fills masked-out positions."""
    ...

  @property
  def fingerprint(self) -> str:
    """A string that changes whenever `encode` could give different ids."""
    ...

  def encode(self, text: str) -> np.ndarray:
    """Token ids of `text` (int32 [N]), without separators."""
    ...

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Text of `ids`; special ids are dropped."""
    ...


class ByteTokenizer:
  """UTF-8 bytes as tokens: ids 0..255 are bytes, 256 EOS, 257 PAD, vocab_size 264."""

  vocab_size = BYTE_VOCAB_SIZE
  eos_id = BYTE_EOS_ID
  pad_id = BYTE_PAD_ID
  fingerprint = "byte-v1"

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    ids = np.asarray(ids).reshape(-1)
    data = ids[(ids >= 0) & (ids < 256)].astype(np.uint8).tobytes()
    return data.decode("utf-8", errors="replace")

  def __repr__(self) -> str:
    return "ByteTokenizer(vocab_size=264, eos_id=256, pad_id=257)"


class SentencePieceTokenizer:
  """A SentencePiece model (loaded from a serialized `ModelProto`)."""

  def __init__(self, model_proto: bytes, *, source: str = "<bytes>"):
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top

    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self._source = source
    self.vocab_size = int(self._sp.get_piece_size())
    if self._sp.eos_id() < 0:
      raise ValueError(
        f"data.spm_model={source!r} is invalid: the model has no EOS piece, which the packed "
        "stream needs as its document separator; train it with eos_id >= 0"
      )
    self.eos_id = int(self._sp.eos_id())
    # A model without a pad piece pads with EOS; padded positions are masked out of the loss anyway.
    self.pad_id = int(self._sp.pad_id()) if self._sp.pad_id() >= 0 else self.eos_id
    self.fingerprint = "spm-" + hashlib.sha256(model_proto).hexdigest()[:32]

  @classmethod
  def from_file(cls, path: str) -> SentencePieceTokenizer:
    with open(path, "rb") as f:
      return cls(f.read(), source=path)

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._sp.encode(text), dtype=np.int32)

  def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
    return [np.asarray(ids, dtype=np.int32) for ids in self._sp.encode(texts)]

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    return self._sp.decode([int(i) for i in np.asarray(ids).reshape(-1)])

  def __repr__(self) -> str:
    return f"SentencePieceTokenizer({self._source!r}, vocab_size={self.vocab_size})"


def _chunks(texts: Iterable[str], chunk_chars: int, max_chars: int) -> Iterator[str]:
  """Cuts texts into training "sentences" of at most `chunk_chars`, `max_chars` in all."""
  total = 0
  for text in texts:
    for start in range(0, len(text), chunk_chars):
      piece = text[start : start + chunk_chars]
      yield piece
      total += len(piece)
      if total >= max_chars:
        return


def train_sentencepiece(
  texts: Iterable[str],
  vocab_size: int,
  *,
  max_chars: int = 8_000_000,
  model_type: str = "bpe",
) -> bytes:
  """Trains a SentencePiece model on `texts` and returns the serialized model.

  Args:
    texts: training documents (the train split only, so validation text stays unseen).
    vocab_size: pieces in the model, including 256 byte-fallback pieces and PAD/UNK/EOS.
    max_chars: read at most this many characters; more rarely changes a small vocabulary.
    model_type: "bpe" (Sennrich et al., 2016) or "unigram" (Kudo, 2018).

  Raises:
    ValueError: naming `data.spm_vocab_size` when SentencePiece rejects the vocabulary size.
  """
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top

  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
      sentence_iterator=_chunks(texts, chunk_chars=2048, max_chars=max_chars),
      model_writer=model,
      vocab_size=vocab_size,
      model_type=model_type,
      # Keep text exactly: code depends on whitespace, and decode(encode(s)) must give s back.
      normalization_rule_name="identity",
      remove_extra_whitespaces=False,
      add_dummy_prefix=False,
      allow_whitespace_only_pieces=True,
      split_digits=True,
      byte_fallback=True,
      character_coverage=0.9995,
      max_sentence_length=16384,
      pad_id=0,
      unk_id=1,
      eos_id=2,
      bos_id=-1,
      num_threads=2,
      minloglevel=2,
    )
  except RuntimeError as e:
    raise ValueError(
      f"data.spm_vocab_size={vocab_size!r} is invalid for this corpus: SentencePiece says: {e}"
    ) from e
  return model.getvalue()

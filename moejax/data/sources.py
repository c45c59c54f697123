"""Text corpora (`stdlib`, `text`, `tfds`), their train/validation split, and the packed token streams.

A corpus is a list of documents with stable names. This module turns one into two packed token
streams, one per split, and caches them (see `cache.py`):

1. **Select.** `data.max_bytes` caps what is read. Files are taken in an order set by a hash of their
   names, so a cap samples the whole corpus rather than its alphabetical head; the file that crosses
   the cap is cut short. `tfds` records are taken in their stored (already shuffled) order.
2. **Split.** A document goes to validation when a hash of its name, read as a number in [0, 1), is
   below `data.val_fraction`. The split is therefore the same on every run and machine, and does not
   move when the cap or the seed changes. Files over 64 KiB are split into 64 KiB blocks (at line
   ends) first, so one large file (a novel, a log) still yields both splits. If hashing leaves a
   split empty, the unit with the lowest (highest) hash is moved over, so both splits are non-empty
   whenever there are two units.
3. **Pack.** Each split becomes one stream `EOS doc0 EOS doc1 ... EOS docN EOS` (consecutive blocks
   of one file are joined without a separator). The pipeline later cuts it into windows.

Sources:

- `stdlib`: the running Python's standard library (`sysconfig.get_paths()["stdlib"]`), every `*.py`
  outside test folders and site-packages: about 12 MB of real, varied text (code, docstrings,
  comments) present on every machine, with no download.
- `text`: a directory (read recursively; hidden and binary files skipped) or a glob of files.
- `tfds`: a TensorFlow Datasets data set read with `tfds.data_source` (array_record; no TensorFlow
  needed). With `data.tfds_download` it is downloaded and prepared first; data already in
  `data.tfds_data_dir` is never downloaded again.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import glob
import hashlib
import json
import logging
import math
import os
import sys
import sysconfig
import time
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np

from moejax.data import cache
from moejax.data.config import DataConfig, fail
from moejax.data.tokenizers import Tokenizer

log = logging.getLogger(__name__)

SPLITS = ("train", "validation")
# Files longer than this are split into blocks (at line ends) before the train/validation split.
BLOCK_BYTES = 64 * 1024
# Bump when the stream layout changes, so old cache entries are not read.
_STREAM_FORMAT = 1
# Folders of the standard library that are not its own source (or are mostly test data).
_STDLIB_SKIP_DIRS = frozenset(
  {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
)


class Block(NamedTuple):
  """One unit of a split: block `index` of document `doc`."""

  doc: str
  index: int
  text: str


def unit_hash(key: str, salt: str) -> float:
  """A stable hash of `key` as a number in [0, 1); `salt` makes independent hashes."""
  digest = hashlib.blake2b(f"{salt}:{key}".encode(), digest_size=8).digest()
  return int.from_bytes(digest, "little") / 2.0**64


def assign_validation(keys: Sequence[str], val_fraction: float) -> list[bool]:
  """Which units (by name) are validation: a hash below `val_fraction`, both splits kept non-empty."""
  hashes = [unit_hash(k, "split") for k in keys]
  is_val = [h < val_fraction for h in hashes]
  if val_fraction > 0 and len(keys) >= 2:
    if not any(is_val):
      is_val[int(np.argmin(hashes))] = True
    if all(is_val):
      is_val[int(np.argmax(hashes))] = False
  return is_val


def _block_cuts(data: bytes) -> list[int]:
  """Byte offsets cutting `data` into blocks of about BLOCK_BYTES that end at a newline."""
  n = max(1, math.ceil(len(data) / BLOCK_BYTES))
  cuts = [0]
  for i in range(1, n):
    newline = data.find(b"\n", i * BLOCK_BYTES)
    cuts.append(max(cuts[-1], len(data) if newline < 0 else newline + 1))
  cuts.append(len(data))
  return cuts


class Corpus(abc.ABC):
  """Documents split into train and validation; `fingerprint` names the content for the cache."""

  name: str

  @property
  @abc.abstractmethod
  def fingerprint(self) -> str:
    """Changes whenever `blocks` could yield something different. Cheap: no document is read."""

  @abc.abstractmethod
  def blocks(self, split: str) -> Iterator[Block]:
    """The split's blocks in a fixed order; consecutive blocks of one document are adjacent."""


@dataclasses.dataclass(frozen=True)
class _File:
  key: str  # stable name: the path relative to the corpus root
  path: str
  size: int
  mtime_ns: int


class FileCorpus(Corpus):
  """Files on disk (`stdlib`, `text`), capped at `max_bytes` and split by block."""

  def __init__(
    self,
    name: str,
    files: Sequence[_File],
    *,
    max_bytes: int | None,
    val_fraction: float,
    identity: Any,
  ):
    self.name = name
    self._files = sorted(files, key=lambda f: f.key)
    self._max_bytes = max_bytes
    self._val_fraction = val_fraction
    self._identity = identity
    # How many bytes of each file to read: all of them, in hash order, until the cap.
    remaining = math.inf if max_bytes is None else max_bytes
    self._take = {}
    for f in sorted(self._files, key=lambda f: unit_hash(f.key, "order")):
      take = int(min(f.size, remaining))
      if take > 0:
        self._take[f.key] = take
      remaining -= take
    # The split of every block, computed from sizes alone.
    units = [
      (f.key, b)
      for f in self._files
      if f.key in self._take
      for b in range(math.ceil(self._take[f.key] / BLOCK_BYTES))
    ]
    is_val = assign_validation([f"{k}#{b}" for k, b in units], val_fraction)
    self._split = {u: "validation" if v else "train" for u, v in zip(units, is_val, strict=True)}
    self.total_bytes = sum(self._take.values())

  @functools.cached_property
  def fingerprint(self) -> str:
    listing = [(f.key, f.size, f.mtime_ns) for f in self._files]
    return cache.fingerprint(
      self.name,
      self._identity,
      listing,
      self._max_bytes,
      self._val_fraction,
      BLOCK_BYTES,
      _STREAM_FORMAT,
    )

  def blocks(self, split: str) -> Iterator[Block]:
    for f in self._files:
      take = self._take.get(f.key, 0)
      n = math.ceil(take / BLOCK_BYTES)
      if not any(self._split[(f.key, b)] == split for b in range(n)):
        continue
      with open(f.path, "rb") as fh:
        data = fh.read(take)
      cuts = _block_cuts(data)
      # Both counts are ceil(len / BLOCK_BYTES); fewer only if the file shrank since it was listed.
      for b in range(min(n, len(cuts) - 1)):
        if self._split[(f.key, b)] == split and cuts[b + 1] > cuts[b]:
          yield Block(f.key, b, data[cuts[b] : cuts[b + 1]].decode("utf-8", errors="replace"))


def _stat(path: str, key: str) -> _File:
  st = os.stat(path)
  return _File(key=key, path=path, size=st.st_size, mtime_ns=st.st_mtime_ns)


def stdlib_corpus(cfg: DataConfig) -> FileCorpus:
  """The running Python's standard-library sources, without tests and site-packages."""
  root = sysconfig.get_paths()["stdlib"]
  files = []
  for folder, dirs, names in os.walk(root):
    dirs[:] = sorted(d for d in dirs if d not in _STDLIB_SKIP_DIRS and not d.startswith("."))
    for name in names:
      if name.endswith(".py"):
        path = os.path.join(folder, name)
        files.append(_stat(path, os.path.relpath(path, root).replace(os.sep, "/")))
  # Python's version names the content; file mtimes differ between installs of the same Python.
  files = [dataclasses.replace(f, mtime_ns=0) for f in files]
  return FileCorpus(
    "stdlib",
    files,
    max_bytes=cfg.max_bytes,
    val_fraction=cfg.val_fraction,
    identity=(sys.version, root),
  )


def _is_binary(path: str) -> bool:
  with open(path, "rb") as f:
    return b"\0" in f.read(4096)


def text_corpus(cfg: DataConfig) -> FileCorpus:
  """Local text files: every file under a directory, or the files a glob matches."""
  pattern = os.path.expanduser(cfg.path)
  if os.path.isdir(pattern):
    root = os.path.abspath(pattern)
    paths = []
    for folder, dirs, names in os.walk(root):
      dirs[:] = sorted(d for d in dirs if not d.startswith("."))
      paths += [os.path.join(folder, n) for n in names if not n.startswith(".")]
  else:
    paths = [os.path.abspath(p) for p in glob.glob(pattern, recursive=True)]
    root = os.path.commonpath([os.path.dirname(p) for p in paths]) if paths else ""
  paths = sorted(p for p in paths if os.path.isfile(p) and not _is_binary(p))
  if not paths:
    fail("path", cfg.path, "it matches no text files; give a directory or a glob of text files")
  files = [_stat(p, os.path.relpath(p, root).replace(os.sep, "/")) for p in paths]
  return FileCorpus(
    "text",
    files,
    max_bytes=cfg.max_bytes,
    val_fraction=cfg.val_fraction,
    identity=root,
  )


def ensure_importlib_resources() -> None:
  """Works around tfds 4.9.10 needing the `importlib_resources` backport it does not declare.

  `DatasetBuilder.code_path` (reached by `download_and_prepare`) imports `importlib_resources`, which
  tfds requires only for Python < 3.9 (tensorflow/datasets#11212). The standard library's
  `importlib.resources` has the `abc.Traversable` it needs, so it stands in when the backport is
  missing; installing `importlib_resources` makes this a no-op.
  """
  try:
    import importlib_resources  # noqa: F401  # pylint: disable=g-import-not-at-top,unused-import
  except ModuleNotFoundError:
    import importlib.resources  # pylint: disable=g-import-not-at-top
    import importlib.resources.abc  # noqa: F401  # pylint: disable=g-import-not-at-top

    sys.modules.setdefault("importlib_resources", importlib.resources)


class TfdsCorpus(Corpus):
  """A tfds data set through `tfds.data_source` (array_record), one record per document."""

  def __init__(self, cfg: DataConfig):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    ensure_importlib_resources()

    self.name = "tfds-" + cfg.tfds_name.replace("/", "_").replace(":", "_")
    self._cfg = cfg
    data_dir = os.path.expanduser(cfg.tfds_data_dir) if cfg.tfds_data_dir else None
    try:
      splits = tfds.data_source(
        cfg.tfds_name, split=None, data_dir=data_dir, download=cfg.tfds_download
      )
    except Exception as e:  # tfds raises many kinds; the cause is kept
      raise ValueError(
        f"data.tfds_name={cfg.tfds_name!r} could not be opened from "
        f"data.tfds_data_dir={cfg.tfds_data_dir!r} (data.tfds_download={cfg.tfds_download}): {e}"
      ) from e
    self._sources = {str(k): v for k, v in splits.items()}
    self._memo = {}
    if cfg.tfds_train_split not in self._sources:
      fail("tfds_train_split", cfg.tfds_train_split, f"one of the splits {sorted(self._sources)}")
    # No validation split of its own: carve val_fraction of the train records out instead.
    self._carve = cfg.tfds_val_split not in self._sources
    self._identity = (
      cfg.tfds_name,
      os.path.abspath(data_dir) if data_dir else None,
      cfg.tfds_train_split,
      None if self._carve else cfg.tfds_val_split,
      {k: len(v) for k, v in self._sources.items()},
      cfg.tfds_text_key,
      cfg.max_bytes,
      cfg.val_fraction,
      _STREAM_FORMAT,
    )

  @property
  def fingerprint(self) -> str:
    return cache.fingerprint(self.name, self._identity)

  def _read(self, split: str, max_bytes: float) -> list[bytes]:
    """The split's texts (UTF-8) in stored order, until `max_bytes` (the last one cut short)."""
    if (split, max_bytes) in self._memo:  # carving reads the train split for both splits
      return self._memo[(split, max_bytes)]
    source, key = self._sources[split], self._cfg.tfds_text_key
    texts, total = [], 0
    for start in range(0, len(source), 256):
      for record in source.__getitems__(list(range(start, min(start + 256, len(source))))):
        if key not in record:
          fail("tfds_text_key", key, f"records of {self._cfg.tfds_name!r} have {sorted(record)}")
        value = record[key]
        data = value if isinstance(value, bytes) else str(value).encode("utf-8")
        texts.append(data[: int(min(len(data), max_bytes - total))])
        total += len(texts[-1])
        if total >= max_bytes:
          break
      if total >= max_bytes:
        break
    self._memo = {(split, max_bytes): texts}
    return texts

  def blocks(self, split: str) -> Iterator[Block]:
    cap = math.inf if self._cfg.max_bytes is None else self._cfg.max_bytes
    if self._carve or split == "train":
      texts = self._read(self._cfg.tfds_train_split, cap)
    elif self._cfg.val_fraction > 0:
      # The data set's own validation split, capped at the share val_fraction gives it.
      texts = self._read(self._cfg.tfds_val_split, cap * self._cfg.val_fraction)
    else:
      return
    # Records over BLOCK_BYTES (tiny_shakespeare is one record per split) are split into blocks.
    cuts = [_block_cuts(data) for data in texts]
    units = [(i, b) for i, c in enumerate(cuts) for b in range(len(c) - 1)]
    if self._carve:
      is_val = assign_validation([f"{i}#{b}" for i, b in units], self._cfg.val_fraction)
    else:
      is_val = [split == "validation"] * len(units)
    for (i, b), v in zip(units, is_val, strict=True):
      if v == (split == "validation"):
        text = texts[i][cuts[i][b] : cuts[i][b + 1]].decode("utf-8", errors="replace")
        yield Block(str(i), b, text)


def open_corpus(cfg: DataConfig) -> Corpus:
  """The corpus `data.source` names (not `synthetic`, which is generated, see synthetic.py)."""
  if cfg.source == "stdlib":
    return stdlib_corpus(cfg)
  if cfg.source == "text":
    return text_corpus(cfg)
  if cfg.source == "tfds":
    return TfdsCorpus(cfg)
  fail("source", cfg.source, "open_corpus reads 'stdlib', 'text' or 'tfds'")


def pack(blocks: Iterator[Block], tokenizer: Tokenizer) -> np.ndarray:
  """One stream `EOS doc0 EOS doc1 ... EOS`; a block continuing the previous one gets no EOS."""
  dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.int32
  eos = np.array([tokenizer.eos_id], dtype)
  pieces, previous = [], None
  for block in blocks:
    if previous != (block.doc, block.index - 1):
      pieces.append(eos)
    pieces.append(tokenizer.encode(block.text).astype(dtype))
    previous = (block.doc, block.index)
  pieces.append(eos)
  return np.concatenate(pieces)


@dataclasses.dataclass(frozen=True)
class TokenStreams:
  """The packed stream of each split, and where it was cached."""

  train: np.ndarray
  validation: np.ndarray
  path: str
  cache_hit: bool
  seconds: float


def token_streams(corpus: Corpus, tokenizer: Tokenizer, cache_dir: str | None) -> TokenStreams:
  """Packs both splits of `corpus`, or loads them (memory-mapped) from the cache."""
  start = time.perf_counter()
  key = cache.fingerprint(corpus.fingerprint, tokenizer.fingerprint)
  folder = os.path.join(cache.cache_root(cache_dir), "tokens", f"{corpus.name}-{key[:24]}")
  paths = {split: os.path.join(folder, f"{split}.npy") for split in SPLITS}
  hit = all(os.path.exists(p) for p in paths.values())
  if not hit:
    meta = {"corpus": corpus.name, "tokenizer": tokenizer.fingerprint, "tokens": {}}
    for split in SPLITS:
      stream = pack(corpus.blocks(split), tokenizer)
      cache.atomic_write(paths[split], lambda f, s=stream: np.save(f, s, allow_pickle=False))
      meta["tokens"][split] = int(stream.size)
    blob = json.dumps(meta, indent=2).encode()
    cache.atomic_write(os.path.join(folder, "meta.json"), lambda f: f.write(blob))
  streams = {split: np.load(paths[split], mmap_mode="r") for split in SPLITS}
  seconds = time.perf_counter() - start
  log.info(
    "%s tokens: train %d, validation %d (%s %s in %.1f s)",
    corpus.name,
    streams["train"].size,
    streams["validation"].size,
    "cache hit" if hit else "built",
    folder,
    seconds,
  )
  return TokenStreams(**streams, path=folder, cache_hit=hit, seconds=seconds)

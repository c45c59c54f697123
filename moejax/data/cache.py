"""The on-disk cache for tokenized corpora and trained tokenizers.

Tokenizing a corpus is the slow part of building a data pipeline, and its result is a pure function
of the corpus content and the tokenizer. So every cached file is named by a hash of exactly those
inputs (a *fingerprint*): a changed file list, Python version or tokenizer gives a new name, and a
stale entry is never read. Files are written atomically (a unique temporary file in the same folder,
then `os.replace`), so processes that build the same entry at once never see a torn file.

The cache lives in `data.cache_dir`, else `$MOEJAX_CACHE`, else `~/.cache/moejax`. Deleting it is
always safe.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from typing import IO, Any

ENV_VAR = "MOEJAX_CACHE"


def cache_root(cache_dir: str | None = None) -> str:
  """The cache folder: `cache_dir`, else `$MOEJAX_CACHE`, else `~/.cache/moejax`."""
  root = cache_dir or os.environ.get(ENV_VAR) or os.path.join("~", ".cache", "moejax")
  return os.path.abspath(os.path.expanduser(root))


def fingerprint(*parts: Any) -> str:
  """A stable hex digest of JSON-serialisable parts (never Python's salted `hash`)."""
  blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
  return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def atomic_write(path: str, write: Callable[[IO[bytes]], None]) -> None:
  """Calls `write(file)` on a temporary file next to `path`, then renames it onto `path`."""
  folder = os.path.dirname(path)
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
  try:
    with os.fdopen(fd, "wb") as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise

"""Tests of moejax.data: tokenizers, sources, the split, the cache and the grain pipeline.

Every test uses a temporary cache ($MOEJAX_CACHE) and small corpora, and none may reach the network.
"""

import json
import os
import socket

import ml_collections
import numpy as np
import pytest

from moejax import data as md


@pytest.fixture(autouse=True)
def _offline_tmp_cache(tmp_path, monkeypatch):
  """A fresh cache per test, and any attempt to open a network connection fails the test."""
  monkeypatch.setenv("MOEJAX_CACHE", str(tmp_path / "cache"))

  def no_network(*args, **kwargs):
    raise AssertionError(f"network access attempted: {args}")

  monkeypatch.setattr(socket.socket, "connect", no_network)
  monkeypatch.setattr(socket, "create_connection", no_network)


def _config(**kwargs):
  defaults = dict(seq_len=32, batch_size=4, seed=0, prefetch=0, max_bytes=200_000)
  return md.DataConfig(**{**defaults, **kwargs})


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b, strict=True):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])


def _rows(batches):
  return [tuple(row) for b in batches for row in b["inputs"]]


def _write_text_files(folder):
  """A few text files, a hidden one, a binary one and one large file, in two folders."""
  os.makedirs(folder / "sub")
  files = {}
  for i in range(6):
    path = folder / ("sub" if i % 2 else "") / f"doc{i}.txt"
    path.write_text(f"Document {i}: héllo wörld ✓\n" * 40, encoding="utf-8")
    files[path] = path.read_text(encoding="utf-8")
  (folder / ".hidden.txt").write_text("HIDDEN " * 100)
  (folder / "blob.bin").write_bytes(b"\0\1\2BINARY" * 100)
  large = "".join(
    f"line {i} of the large file, long enough to need several blocks\n" for i in range(3000)
  )
  (folder / "large.txt").write_text(large)
  files[folder / "large.txt"] = large
  return files


# Tokenizers.


def test_byte_tokenizer_round_trips_utf8():
  tok = md.ByteTokenizer()
  assert (tok.vocab_size, tok.eos_id, tok.pad_id) == (264, 256, 257)
  text = "def f(x):\n\treturn x  # héllo, 世界, 😀\r\n"
  ids = tok.encode(text)
  assert ids.dtype == np.int32 and ids.max() < 256
  assert list(ids) == list(text.encode("utf-8"))
  assert tok.decode(ids) == text
  # Special ids are dropped from the text.
  assert tok.decode([tok.eos_id, *ids, tok.pad_id]) == text
  assert isinstance(tok, md.Tokenizer)


def test_sentencepiece_trains_on_local_text_and_round_trips(tmp_path):
  text = "".join(f"def function_{i}(x):\n    return x * {i} + 1  # ünïcode\n\n" for i in range(300))
  proto = md.train_sentencepiece([text], vocab_size=320)
  tok = md.SentencePieceTokenizer(proto)
  assert tok.vocab_size == 320 and (tok.pad_id, tok.eos_id) == (0, 2)
  for s in [text[:500], "    indented\n\ttabbed  spaces  ", "never seen: 😀 Ω"]:
    ids = tok.encode(s)
    assert tok.decode(ids) == s
  assert len(tok.encode(text[:500])) < len(text[:500].encode()) / 2  # it learned pieces
  # A saved model loads through the config.
  path = tmp_path / "tiny.model"
  path.write_bytes(proto)
  cfg = _config(tokenizer="sentencepiece", spm_model=str(path))
  loaded = md.make_tokenizer(cfg)
  assert loaded.fingerprint == tok.fingerprint
  np.testing.assert_array_equal(loaded.encode("return x"), tok.encode("return x"))


def test_sentencepiece_trained_on_the_train_split_and_cached(tmp_path):
  folder = tmp_path / "corpus"
  _write_text_files(folder)
  cfg = _config(source="text", path=str(folder), tokenizer="sentencepiece", spm_vocab_size=300)
  data = md.build_datasets(cfg, process_index=0, process_count=1)
  assert data.vocab_size == 300
  batch = next(data.train_iter())
  assert batch["inputs"].max() < 300
  text = data.tokenizer.decode(batch["inputs"].reshape(-1))
  assert "Document" in text or "large file" in text
  again = md.make_tokenizer(cfg)  # a second call loads the cached model
  assert again.fingerprint == data.tokenizer.fingerprint


# Config validation.


@pytest.mark.parametrize(
  ("kwargs", "field"),
  [
    (dict(source="web"), "data.source"),
    (dict(tokenizer="bpe"), "data.tokenizer"),
    (dict(source="text"), "data.path"),
    (dict(source="tfds"), "data.tfds_name"),
    (dict(source="synthetic", tokenizer="sentencepiece"), "data.tokenizer"),
    (dict(spm_model="/no/such/file.model"), "data.spm_model"),
    (dict(spm_vocab_size=100), "data.spm_vocab_size"),
    (dict(val_fraction=1.0), "data.val_fraction"),
    (dict(val_fraction=-0.1), "data.val_fraction"),
    (dict(max_bytes=0), "data.max_bytes"),
    (dict(num_domains=0), "data.num_domains"),
    (dict(synthetic_examples=0), "data.synthetic_examples"),
    (dict(prefetch=-1), "data.prefetch"),
    (dict(seq_len=0), "train.seq_len"),
    (dict(batch_size=0), "train.batch_size"),
    (dict(seed=-1), "train.seed"),
  ],
)
def test_bad_config_values_name_the_field(kwargs, field):
  with pytest.raises(ValueError, match=field.replace(".", r"\.")):
    _config(**kwargs)


def test_from_config_reads_a_config_dict_and_rejects_unknown_fields():
  data = ml_collections.ConfigDict({"source": "synthetic", "num_domains": 3, "path": None})
  cfg = md.DataConfig.from_config(data, seq_len=16, batch_size=2, seed=7)
  assert (cfg.source, cfg.num_domains, cfg.seq_len, cfg.batch_size, cfg.seed) == (
    "synthetic",
    3,
    16,
    2,
    7,
  )
  assert md.DataConfig.from_config(None, seq_len=8, batch_size=1, seed=0).source == "stdlib"
  with pytest.raises(ValueError, match=r"data\.sorce is not a data config field"):
    md.DataConfig.from_config({"sorce": "text"}, seq_len=8, batch_size=1, seed=0)


def test_build_errors_name_the_field(tmp_path):
  with pytest.raises(ValueError, match=r"train\.batch_size=6"):
    md.build_datasets(_config(batch_size=6), process_index=0, process_count=4)
  with pytest.raises(ValueError, match=r"data\.path"):
    md.build_datasets(_config(source="text", path=str(tmp_path / "*.nothing")), process_count=1)
  (tmp_path / "short.txt").write_text("too short")
  with pytest.raises(ValueError, match=r"train\.seq_len"):
    md.build_datasets(_config(source="text", path=str(tmp_path / "short.txt")), process_count=1)


# The embedded stdlib corpus and the cache.


def test_stdlib_corpus_loads_and_second_build_hits_the_cache():
  cfg = _config(max_bytes=150_000)
  first = md.build_datasets(cfg, process_index=0, process_count=1)
  assert not first.info["cache_hit"]
  assert os.path.isfile(os.path.join(first.info["cache_path"], "train.npy"))
  assert first.info["corpus_bytes"] == 150_000
  # Byte tokens: the streams hold every corpus byte plus one EOS per document (and a final one).
  total = first.info["train_tokens"] + first.info["validation_tokens"]
  assert 150_000 < total < 160_000
  second = md.build_datasets(cfg, process_index=0, process_count=1)
  assert second.info["cache_hit"]
  _assert_batches_equal(_take(first.train_iter(), 2), _take(second.train_iter(), 2))
  text = first.tokenizer.decode(first.val_batches(1)[0]["inputs"].reshape(-1))
  assert "def " in text or "import " in text or '"""' in text
  # No temporary files are left behind.
  assert not [f for f in os.listdir(first.info["cache_path"]) if f.startswith(".tmp")]


def test_split_is_by_document_and_deterministic():
  cfg = _config(max_bytes=300_000, val_fraction=0.2)
  corpus = md.open_corpus(cfg)
  keys = {s: [(b.doc, b.index) for b in corpus.blocks(s)] for s in md.SPLITS}
  assert keys["train"] and keys["validation"]
  assert not set(keys["train"]) & set(keys["validation"])
  # Files under 64 KiB are one block: each lies wholly on one side of the split.
  whole = [doc for doc, index in keys["train"] + keys["validation"] if index == 0]
  assert len(whole) == len(set(whole))
  # The same on a rebuild; a different seed does not move it.
  again = md.open_corpus(_config(max_bytes=300_000, val_fraction=0.2, seed=5))
  assert again.fingerprint == corpus.fingerprint
  assert [(b.doc, b.index) for b in again.blocks("validation")] == keys["validation"]


# The pipeline: order, state, packing, sharding.


def test_inputs_and_targets_are_shifted_windows_of_the_stream():
  stream = np.arange(1000, dtype=np.uint16)
  windows = md.PackedWindows(stream, seq_len=10)
  assert len(windows) == 99
  for i in (0, 1, 98):
    ex = windows[i]
    np.testing.assert_array_equal(ex["inputs"], np.arange(10 * i, 10 * i + 10))
    np.testing.assert_array_equal(ex["targets"], ex["inputs"] + 1)
  # Consecutive windows overlap by one token, so every token is a target exactly once.
  assert windows[0]["targets"][-1] == windows[1]["inputs"][0]
  data = md.build_datasets(_config(), process_index=0, process_count=1)
  batch = next(data.train_iter())
  assert batch["inputs"].shape == batch["targets"].shape == batch["mask"].shape == (4, 32)
  assert batch["inputs"].dtype == np.int32 and batch["mask"].dtype == np.float32
  np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
  assert (batch["mask"] == 1).all()


def test_order_depends_only_on_the_seed():
  a = _take(md.build_datasets(_config(seed=1), process_count=1, process_index=0).train_iter(), 3)
  b = _take(md.build_datasets(_config(seed=1), process_count=1, process_index=0).train_iter(), 3)
  c = _take(md.build_datasets(_config(seed=2), process_count=1, process_index=0).train_iter(), 3)
  _assert_batches_equal(a, b)
  assert _rows(a) != _rows(c)
  assert sorted(_rows(a)) != sorted(_rows(c))


@pytest.mark.parametrize("prefetch", [0, 2])
def test_iterator_state_round_trips_across_epochs(prefetch):
  # 10 examples and batches of 4: the 7 batches below cross two epoch boundaries.
  cfg = _config(source="synthetic", synthetic_examples=10, num_domains=3, prefetch=prefetch)
  data = md.build_datasets(cfg, process_index=0, process_count=1)
  it = data.train_iter()
  _take(it, 3)
  state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
  expected = _take(it, 4)
  fresh = md.build_datasets(cfg, process_index=0, process_count=1).train_iter()
  fresh.set_state(state)
  _assert_batches_equal(_take(fresh, 4), expected)
  # Every epoch holds each example once, in a different order.
  first_epochs = _rows(_take(data.train_iter(), 5))  # 20 examples = 2 epochs
  assert sorted(first_epochs[:10]) == sorted(first_epochs[10:])
  assert first_epochs[:10] != first_epochs[10:]


def _numbered(cfg, process_index, process_count):
  """Datasets over streams 0, 1, 2, ...: every window is told apart by its first token."""
  return md.Datasets(
    config=cfg,
    tokenizer=md.ByteTokenizer(),
    train=md.PackedWindows(np.arange(32 * 50 + 1), cfg.seq_len),  # 50 windows
    validation=md.PackedWindows(np.arange(32 * 13 + 1), cfg.seq_len),  # 13 windows
    process_index=process_index,
    process_count=process_count,
    info={},
  )


def _first_tokens(batches):
  return [
    int(row[0]) for b in batches for row, m in zip(b["inputs"], b["mask"], strict=True) if m[0]
  ]


def test_process_shards_are_disjoint_and_form_the_global_batch():
  cfg = _config(batch_size=8)
  # 6 steps of 8 = 48 of the 50 windows: within one epoch no window may repeat.
  single = _take(_numbered(cfg, 0, 1).train_iter(), 6)
  shards = [_take(_numbered(cfg, p, 2).train_iter(), 6) for p in range(2)]
  for p in range(2):
    assert all(b["inputs"].shape == (4, 32) for b in shards[p])
  assert not set(_first_tokens(shards[0])) & set(_first_tokens(shards[1]))
  for step in range(6):
    assert sorted(_first_tokens([shards[0][step], shards[1][step]])) == sorted(
      _first_tokens([single[step]])
    )
  # Validation: disjoint shards with the same batch count that cover every window once.
  vals = [_numbered(cfg, p, 2).val_batches() for p in range(2)]
  assert len(vals[0]) == len(vals[1]) == 2
  assert sorted(_first_tokens(vals[0]) + _first_tokens(vals[1])) == [32 * i for i in range(13)]
  # The same through build_datasets on real text (rows compared as a multiset).
  real = _take(md.build_datasets(cfg, process_index=0, process_count=1).train_iter(), 2)
  parts = [
    _take(md.build_datasets(cfg, process_index=p, process_count=2).train_iter(), 2) for p in (0, 1)
  ]
  for step in range(2):
    assert sorted(_rows([parts[0][step], parts[1][step]])) == sorted(_rows([real[step]]))


def test_val_batches_are_fixed_and_padded():
  data = md.build_datasets(_config(batch_size=3), process_index=0, process_count=1)
  first, second = data.val_batches(), data.val_batches()
  _assert_batches_equal(first, second)
  assert len(first) == data.num_val_batches == -(-len(data.validation_source) // 3)
  assert all(b["inputs"].shape == (3, 32) for b in first)
  assert first[-1]["mask"].sum() == 32 * (len(data.validation_source) - 3 * (len(first) - 1))
  assert (first[-1]["inputs"][first[-1]["mask"] == 0] == data.tokenizer.pad_id).all()
  assert len(data.val_batches(num_batches=2)) == 2


# Local text files.


def test_text_source_reads_a_directory_or_a_glob(tmp_path):
  folder = tmp_path / "corpus"
  files = _write_text_files(folder)
  for path in (str(folder), str(folder / "**" / "*.txt")):
    cfg = _config(source="text", path=path, val_fraction=0.2)
    corpus = md.open_corpus(cfg)
    blocks = [b for split in md.SPLITS for b in corpus.blocks(split)]
    assert {b.doc for b in blocks} == {os.path.relpath(p, folder) for p in files}
    assert "".join(b.text for b in sorted(blocks)) == "".join(
      files[p] for p in sorted(files, key=lambda p: os.path.relpath(p, folder))
    )
    # The large file is split into blocks that land on both sides of the split.
    large = {b.index: s for s in md.SPLITS for b in corpus.blocks(s) if b.doc == "large.txt"}
    assert len(large) > 2 and set(large.values()) == set(md.SPLITS)
    data = md.build_datasets(cfg, process_index=0, process_count=1)
    text = data.tokenizer.decode(
      np.concatenate([b["inputs"].reshape(-1) for b in data.val_batches()])
    )
    assert "HIDDEN" not in text and "BINARY" not in text


def test_text_cache_changes_when_a_file_changes(tmp_path):
  folder = tmp_path / "corpus"
  _write_text_files(folder)
  cfg = _config(source="text", path=str(folder))
  first = md.build_datasets(cfg, process_index=0, process_count=1).info
  (folder / "doc0.txt").write_text("changed\n" * 500)
  second = md.build_datasets(cfg, process_index=0, process_count=1).info
  assert not second["cache_hit"] and second["cache_path"] != first["cache_path"]


# tfds, on tiny data sets built here.


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  from tests.data import tiny_tfds  # pylint: disable=g-import-not-at-top

  data_dir = tmp_path_factory.mktemp("tfds")
  tiny_tfds.prepare(str(data_dir))
  return str(data_dir)


def test_tfds_source_with_its_own_validation_split(tfds_dir):
  from tests.data import tiny_tfds  # pylint: disable=g-import-not-at-top

  cfg = _config(
    source="tfds",
    tfds_name="moejax_tiny_corpus",
    tfds_data_dir=tfds_dir,
    tfds_download=False,
    val_fraction=0.5,
  )
  corpus = md.open_corpus(cfg)
  train = [b.text for b in corpus.blocks("train")]
  validation = [b.text for b in corpus.blocks("validation")]
  assert sorted(train) == sorted(tiny_tfds.document("train", i) for i in range(tiny_tfds.NUM_TRAIN))
  assert set(validation) <= {tiny_tfds.document("validation", i) for i in range(8)}
  data = md.build_datasets(cfg, process_index=0, process_count=1)
  text = data.tokenizer.decode(next(data.train_iter())["inputs"].reshape(-1))
  assert "train document" in text or "grüße" in text
  assert data.val_batches()


def test_tfds_source_carves_validation_from_train(tfds_dir):
  from tests.data import tiny_tfds  # pylint: disable=g-import-not-at-top

  cfg = _config(
    source="tfds",
    tfds_name="moejax_tiny_train_only",
    tfds_data_dir=tfds_dir,
    tfds_download=False,
    tfds_text_key="body",
    val_fraction=0.25,
  )
  corpus = md.open_corpus(cfg)
  blocks = {s: list(corpus.blocks(s)) for s in md.SPLITS}
  assert blocks["train"] and blocks["validation"]
  keys = {s: {(b.doc, b.index) for b in blocks[s]} for s in md.SPLITS}
  assert not keys["train"] & keys["validation"]
  # Every record is there once; the large one in several blocks that join up to it again.
  texts = sorted(blocks["train"] + blocks["validation"])
  assert len({b.doc for b in texts}) == tiny_tfds.NUM_TRAIN + 1
  large = [b for b in texts if b.text.startswith("large") or b.index > 0]
  assert len(large) > 1 and "".join(b.text for b in large) == tiny_tfds.LARGE
  assert md.build_datasets(cfg, process_index=0, process_count=1).val_batches()
  with pytest.raises(ValueError, match=r"data\.tfds_text_key"):
    md.build_datasets(
      _config(**{**cfg.__dict__, "tfds_text_key": "text"}), process_index=0, process_count=1
    )


def test_tfds_missing_data_set_fails_without_downloading(tmp_path):
  cfg = _config(
    source="tfds", tfds_name="moejax_tiny_corpus", tfds_data_dir=str(tmp_path), tfds_download=False
  )
  with pytest.raises(ValueError, match=r"data\.tfds_name"):
    md.build_datasets(cfg, process_index=0, process_count=1)


# Synthetic domains.


def test_synthetic_domains_are_labelled_and_deterministic():
  cfg = _config(source="synthetic", num_domains=4, synthetic_examples=64, seq_len=64, batch_size=8)
  data = md.build_datasets(cfg, process_index=0, process_count=1)
  source = data.train_source
  domains = md.make_domains(4, seed=0)
  assert [d.kind for d in domains] == list(md.DOMAIN_KINDS)
  for i in range(8):
    ex = source[i]
    assert ex["domain"] == i % 4
    assert ex["inputs"][0] == md.BYTE_EOS_ID
    np.testing.assert_array_equal(ex["inputs"][1:], ex["targets"][:-1])
    # Every token comes from the domain's own alphabet.
    assert set(ex["targets"].tolist()) <= set(domains[i % 4].alphabet.tolist())
  # A copy-domain example repeats its motif (up to the noise).
  copy = source[1]["targets"]
  assert max(np.mean(copy[p:] == copy[:-p]) for p in range(4, 13)) > 0.8
  # Deterministic, and a function of synthetic_seed.
  np.testing.assert_array_equal(
    md.build_datasets(cfg, process_index=0, process_count=1).train_source[5]["inputs"],
    source[5]["inputs"],
  )
  other = md.build_datasets(
    _config(**{**cfg.__dict__, "synthetic_seed": 1}), process_index=0, process_count=1
  )
  assert not np.array_equal(other.train_source[5]["inputs"], source[5]["inputs"])
  batch = next(data.train_iter())
  assert batch["domain"].shape == (8,) and batch["domain"].dtype == np.int32
  val = data.val_batches()
  assert len(val) == 1 and (val[0]["domain"][val[0]["mask"][:, 0] == 1] >= 0).all()

"""Tiny offline tfds data sets for the `tfds` source tests (array_record, no TensorFlow, no network).

Defining a builder class registers its snake_case name with tfds, so `tfds.data_source(name)` finds it
exactly like a catalogue data set; `prepare` writes it into a temporary `data_dir`.
"""

import tensorflow_datasets as tfds

from moejax.data.sources import ensure_importlib_resources

NUM_TRAIN = 60
NUM_VALIDATION = 8
# One record over the 64 KiB block size: it is split into blocks like a large file.
LARGE = "".join(f"large record line {i}\n" for i in range(6000))


def document(split: str, i: int) -> str:
  """A recognisable, non-ASCII document: the tests look for it in the decoded stream."""
  return f"{split} document {i}: grüße from tfds, line one.\nline two of {i} ends here."


class MoejaxTinyCorpus(tfds.core.GeneratorBasedBuilder):
  """Train and validation splits of short text documents under the feature `text`."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(
      builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()})
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    return {
      "train": self._generate_examples("train", NUM_TRAIN),
      "validation": self._generate_examples("validation", NUM_VALIDATION),
    }

  def _generate_examples(self, split, n):
    for i in range(n):
      yield i, {"text": document(split, i)}


class MoejaxTinyTrainOnly(tfds.core.GeneratorBasedBuilder):
  """Only a train split, text under `body`, one large record: validation is carved from train."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(
      builder=self, features=tfds.features.FeaturesDict({"body": tfds.features.Text()})
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for i in range(NUM_TRAIN):
      yield i, {"body": document("train", i)}
    yield NUM_TRAIN, {"body": LARGE}


def prepare(data_dir: str) -> None:
  """Writes both data sets as array_record into `data_dir`."""
  ensure_importlib_resources()
  for cls in (MoejaxTinyCorpus, MoejaxTinyTrainOnly):
    cls(data_dir=data_dir, file_format="array_record").download_and_prepare()

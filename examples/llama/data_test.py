"""Tests of the data pipeline: the stdlib corpus split, batching, and the C4 parsing."""

import gzip
import json
import os

import numpy as np
import pytest

from examples.llama import data


def test_split_is_deterministic_and_disjoint():
  docs = [f"doc{i}" for i in range(45)]
  train, heldout = data.split_documents(docs)
  assert heldout == ["doc0", "doc20", "doc40"]
  assert len(train) == 42
  assert not set(train) & set(heldout)
  assert data.split_documents(docs) == (train, heldout)


def test_stdlib_corpus_is_deterministic_bytes():
  files = data.stdlib_files()[:41]
  train, heldout = data.stdlib_corpus(files)
  train_again, heldout_again = data.stdlib_corpus(files)
  np.testing.assert_array_equal(train, train_again)
  np.testing.assert_array_equal(heldout, heldout_again)
  assert heldout.max() == data.EOS
  assert np.sum(heldout == data.EOS) == 3  # files 0, 20 and 40
  assert (
    files[0].read_bytes() == heldout[: np.argmax(heldout == data.EOS)].astype(np.uint8).tobytes()
  )


def test_random_windows_depend_only_on_seed_and_index():
  tokens = np.arange(1000, dtype=np.int32)
  x, y = data.random_windows(tokens, batch_size=4, seq_len=8, seed=3, index=7)
  assert x.shape == y.shape == (4, 8)
  np.testing.assert_array_equal(y, x + 1)
  np.testing.assert_array_equal(x, data.random_windows(tokens, 4, 8, seed=3, index=7)[0])
  assert not np.array_equal(x, data.random_windows(tokens, 4, 8, seed=3, index=8)[0])


def test_heldout_batches_cover_the_heldout_tokens_evenly():
  tokens = np.arange(500, dtype=np.int32)
  batches = data.heldout_batches(tokens, batch_size=2, seq_len=10, num_batches=3)
  starts = [int(x[i, 0]) for x, _ in batches for i in range(2)]
  assert starts[0] == 0 and starts[-1] == 500 - 11
  assert starts == sorted(starts)


def test_c4_loader_on_a_local_json_gz(tmp_path):
  path = tmp_path / "c4-train.00000-of-01024.json.gz"
  records = [
    {"text": "hello world", "timestamp": "2019-04-25T12:57:54Z", "url": "https://a"},
    {"text": "second doc", "timestamp": "2019-04-25T12:57:55Z", "url": "https://b"},
    {"text": "x" * 7, "timestamp": "2019-04-25T12:57:56Z", "url": "https://c"},
  ]
  with gzip.open(path, "wt", encoding="utf-8") as f:
    f.write("\n".join(json.dumps(r) for r in records) + "\n")
  texts = list(data.read_c4_json(path))
  assert texts == [r["text"] for r in records]
  tokenize = lambda text: [len(word) for word in text.split()]  # a stub tokenizer
  rows = list(data.pack_sequences(texts, tokenize, seq_len=3, eos_id=1))
  # Token stream: 5 5 1 | 6 3 1 | 7 1 -> one row of 4, one of 4, tail dropped.
  np.testing.assert_array_equal(np.stack(rows), [[5, 5, 1, 6], [3, 1, 7, 1]])
  ((x, y),) = data.batch_rows(iter(rows), batch_size=2)
  np.testing.assert_array_equal(x, [[5, 5, 1], [3, 1, 7]])
  np.testing.assert_array_equal(y, [[5, 1, 6], [1, 7, 1]])


@pytest.mark.skipif(not os.environ.get("QGALORE_NETWORK_TESTS"), reason="needs network")
def test_stream_c4_from_hugging_face():
  pytest.importorskip("datasets")
  pytest.importorskip("transformers")
  x, y = next(data.stream_c4("validation", seq_len=32, batch_size=2))
  assert x.shape == y.shape == (2, 32)
  np.testing.assert_array_equal(x[:, 1:], y[:, :-1])

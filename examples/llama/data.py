"""Training data: the Python standard library's source as bytes, or C4 with the T5 tokenizer.

The default corpus is the ``.py`` files at the top level of the running interpreter's
standard library (``sysconfig.get_paths()["stdlib"]``). Every Python installation ships
them, so the default run needs no network and no download; they are real, varied text
(code, docstrings, comments: about 4.7 MB for CPython 3.11), and reading them sorted by
name makes the corpus deterministic for a given Python version. Tokens are bytes
(0-255) plus ``EOS`` (256) between files. Every ``HELDOUT_EVERY``-th file (in name order)
is held out, so both parts mix all kinds of modules.

The C4 option follows the paper (allenai/c4 "en", T5 tokenizer, seq 256). Its parsing
and packing (``read_c4_json``, ``pack_sequences``) are plain Python, tested on a local
c4-style ``.json.gz``; only ``stream_c4`` needs Hugging Face ``datasets`` and
``transformers``, imported when called.
"""

import gzip
import itertools
import json
import pathlib
import sysconfig
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Iterator

import numpy as np

EOS = 256
BYTE_VOCAB_SIZE = 257
# T5's sentencepiece vocabulary; its 100 extra ids above it never occur in text, which is
# why the paper's configs (and the authors') use 32000.
T5_VOCAB_SIZE = 32000
HELDOUT_EVERY = 20


def stdlib_files() -> list[pathlib.Path]:
  """The top-level ``.py`` files of the standard library, sorted by name."""
  return sorted(pathlib.Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))


def encode_bytes(texts: Iterable[bytes]) -> np.ndarray:
  """Byte-level tokens of ``texts``, each followed by ``EOS``, as one int32 array."""
  parts = []
  for text in texts:
    parts.append(np.frombuffer(text, np.uint8).astype(np.int32))
    parts.append(np.array([EOS], np.int32))
  return np.concatenate(parts) if parts else np.zeros([0], np.int32)


def split_documents(docs: list, heldout_every: int = HELDOUT_EVERY) -> tuple[list, list]:
  """Deterministic split: document ``i`` is held out when ``i % heldout_every == 0``."""
  train = [d for i, d in enumerate(docs) if i % heldout_every]
  heldout = [d for i, d in enumerate(docs) if not i % heldout_every]
  return train, heldout


def stdlib_corpus(files: list[pathlib.Path] | None = None) -> tuple[np.ndarray, np.ndarray]:
  """``(train_tokens, heldout_tokens)`` of the standard-library corpus."""
  files = stdlib_files() if files is None else files
  train, heldout = split_documents(files)
  read = lambda paths: encode_bytes(p.read_bytes() for p in paths)
  return read(train), read(heldout)


def random_windows(tokens: np.ndarray, batch_size: int, seq_len: int, seed: int, index: int):
  """Batch number ``index`` of random windows of ``tokens``: ``(inputs, targets)``.

  Batch ``index`` depends only on ``(seed, index)``, so the data position is the batch
  index and resuming from a checkpoint replays exactly the batches that follow.

  Returns:
    int32 arrays of shape (batch_size, seq_len); targets are inputs shifted by one.
  """
  rng = np.random.default_rng([seed, index])
  starts = rng.integers(0, len(tokens) - seq_len - 1, size=batch_size)
  windows = np.stack([tokens[s : s + seq_len + 1] for s in starts])
  return windows[:, :-1], windows[:, 1:]


def heldout_batches(tokens: np.ndarray, batch_size: int, seq_len: int, num_batches: int):
  """A fixed list of ``(inputs, targets)`` batches of evenly spaced held-out windows."""
  count = batch_size * num_batches
  starts = np.linspace(0, len(tokens) - seq_len - 1, count).astype(np.int64)
  windows = np.stack([tokens[s : s + seq_len + 1] for s in starts])
  windows = windows.reshape(num_batches, batch_size, seq_len + 1)
  return [(w[:, :-1], w[:, 1:]) for w in windows]


def read_c4_json(path: str | pathlib.Path) -> Iterator[str]:
  """Texts of a C4 shard: a (gzipped) JSON-lines file with a ``"text"`` field per line."""
  opener = gzip.open if str(path).endswith(".gz") else open
  with opener(path, "rt", encoding="utf-8") as f:
    for line in f:
      if line.strip():
        yield json.loads(line)["text"]


def pack_sequences(
  texts: Iterable[str], tokenize: Callable[[str], list[int]], seq_len: int, eos_id: int
) -> Iterator[np.ndarray]:
  """Concatenates tokenised texts (each ending in ``eos_id``) into rows of ``seq_len + 1``.

  Rows do not overlap; a text may span two rows (GPT-style packing). The tail shorter
  than a row is dropped.
  """
  buffer: list[int] = []
  for text in texts:
    buffer.extend(tokenize(text))
    buffer.append(eos_id)
    while len(buffer) >= seq_len + 1:
      yield np.asarray(buffer[: seq_len + 1], np.int32)
      del buffer[: seq_len + 1]


def batch_rows(rows: Iterator[np.ndarray], batch_size: int) -> Iterator[tuple]:
  """Groups packed rows into ``(inputs, targets)`` batches; drops a final partial batch."""
  while True:
    chunk = [row for _, row in zip(range(batch_size), rows)]
    if len(chunk) < batch_size:
      return
    windows = np.stack(chunk)
    yield windows[:, :-1], windows[:, 1:]


def stream_c4(split: str, seq_len: int, batch_size: int, skip_batches: int = 0):
  """Batches of C4 "en" (streamed from Hugging Face) tokenised with T5's tokenizer.

  Args:
    split: ``"train"`` or ``"validation"``.
    seq_len: tokens per row.
    batch_size: rows per batch.
    skip_batches: batches to skip first (the data position of a resumed run).

  Returns:
    An iterator of int32 ``(inputs, targets)`` of shape (batch_size, seq_len).
  """
  import datasets  # optional and heavy: imported when streaming
  import transformers

  tokenizer = transformers.AutoTokenizer.from_pretrained("t5-base")
  stream = datasets.load_dataset("allenai/c4", "en", split=split, streaming=True)
  texts = (example["text"] for example in stream)
  tokenize = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]
  batches = batch_rows(pack_sequences(texts, tokenize, seq_len, tokenizer.eos_token_id), batch_size)
  for _ in range(skip_batches):
    next(batches)
  return batches


def make_batches(
  dataset: str,
  *,
  model_name: str,
  seq_len: int,
  vocab_size: int,
  batch_size: int,
  eval_batches: int,
  seed: int,
):
  """``(train_batches(position), heldout_batches)`` for ``dataset`` ("stdlib" or "c4").

  ``train_batches(position)`` yields the training batches from the ``position``-th on, so a
  resumed run continues where it stopped; the held-out batches are a fixed list.
  """
  needed = {"stdlib": BYTE_VOCAB_SIZE, "c4": T5_VOCAB_SIZE}[dataset]
  if vocab_size < needed:
    raise ValueError(
      f"dataset {dataset!r} needs a vocabulary of {needed} tokens; model {model_name!r} has"
      f" {vocab_size} (use a paper config such as --model 60m for c4)"
    )
  if dataset == "c4":
    heldout = list(itertools.islice(stream_c4("validation", seq_len, batch_size), eval_batches))
    return lambda position: stream_c4("train", seq_len, batch_size, position), heldout
  train_tokens, heldout_tokens = stdlib_corpus()
  heldout = heldout_batches(heldout_tokens, batch_size, seq_len, eval_batches)
  batches = lambda position: (
    random_windows(train_tokens, batch_size, seq_len, seed, i) for i in itertools.count(position)
  )
  return batches, heldout

"""Corpus, vocabulary, the 90/10 split and truncated-BPTT batches."""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

TINY_SHAKESPEARE = {
    "name": "tinyshakespeare",
    "url": "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
    "sha256": "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
    "chars": 1_115_394,
}
TRAIN_FRACTION = 0.9  # nanoGPT's shakespeare_char split: first 90% train, last 10% validation
MIN_CORPUS_CHARS = 64  # below this there is nothing to learn or to validate on


class CorpusError(ValueError):
    """The corpus cannot be used (missing, not UTF-8, too small, checksum mismatch)."""


def cache_dir() -> Path:
    """Where fetched corpora live: $CHARGEN_CACHE, else ~/.cache/chargen."""
    return Path(os.environ.get("CHARGEN_CACHE") or Path.home() / ".cache" / "chargen")


@dataclass
class Corpus:
    name: str  # "tinyshakespeare" or the file's name
    text: str
    sha256: str  # of the file's bytes

    @property
    def named(self) -> bool:
        return self.name == TINY_SHAKESPEARE["name"]

    def describe(self) -> dict[str, str | int]:
        return {"name": self.name, "sha256": self.sha256, "chars": len(self.text)}


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def decode_utf8(data: bytes, source: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise CorpusError(f"{source} is not UTF-8 text (invalid byte at offset {err.start})") from None


def fetch_tinyshakespeare(directory: Path | None = None) -> Path:
    """The standard Tiny Shakespeare file, downloaded once into the cache and checksum-verified."""
    directory = directory or cache_dir()
    path = directory / "tinyshakespeare.txt"
    if path.exists() and sha256_of(path.read_bytes()) == TINY_SHAKESPEARE["sha256"]:
        return path
    try:
        with urllib.request.urlopen(TINY_SHAKESPEARE["url"], timeout=30) as response:
            data = response.read()
    except (urllib.error.URLError, OSError) as err:
        raise CorpusError(
            f"cannot download Tiny Shakespeare ({err}); with no network, copy char-rnn's "
            f"data/tinyshakespeare/input.txt to {path} or pass --corpus PATH"
        ) from None
    if sha256_of(data) != TINY_SHAKESPEARE["sha256"]:
        raise CorpusError("downloaded Tiny Shakespeare does not match its sha256; not using it")
    directory.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")  # one per process: a shared cache is safe
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_corpus(spec: str) -> Corpus:
    """A corpus from a path, or "tinyshakespeare" (fetched and cached)."""
    if spec == TINY_SHAKESPEARE["name"]:
        path = fetch_tinyshakespeare()
    else:
        path = Path(spec)
        if not path.is_file():
            raise CorpusError(f"corpus file not found: {spec}")
    data = path.read_bytes()
    digest = sha256_of(data)
    if spec == TINY_SHAKESPEARE["name"] and digest != TINY_SHAKESPEARE["sha256"]:
        # These bytes, not the ones the fetcher checked, are what gets trained on.
        raise CorpusError(f"{path} no longer matches Tiny Shakespeare's sha256 (changed since it was fetched)")
    # The standard file under another name is still the standard corpus.
    name = TINY_SHAKESPEARE["name"] if digest == TINY_SHAKESPEARE["sha256"] else path.name
    text = decode_utf8(data, str(path))
    if len(text) < MIN_CORPUS_CHARS:
        raise CorpusError(f"corpus {spec} has {len(text)} characters; need at least {MIN_CORPUS_CHARS}")
    return Corpus(name=name, text=text, sha256=digest)


class Vocab:
    """The sorted set of the corpus's characters; a character's id is its position."""

    def __init__(self, chars: list[str]) -> None:
        self.chars = chars
        self.index = {ch: i for i, ch in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str) -> Vocab:
        return cls(sorted(set(text)))

    def __len__(self) -> int:
        return len(self.chars)

    def unknown(self, text: str) -> list[str]:
        return sorted(set(text) - self.index.keys())

    def encode(self, text: str) -> Tensor:
        missing = self.unknown(text)
        if missing:
            shown = ", ".join(repr(ch) for ch in missing[:10])
            more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
            raise CorpusError(f"{len(missing)} characters not in the vocabulary: {shown}{more}")
        return torch.tensor([self.index[ch] for ch in text], dtype=torch.long)

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids)


def split(ids: Tensor) -> tuple[Tensor, Tensor]:
    """First 90% of characters for training, the last 10% for validation (as nanoGPT)."""
    n = int(len(ids) * TRAIN_FRACTION)
    return ids[:n], ids[n:]


class StreamBatcher:
    """B contiguous streams through the text; step i of an epoch gives each stream's next T chars.

    Every epoch starts the streams at a fresh random shift (drawn from the seed and the epoch
    number, so any step's batch can be recomputed on resume) and the caller resets the carried
    state at epoch boundaries, since the streams then no longer continue the previous ones.
    """

    def __init__(self, ids: Tensor, batch_size: int, seq_len: int, seed: int) -> None:
        self.ids = ids
        self.B, self.T, self.seed = batch_size, seq_len, seed
        # Length of each stream with the largest shift (T - 1); every epoch has the same steps.
        self.stream_len = (len(ids) - (seq_len - 1)) // batch_size
        self.steps_per_epoch = (self.stream_len - 1) // seq_len
        if self.steps_per_epoch < 1:
            need = batch_size * (seq_len + 1) + seq_len - 1
            raise CorpusError(
                f"training split has {len(ids)} characters; batch_size {batch_size} x seq_len "
                f"{seq_len} needs at least {need} (use a larger corpus or smaller batches)"
            )
        self._epoch = -1
        self._streams = ids.new_empty(0)

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, step within the epoch) of a global step."""
        return divmod(step, self.steps_per_epoch)

    def streams(self, epoch: int) -> Tensor:
        """[B, stream_len] view of the text for one epoch."""
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            shift = int(torch.randint(0, self.T, (1,), generator=generator))
            used = self.B * self.stream_len
            self._streams = self.ids[shift : shift + used].view(self.B, self.stream_len)
            self._epoch = epoch
        return self._streams

    def batch(self, step: int) -> tuple[Tensor, Tensor]:
        """Inputs and targets, each [B, T], for a global step."""
        epoch, i = self.position(step)
        s = self.streams(epoch)
        x = s[:, i * self.T : (i + 1) * self.T]
        y = s[:, i * self.T + 1 : (i + 1) * self.T + 1]
        return x, y


def eval_streams(ids: Tensor, streams: int) -> Tensor:
    """Cut a text into at most `streams` equal contiguous rows for stateful evaluation."""
    streams = max(1, min(streams, len(ids) // 2))
    length = len(ids) // streams
    return ids[: streams * length].view(streams, length)

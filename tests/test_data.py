"""Corpus loading, vocabulary, the 90/10 split, truncated-BPTT stream batches, the fetcher."""

from __future__ import annotations

import hashlib
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from training import data
from training.data import CorpusError, StreamBatcher, Vocab, load_corpus, split


def test_vocab_is_the_sorted_set_of_characters() -> None:
    vocab = Vocab.from_text("banana band\n")
    assert vocab.chars == sorted(set("banana band\n"))
    assert vocab.decode(vocab.encode("band").tolist()) == "band"
    with pytest.raises(CorpusError, match="'z'"):
        vocab.encode("zebra")


def test_split_is_first_90_percent_then_last_10() -> None:
    ids = torch.arange(1000)
    train, val = split(ids)
    assert torch.equal(train, ids[:900]) and torch.equal(val, ids[900:])
    train, val = split(torch.arange(1115394))
    assert len(train) == 1003854 and len(val) == 111540  # nanoGPT's shakespeare_char sizes


def test_streams_are_contiguous_and_targets_are_shifted_inputs() -> None:
    ids = torch.arange(10_000)
    batcher = StreamBatcher(ids, batch_size=4, seq_len=10, seed=7)
    x0, y0 = batcher.batch(0)
    x1, _ = batcher.batch(1)
    assert x0.shape == (4, 10)
    assert torch.equal(y0[:, :-1], x0[:, 1:])  # next-character targets
    assert torch.equal(x1[:, 0], x0[:, -1] + 1)  # step 1 continues each stream where step 0 ended
    assert torch.equal(y0[:, -1], x1[:, 0])
    starts = x0[:, 0]
    assert (starts[1:] - starts[:-1] == batcher.stream_len).all()  # B evenly spaced streams


def test_each_epoch_draws_a_new_shift_and_is_reproducible() -> None:
    ids = torch.arange(50_000)
    batcher = StreamBatcher(ids, batch_size=4, seq_len=50, seed=3)
    shifts = {int(batcher.batch(e * batcher.steps_per_epoch)[0][0, 0]) for e in range(8)}
    assert len(shifts) > 1
    again = StreamBatcher(ids, batch_size=4, seq_len=50, seed=3)
    step = 5 * batcher.steps_per_epoch + 3
    assert torch.equal(batcher.batch(step)[0], again.batch(step)[0])
    last = batcher.batch(batcher.steps_per_epoch - 1)[1]
    assert int(last.max()) < len(ids)


def test_too_small_for_the_batch_shape_is_a_clear_error() -> None:
    with pytest.raises(CorpusError, match="batch_size"):
        StreamBatcher(torch.arange(100), batch_size=8, seq_len=32, seed=0)


def test_corpus_errors(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match="not found"):
        load_corpus(str(tmp_path / "missing.txt"))
    (tmp_path / "latin1.txt").write_bytes("café ".encode("latin-1") * 40)
    with pytest.raises(CorpusError, match="not UTF-8"):
        load_corpus(str(tmp_path / "latin1.txt"))
    (tmp_path / "tiny.txt").write_text("hello")
    with pytest.raises(CorpusError, match="at least"):
        load_corpus(str(tmp_path / "tiny.txt"))


@pytest.fixture
def local_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A real HTTP server on loopback serving tmp_path."""
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", tmp_path
    server.shutdown()


def test_fetch_verifies_the_checksum_and_caches(
    local_server: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, root = local_server
    payload = "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 10
    (root / "input.txt").write_text(payload)
    cache = tmp_path / "cache"
    monkeypatch.setenv("CHARGEN_CACHE", str(cache))
    monkeypatch.setitem(data.TINY_SHAKESPEARE, "url", f"{url}/input.txt")
    with pytest.raises(CorpusError, match="does not match its sha256"):
        load_corpus("tinyshakespeare")
    assert not (cache / "tinyshakespeare.txt").exists()  # a bad download is never cached

    monkeypatch.setitem(data.TINY_SHAKESPEARE, "sha256", hashlib.sha256(payload.encode()).hexdigest())
    corpus = load_corpus("tinyshakespeare")
    assert corpus.name == "tinyshakespeare" and corpus.text == payload
    (root / "input.txt").unlink()  # second load comes from the cache, no network needed
    assert load_corpus("tinyshakespeare").text == payload


def test_fetch_without_network_says_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHARGEN_CACHE", str(tmp_path))
    monkeypatch.setitem(data.TINY_SHAKESPEARE, "url", "http://127.0.0.1:9/input.txt")  # discard port
    with pytest.raises(CorpusError, match="--corpus PATH"):
        load_corpus("tinyshakespeare")


def test_the_named_corpus_is_verified_when_it_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The bytes trained on are the ones checked: a cached file that changed after the fetcher
    checked it (another process rewriting it) is refused, not trained on under another name."""
    changed = tmp_path / "tinyshakespeare.txt"
    changed.write_text("First Citizen:\nhalf a file, written by another rank" * 4)
    monkeypatch.setattr(data, "fetch_tinyshakespeare", lambda: changed)
    with pytest.raises(CorpusError, match="sha256"):
        load_corpus("tinyshakespeare")

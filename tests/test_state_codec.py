"""The session state's binary layout: round trip, and a clear error for anything else."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.state_codec import (
    HEADER,
    ModelMismatchError,
    SessionState,
    StateDecodeError,
    decode_state,
    describe_state,
    encode_state,
    fingerprint_digest,
)

FP = "sha256:" + "ab" * 32
OTHER = "sha256:" + "cd" * 32


def state(layers: int = 2, hidden: int = 8, pending: int = 5, consumed: int = 42) -> SessionState:
    rng = np.random.default_rng(0)
    return SessionState(
        rng.standard_normal((layers, hidden)).astype(np.float32),
        rng.standard_normal((layers, hidden)).astype(np.float32),
        pending,
        consumed,
    )


def test_round_trip_is_exact_and_layout_is_as_documented() -> None:
    original = state()
    data = encode_state(original, FP)
    assert len(data) == 60 + 2 * 4 * 2 * 8
    assert data[:4] == b"CGST" and struct.unpack_from("<HH", data, 4) == (1, 1)
    assert data[8:40] == bytes.fromhex("ab" * 32)
    assert struct.unpack_from("<IIQi", data, 40) == (2, 8, 42, 5)
    assert np.frombuffer(data, "<f4", count=16, offset=60).tobytes() == original.h.tobytes()
    back = decode_state(data, FP, 2, 8, vocab_size=65)
    assert np.array_equal(back.h, original.h) and np.array_equal(back.c, original.c)
    assert (back.pending, back.chars_consumed) == (5, 42)
    assert describe_state(data) == (FP, 42)


def test_fresh_state_has_no_pending_character() -> None:
    zeros = np.zeros((1, 4), np.float32)
    back = decode_state(encode_state(SessionState(zeros, zeros, -1, 0), FP), FP, 1, 4, 10)
    assert back.pending == -1


def test_another_models_state_is_a_mismatch_naming_both() -> None:
    with pytest.raises(ModelMismatchError) as err:
        decode_state(encode_state(state(), OTHER), FP, 2, 8, 65)
    assert "cdcd" in str(err.value) and "abab" in str(err.value)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d[:10], "shorter than its"),
        (lambda d: d[:-4], "its header says"),
        (lambda d: d + b"\0", "its header says"),
        (lambda d: b"XXXX" + d[4:], "bad magic"),
        (lambda d: d[:4] + struct.pack("<H", 9) + d[6:], "version 9"),
        (lambda d: d[:6] + struct.pack("<H", 7) + d[8:], "dtype"),
        (lambda d: d[:40] + struct.pack("<I", 0) + d[44:], "implausible"),
        (lambda d: d[:56] + struct.pack("<i", 65) + d[60:], "outside the vocabulary"),
        (lambda d: d[:60] + np.array([np.nan], "<f4").tobytes() + d[64:], "non-finite"),
    ],
)
def test_garbage_is_rejected_with_the_reason(mutate, message: str) -> None:
    with pytest.raises(StateDecodeError, match=message):
        decode_state(mutate(encode_state(state(), FP)), FP, 2, 8, 65)


def test_shape_of_another_architecture_is_rejected() -> None:
    with pytest.raises(StateDecodeError, match="the model is 3 x 8"):
        decode_state(encode_state(state(), FP), FP, 3, 8, 65)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_never_escape_as_anything_but_a_decode_error(data: bytes) -> None:
    with pytest.raises(StateDecodeError):
        decode_state(data, FP, 2, 8, 65)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, HEADER.size + 128 - 1), st.integers(0, 255))
def test_any_single_byte_change_is_detected_or_harmless(position: int, value: int) -> None:
    data = bytearray(encode_state(state(), FP))
    data[position] = value
    try:
        back = decode_state(bytes(data), FP, 2, 8, 65)
    except StateDecodeError:
        return
    # a change that decodes can only be in a float or the counters: shapes still hold
    assert back.h.shape == (2, 8) and back.c.shape == (2, 8)


# ---- properties: exact round trips; anything else is a StateDecodeError ----------------

finite_f32 = st.floats(width=32, allow_nan=False, allow_infinity=False)  # includes -0.0 and subnormals


@st.composite
def states(draw: st.DrawFn) -> tuple[SessionState, int]:
    layers, hidden = draw(st.integers(1, 4)), draw(st.integers(1, 12))
    vocab = draw(st.integers(1, 300))
    shape = (layers, hidden)
    h = np.array(draw(st.lists(finite_f32, min_size=layers * hidden, max_size=layers * hidden)), "<f4").reshape(shape)
    c = np.array(draw(st.lists(finite_f32, min_size=layers * hidden, max_size=layers * hidden)), "<f4").reshape(shape)
    pending = draw(st.integers(-1, vocab - 1))
    consumed = draw(st.integers(0, 2**64 - 1))
    return SessionState(h, c, pending, consumed), vocab


fingerprints = st.one_of(
    st.binary(min_size=32, max_size=32).map(lambda d: "sha256:" + d.hex()),
    st.text(max_size=40),  # non-sha256 fingerprints are hashed into the header
)


@settings(max_examples=300, deadline=None)
@given(states(), fingerprints)
def test_round_trip_is_bit_exact_for_any_state(drawn: tuple[SessionState, int], fingerprint: str) -> None:
    original, vocab = drawn
    data = encode_state(original, fingerprint)
    layers, hidden = original.h.shape
    back = decode_state(data, fingerprint, layers, hidden, vocab)
    assert back.h.tobytes() == original.h.tobytes() and back.c.tobytes() == original.c.tobytes()  # -0.0 kept
    assert (back.pending, back.chars_consumed) == (original.pending, original.chars_consumed)
    assert encode_state(back, fingerprint) == data


@settings(max_examples=200, deadline=None)
@given(states(), st.data())
def test_every_truncation_is_a_decode_error(drawn: tuple[SessionState, int], data: st.DataObject) -> None:
    original, vocab = drawn
    blob = encode_state(original, FP)
    cut = data.draw(st.integers(0, len(blob) - 1))
    with pytest.raises(StateDecodeError):
        decode_state(blob[:cut], FP, *original.h.shape, vocab)


@settings(max_examples=200, deadline=None)
@given(states(), fingerprints, fingerprints)
def test_another_models_state_is_always_a_mismatch(drawn: tuple[SessionState, int], saved_by: str, ours: str) -> None:
    original, vocab = drawn
    if fingerprint_digest(saved_by) == fingerprint_digest(ours):
        return
    with pytest.raises(ModelMismatchError) as err:
        decode_state(encode_state(original, saved_by), ours, *original.h.shape, vocab)
    assert err.value.saved.startswith("sha256:")


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 3), st.integers(0, 20), st.integers(-(2**31), 2**31 - 1), st.binary(max_size=400))
def test_a_valid_looking_header_over_random_bytes_never_escapes(
    layers: int, hidden: int, pending: int, payload: bytes
) -> None:
    header = HEADER.pack(b"CGST", 1, 1, bytes.fromhex("ab" * 32), layers, hidden, 7, pending)
    try:
        back = decode_state(header + payload, FP, 2, 8, 65)
    except StateDecodeError:
        return
    # it decoded: then it is exactly a well-formed state for this model
    assert (layers, hidden) == (2, 8) and len(payload) == 2 * 4 * 16 and -1 <= back.pending < 65
    assert np.isfinite(back.h).all() and np.isfinite(back.c).all()

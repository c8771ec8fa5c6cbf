"""Session state <-> bytes: an explicit little-endian layout, never pickle.

Layout (version 1), 60-byte header then the two state tensors:

    offset size field
    0      4    magic b"CGST"
    4      2    format version, uint16 = 1
    6      2    dtype code, uint16 = 1 (float32 little-endian)
    8      32   model fingerprint (the sha256 digest of the artifact's weights)
    40     4    layers L, uint32
    44     4    hidden H, uint32
    48     8    chars consumed, uint64 (prompt + returned characters over the session's life)
    56     4    pending character id, int32 (-1: no text yet)
    60     4*L*H  h, float32 [L, H]
    ...    4*L*H  c, float32 [L, H]

"pending" is the last character of the session's text, not yet fed to the model: the next request
feeds it (with its prompt) to get the distribution of the following character, so a session can be
saved after exactly the text returned, with no extra model step.
"""

from __future__ import annotations

import hashlib
import re
import struct
from dataclasses import dataclass

import numpy as np

MAGIC = b"CGST"
VERSION = 1
DTYPE_FLOAT32 = 1
HEADER = struct.Struct("<4sHH32sIIQi")
MAX_LAYERS = 1024
MAX_HIDDEN = 1 << 20


class StateDecodeError(ValueError):
    """The bytes are not a session state this service can use."""


class ModelMismatchError(StateDecodeError):
    """The state was saved by another model."""

    def __init__(self, saved: str, current: str) -> None:
        super().__init__(f"the session was saved by model {saved[:23]}..., this service runs {current[:23]}...")
        self.saved = saved
        self.current = current


@dataclass
class SessionState:
    h: np.ndarray  # float32 [L, H]
    c: np.ndarray  # float32 [L, H]
    pending: int  # last character id of the text, not yet fed; -1 when the session has no text
    chars_consumed: int


def fingerprint_digest(fingerprint: str) -> bytes:
    """32 bytes for the header: the digest itself for "sha256:<hex>", else a hash of the string."""
    match = re.fullmatch(r"sha256:([0-9a-f]{64})", fingerprint)
    return bytes.fromhex(match.group(1)) if match else hashlib.sha256(fingerprint.encode()).digest()


def digest_name(digest: bytes) -> str:
    return "sha256:" + digest.hex()


def encode_state(state: SessionState, fingerprint: str) -> bytes:
    h = np.ascontiguousarray(state.h, dtype="<f4")
    c = np.ascontiguousarray(state.c, dtype="<f4")
    if h.ndim != 2 or h.shape != c.shape:
        raise ValueError(f"h and c must both be [layers, hidden], got {h.shape} and {c.shape}")
    layers, hidden = h.shape
    header = HEADER.pack(
        MAGIC,
        VERSION,
        DTYPE_FLOAT32,
        fingerprint_digest(fingerprint),
        layers,
        hidden,
        state.chars_consumed,
        state.pending,
    )
    return header + h.tobytes() + c.tobytes()


def describe_state(data: bytes) -> tuple[str, int]:
    """(fingerprint of the model that saved it, chars consumed), checking only the header."""
    if len(data) < HEADER.size or data[:4] != MAGIC:
        raise StateDecodeError("not a chargen session state")
    fields = HEADER.unpack_from(data)
    return digest_name(fields[3]), fields[6]


def decode_state(data: bytes, fingerprint: str, layers: int, hidden: int, vocab_size: int) -> SessionState:
    """Validate everything, then copy the floats out; raises StateDecodeError with the reason."""
    if len(data) < HEADER.size:
        raise StateDecodeError(f"state is {len(data)} bytes, shorter than its {HEADER.size}-byte header")
    magic, version, dtype, digest, n_layers, n_hidden, consumed, pending = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise StateDecodeError("not a chargen session state (bad magic)")
    if version != VERSION:
        raise StateDecodeError(f"state format version {version} is not supported (this service reads {VERSION})")
    if dtype != DTYPE_FLOAT32:
        raise StateDecodeError(f"unknown state dtype code {dtype}")
    if not (0 < n_layers <= MAX_LAYERS and 0 < n_hidden <= MAX_HIDDEN):
        raise StateDecodeError(f"implausible state shape {n_layers} x {n_hidden}")
    expected = HEADER.size + 2 * 4 * n_layers * n_hidden
    if len(data) != expected:
        raise StateDecodeError(f"state is {len(data)} bytes, its header says {expected}")
    if digest != fingerprint_digest(fingerprint):
        raise ModelMismatchError(digest_name(digest), fingerprint)
    if (n_layers, n_hidden) != (layers, hidden):
        raise StateDecodeError(f"state is {n_layers} x {n_hidden}, the model is {layers} x {hidden}")
    if not -1 <= pending < vocab_size:
        raise StateDecodeError(f"pending character id {pending} is outside the vocabulary")
    floats = np.frombuffer(data, dtype="<f4", offset=HEADER.size).astype(np.float32)  # a copy we own
    if not np.isfinite(floats).all():
        raise StateDecodeError("state holds non-finite numbers")
    size = n_layers * n_hidden
    h = floats[:size].reshape(n_layers, n_hidden)
    c = floats[size:].reshape(n_layers, n_hidden)
    return SessionState(h=h, c=c, pending=pending, chars_consumed=consumed)

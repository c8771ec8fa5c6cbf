"""What the models directory holds: artifact files and a signature that changes when one does."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

Signature = tuple[int, int, int]  # (inode, size, mtime_ns): an atomic rename changes the inode


@dataclass
class FileRecord:
    """The last look at one file: what loading it gave."""

    path: Path
    signature: Signature
    status: str  # loading | ready | failed | unloaded
    model_id: str | None = None  # once it loaded (its meta's name, else the stem)
    reason: str | None = None  # why it failed

    @property
    def shown_id(self) -> str:
        return self.model_id or self.path.stem


def is_artifact_name(name: str) -> bool:
    """`*.pt`, but not a hidden file: a publisher's temporary name starts with a dot."""
    return name.endswith(".pt") and not name.startswith(".") and len(name) > 3


def scan(directory: Path) -> dict[Path, Signature]:
    """Every artifact file of the directory and its signature; raises OSError if unreadable."""
    found: dict[Path, Signature] = {}
    with os.scandir(directory) as entries:
        for entry in entries:
            if not is_artifact_name(entry.name):
                continue
            try:
                if not entry.is_file():
                    continue
                st = entry.stat()
            except FileNotFoundError:  # removed while we looked
                continue
            found[Path(entry.path)] = (st.st_ino, st.st_size, st.st_mtime_ns)
    return found


def signature_of(path: Path) -> Signature | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)

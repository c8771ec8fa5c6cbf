"""The artifact (`chargen-lstm/1`): the one contract between the trainer and the service.

A TorchScript file (`torch.jit.load`, no chargen import needed to run it) with the methods
``forward``, ``step``, ``init_state`` and (since the inspector) ``inspect``, and an extra file
``meta.json``: the format, the vocabulary, the architecture, the corpus, the validation loss and
a fingerprint of the exact weights. The trainer writes it (training/export.py); everything that
reads one reads it here.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

ARTIFACT_FORMAT = "chargen-lstm/1"
ARTIFACT_METHODS = ("forward", "step", "init_state", "inspect")  # what an export scripts
REQUIRED_METHODS = ("forward", "step", "init_state")  # what a reader needs (older exports lack inspect)
REQUIRED_META = ("layers", "hidden", "fingerprint")

# The model `chargen serve` loads by default, shipped inside the package (and so inside the wheel).
BUNDLED_MODEL = Path(__file__).resolve().parent / "models" / "shakespeare.pt"


class ArtifactError(ValueError):
    """The file is not a chargen artifact this version can use (missing, not TorchScript, not ours)."""


@contextmanager
def jit_deprecation_accepted() -> Iterator[None]:
    """torch.jit is deprecated in favour of torch.export, but TorchScript is the format that loads
    with no Python source (the service never imports the trainer); the warning has nothing for us
    to act on, so it is silenced around our own jit calls and nowhere else."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=r".*torch\.jit.*")
        yield


def read_artifact(path: str | Path) -> tuple[torch.jit.ScriptModule, dict[str, Any]]:
    """The scripted model (in eval mode, on the CPU) and its meta.json, both checked."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"model file not found: {path}")
    extra = {"meta.json": ""}
    try:
        with jit_deprecation_accepted():
            module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    except (RuntimeError, ValueError, OSError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ArtifactError(f"{path} is not a TorchScript model ({first})") from None
    try:
        meta = json.loads(extra["meta.json"] or "null")
    except json.JSONDecodeError:
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != ARTIFACT_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise ArtifactError(f"{path} is not a chargen model (meta.json format: {found!r}, not {ARTIFACT_FORMAT!r})")
    vocab = meta.get("vocab")
    if not isinstance(vocab, list) or not vocab or not all(isinstance(ch, str) and len(ch) == 1 for ch in vocab):
        raise ArtifactError(f"{path}: meta.json vocab must be a list of single characters")
    for key in REQUIRED_META:
        if key not in meta:
            raise ArtifactError(f"{path}: meta.json has no {key!r}")
    for name in REQUIRED_METHODS:
        if not hasattr(module, name):
            raise ArtifactError(f"{path}: the model has no {name}() method")
    module.eval()
    return module, meta

"""Loading the trainer's TorchScript artifact: the only contract between training and serving."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

ARTIFACT_FORMAT = "chargen-lstm/1"


class ModelLoadError(ValueError):
    """The file cannot be served: missing, not TorchScript, or not a chargen-lstm/1 model."""


@dataclass
class LoadedModel:
    module: torch.jit.ScriptModule
    meta: dict[str, Any]
    model_id: str
    vocab: list[str]
    index: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        self.index = {ch: i for i, ch in enumerate(self.vocab)}

    @property
    def fingerprint(self) -> str:
        return str(self.meta["fingerprint"])

    @property
    def layers(self) -> int:
        return int(self.meta["layers"])

    @property
    def hidden(self) -> int:
        return int(self.meta["hidden"])

    @property
    def created(self) -> int:
        """Unix time the artifact was exported (0 if meta.json does not say)."""
        try:
            return int(datetime.fromisoformat(str(self.meta.get("created"))).timestamp())
        except ValueError:
            return 0

    @property
    def has_inspect(self) -> bool:
        """Whether the artifact has ``inspect`` (exports before the inspector do not)."""
        return hasattr(self.module, "inspect")

    @property
    def start_id(self) -> int:
        """Fed when there is no text at all, as `chargen sample` does: the start of a line."""
        return self.index.get("\n", 0)

    def unknown_chars(self, text: str) -> list[str]:
        """Characters of text outside the vocabulary, each once, in order of appearance."""
        return list(dict.fromkeys(ch for ch in text if ch not in self.index))

    def encode(self, text: str) -> list[int]:
        return [self.index[ch] for ch in text]


def load_model(path: str | Path, model_id: str | None = None) -> LoadedModel:
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"model file not found: {path}")
    extra = {"meta.json": ""}
    try:
        with warnings.catch_warnings():  # torch.jit is deprecated; the artifact format is ours
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    except (RuntimeError, ValueError, OSError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ModelLoadError(f"{path} is not a TorchScript model ({first})") from None
    try:
        meta = json.loads(extra["meta.json"] or "null")
    except json.JSONDecodeError:
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != ARTIFACT_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise ModelLoadError(f"{path} is not a {ARTIFACT_FORMAT} model (meta.json format: {found!r})")
    vocab = meta.get("vocab")
    if not isinstance(vocab, list) or not vocab or not all(isinstance(ch, str) and len(ch) == 1 for ch in vocab):
        raise ModelLoadError(f"{path}: meta.json vocab must be a list of single characters")
    for key in ("layers", "hidden", "fingerprint"):
        if key not in meta:
            raise ModelLoadError(f"{path}: meta.json has no {key!r}")
    for name in ("step", "forward", "init_state"):
        if not hasattr(module, name):
            raise ModelLoadError(f"{path}: the model has no {name}() method")
    module.eval()
    return LoadedModel(module=module, meta=meta, model_id=model_id or path.stem, vocab=vocab)

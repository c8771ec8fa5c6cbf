"""The loaded artifact as the service uses it (chargen/artifact.py reads and checks the file)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from chargen.artifact import read_artifact


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
    """The artifact at ``path``; its id is ``model_id`` (CHARGEN_MODEL_ID), else the name it was
    exported with, else the file's stem (exports before names). Raises ArtifactError."""
    module, meta = read_artifact(path)
    served_as = model_id or str(meta.get("name") or "") or Path(path).stem
    return LoadedModel(module=module, meta=meta, model_id=served_as, vocab=meta["vocab"])

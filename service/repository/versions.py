"""A served model and its versions: each version is one loaded artifact with its own engine."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from service.artifact import LoadedModel
from service.engine import Engine
from service.state_codec import digest_name, fingerprint_digest


@dataclass(eq=False)  # a version is itself (they live in lists and sets)
class ServedVersion:
    """One artifact, loaded, with the engine that batches its streams (never another model's)."""

    model: LoadedModel
    engine: Engine
    path: Path | None
    loaded_at: float = field(default_factory=time.time)
    jobs: int = 0  # generations started on it and not yet saved
    accepting: bool = True  # False once retired: running work finishes, nothing new starts
    state_digest: str = field(init=False)  # how a session's state names this version

    def __post_init__(self) -> None:
        self.state_digest = digest_name(fingerprint_digest(self.model.fingerprint))

    @property
    def model_id(self) -> str:
        return self.model.model_id

    @property
    def fingerprint(self) -> str:
        return self.model.fingerprint

    @property
    def busy(self) -> bool:
        return self.jobs > 0 or self.engine.in_flight > 0

    @property
    def status(self) -> str:
        return "ready" if self.accepting else "draining"


@dataclass(eq=False)
class ModelEntry:
    """A model id: its versions, oldest first; the last accepting one takes new work."""

    model_id: str
    path: Path | None  # its file in the models directory (None: CHARGEN_MODEL)
    versions: list[ServedVersion]
    removed: bool = False  # its file went away or an operator unloaded it: draining, then gone
    last_error: str | None = None  # why the latest replacement of its file did not load

    @property
    def live(self) -> list[ServedVersion]:
        return [v for v in self.versions if v.accepting]

    @property
    def current(self) -> ServedVersion | None:
        live = self.live
        return live[-1] if live and not self.removed else None

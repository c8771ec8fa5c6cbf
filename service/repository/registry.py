"""The models this process serves: which version takes a request, loading, replacing, draining.

Everything here runs on the event loop except the work handed to threads: reading an artifact
(`load_model`), starting an engine (it calibrates on its own thread) and stopping one. Changes are
made one at a time (a lock), so two scans never load the same file twice.

Lifecycle of a file in the directory (service/repository/watch.py notices the changes):
- new: loaded off the loop; on success its id (meta "name", else the stem) becomes servable;
  on failure it is listed failed with the reason, and retried only when the file changes;
- replaced (same id, new fingerprint): a new version takes new requests and sessions; the
  previous ones stay loaded for their sessions while ``keep_versions`` allows, then are retired:
  they finish their running streams, then their engines stop;
- removed (or unloaded by an operator): every version is retired the same way, then the id is gone.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import re
from collections import OrderedDict
from pathlib import Path

import torch

from chargen.artifact import ArtifactError
from service.artifact import LoadedModel, load_model
from service.engine import Engine, EngineConfig
from service.engine.precision import Choice, choose_precision
from service.metrics import Metrics
from service.problems import Problem
from service.repository.files import FileRecord, scan, signature_of
from service.repository.versions import ModelEntry, ServedVersion
from service.settings import Settings
from service.state_codec import StateDecodeError, describe_state

log = logging.getLogger("chargen.service")

MODEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # it appears in URLs: /v1/models/{id}
DRAIN_POLL_S = 0.05
RETIRED_REMEMBERED = 1024  # fingerprints of retired versions, for a 409 that names them


class ModelRegistry:
    def __init__(self, settings: Settings, metrics: Metrics, engine_config: EngineConfig) -> None:
        self.settings = settings
        self.metrics = metrics
        self.engine_config = engine_config
        self.directories: list[Path] = settings.model_directories  # empty: the one CHARGEN_MODEL
        self.entries: dict[str, ModelEntry] = {}  # ids taking new work
        self.leaving: list[ModelEntry] = []  # removed ids whose versions are still draining
        self.files: dict[Path, FileRecord] = {}  # the directory as last seen
        self.retired: OrderedDict[str, str] = OrderedDict()  # state digest -> model id
        self._lock = asyncio.Lock()
        self._drains: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    # --- which version serves a request -------------------------------------------------------

    @property
    def served_ids(self) -> list[str]:
        return sorted(self.entries)

    def default_entry(self) -> ModelEntry | None:
        wanted = self.settings.default_model
        if wanted is not None:
            return self.entries.get(wanted)
        newest = None
        for entry in self.entries.values():
            current = entry.current
            if current is None:
                continue
            key = (current.model.created, current.loaded_at, entry.model_id)
            if newest is None or key > newest[0]:
                newest = (key, entry)
        return newest[1] if newest else None

    def _served_list(self) -> str:
        return ", ".join(repr(i) for i in self.served_ids) or "none"

    def resolve(self, requested: str | None, param: str = "model") -> ServedVersion:
        """The version a new request runs on: the id's current version, the version with that
        fingerprint, or (no id given) the default model's. Raises a 404 Problem naming the ids served."""
        if requested is None:
            entry = self.default_entry()
            if entry is not None and entry.current is not None:
                return entry.current
            if self.settings.default_model is not None:
                message = f"{param}: none given, and the default model {self.settings.default_model!r} is not served"
            else:
                message = f"{param}: none given, and no model is served here yet"
            raise Problem("model_not_found", f"{message} (served: {self._served_list()})", param)
        entry = self.entries.get(requested)
        if entry is not None and entry.current is not None:
            return entry.current
        for entry in self.entries.values():
            for version in entry.live:
                if requested == version.fingerprint:
                    return version
        raise Problem(
            "model_not_found", f"{param}: {requested!r} is not served here (served: {self._served_list()})", param
        )

    def by_digest(self, digest: str) -> ServedVersion | None:
        for entry in self.entries.values():
            for version in entry.live:
                if version.state_digest == digest:
                    return version
        return None

    def for_session(self, blob: bytes, requested: str | None, param: str = "model") -> ServedVersion:
        """The version a session's state was made on (sessions stay pinned to it); 409 when that
        version was retired or is not served here, or when ``requested`` names another model."""
        try:
            digest, _ = describe_state(blob)
        except StateDecodeError as err:
            raise Problem(
                "invalid_session_state", f"session_id: the stored state cannot be used ({err})", "session_id"
            ) from None
        version = self.by_digest(digest)
        if version is None:
            raise self._unserved_version(digest)
        if requested is not None and requested not in (version.model_id, version.fingerprint):
            message = (
                f"{param}: the session belongs to model {version.model_id!r} (version {version.fingerprint[:19]}...), "
                f"not {requested!r}; omit {param} or start a new session"
            )
            raise Problem("model_mismatch", message, param)
        return version

    def _unserved_version(self, digest: str) -> Problem:
        model_id = self.retired.get(digest)
        if model_id is not None:
            entry = self.entries.get(model_id)
            now = entry.current if entry is not None else None
            current = f"the current version is {now.fingerprint}" if now else f"{model_id!r} is no longer served"
            message = (
                f"session_id: the session was made on version {digest} of model {model_id!r}, which was retired "
                f"(CHARGEN_KEEP_VERSIONS={self.settings.keep_versions}); {current}; start a new session"
            )
            return Problem("model_version_retired", message, "session_id")
        message = (
            f"session_id: the session was saved by model {digest[:23]}..., which is not served here "
            f"(served: {self._served_list()})"
        )
        return Problem("model_mismatch", message, "session_id")

    # --- loading ---------------------------------------------------------------------------------

    async def start(self, single: LoadedModel | None = None) -> None:
        """Serve ``single`` (CHARGEN_MODEL), or everything in the models directory as it is now."""
        self._loop = asyncio.get_running_loop()
        if single is not None:
            version = await self._start_version(single, None)
            self.entries[single.model_id] = ModelEntry(single.model_id, None, [version])
            self._count()
            return
        await self.reconcile()

    def _precision_for(self, model: LoadedModel) -> Choice:
        """fp32 or bf16 steps (CHARGEN_PRECISION), measured at the engine's thread count for auto."""
        torch.set_num_threads(self.settings.torch_threads)  # OpenMP thread counts are per calling thread
        return choose_precision(model, self.settings.precision, self.settings.max_batch, self.settings.mkldnn)

    async def _start_version(self, model: LoadedModel, path: Path | None) -> ServedVersion:
        self.metrics.for_model(model.model_id)  # its series exist from the start, at zero
        choice = await asyncio.to_thread(self._precision_for, model)
        engine = Engine(choice.model, self.metrics, self.engine_config)
        assert self._loop is not None
        await asyncio.to_thread(engine.start, self._loop)
        return ServedVersion(model, engine, path)

    async def reconcile(self) -> None:
        """Bring what is served in line with the directory (new, replaced and removed files)."""
        if not self.directories:
            return
        async with self._lock:
            found: dict[Path, tuple[int, int, int]] = {}
            for directory in self.directories:
                try:
                    found |= await asyncio.to_thread(scan, directory)
                except OSError as err:  # unreadable for a moment (a remount?): change nothing
                    log.warning("cannot read the models directory %s: %s", directory, err)
                    return
            for path in [p for p in self.files if p not in found]:
                record = self.files.pop(path)
                entry = self.entries.get(record.model_id or "")
                if entry is not None and entry.path == path:
                    log.info("model %s: its file %s was removed; draining", entry.model_id, path.name)
                    self._remove(entry)
            for path, signature in sorted(found.items()):
                record = self.files.get(path)
                if record is None or record.signature != signature:
                    await self._load_file(path, signature, record)
            self._count()

    async def _load_file(self, path: Path, signature: tuple[int, int, int], before: FileRecord | None) -> None:
        record = self.files[path] = FileRecord(path, signature, "loading", before.model_id if before else None)
        try:
            model = await asyncio.to_thread(load_model, path)
        except ArtifactError as err:
            self._failed(record, str(err))
            return
        except Exception as err:  # torch can raise anything on a strange file: it is still just a bad file
            self._failed(record, f"{path} could not be loaded ({type(err).__name__}: {err})")
            return
        model_id = model.model_id
        if not MODEL_ID.fullmatch(model_id):
            self._failed(record, f"{path.name}: model id {model_id[:80]!r} is not 1-64 letters, digits, '.', '_', '-'")
            return
        entry = self.entries.get(model_id)
        if entry is not None and entry.path != path:
            where = entry.path.name if entry.path else "CHARGEN_MODEL"
            self._failed(record, f"{path.name}: model id {model_id!r} is already served from {where}")
            return
        if entry is not None:
            current = entry.current
            if current is not None and current.fingerprint == model.fingerprint:
                record.status, record.model_id = "ready", model_id  # the same weights again
                entry.last_error = None
                return
        elif len(self.entries) >= self.settings.max_models:
            self._failed(
                record,
                f"{path.name}: CHARGEN_MAX_MODELS={self.settings.max_models} models are served already "
                f"({self._served_list()}); remove or unload one, or raise the limit",
            )
            return
        try:
            version = await self._start_version(model, path)
        except Exception as err:
            self._failed(record, f"{path.name}: its engine did not start ({type(err).__name__}: {err})")
            return
        record.status, record.model_id, record.reason = "ready", model_id, None
        refreeze()
        if entry is None:
            self.entries[model_id] = ModelEntry(model_id, path, [version])
            log.info("model %s: serving %s (%s)", model_id, path.name, model.fingerprint[:19])
        else:
            entry.versions.append(version)
            entry.last_error = None
            log.info("model %s: new version %s from %s", model_id, model.fingerprint[:19], path.name)
            self._retire_beyond(entry)

    def _failed(self, record: FileRecord, reason: str) -> None:
        record.status, record.reason = "failed", reason
        entry = self.entries.get(record.model_id or "")
        if entry is not None and entry.path == record.path:
            entry.last_error = reason  # its file was replaced by a bad one: the loaded versions serve on
        log.warning("models directory: %s", reason)

    # --- retiring --------------------------------------------------------------------------------

    def _retire_beyond(self, entry: ModelEntry) -> None:
        live = entry.live
        for version in live[: max(0, len(live) - 1 - self.settings.keep_versions)]:
            self._retire(entry, version)

    def _remove(self, entry: ModelEntry) -> None:
        """The id takes no new work; its versions drain, then it is gone."""
        entry.removed = True
        self.entries.pop(entry.model_id, None)
        self.leaving.append(entry)
        for version in entry.live:
            self._retire(entry, version)

    def _retire(self, entry: ModelEntry, version: ServedVersion) -> None:
        version.accepting = False
        self.retired[version.state_digest] = entry.model_id
        self.retired.move_to_end(version.state_digest)
        while len(self.retired) > RETIRED_REMEMBERED:
            self.retired.popitem(last=False)
        task = asyncio.get_running_loop().create_task(self._drain(entry, version))
        self._drains.add(task)
        task.add_done_callback(self._drains.discard)

    async def _drain(self, entry: ModelEntry, version: ServedVersion) -> None:
        while version.busy:
            await asyncio.sleep(DRAIN_POLL_S)
        await asyncio.to_thread(version.engine.stop)
        if version in entry.versions:
            entry.versions.remove(version)
        if entry.removed and not entry.versions and entry in self.leaving:
            self.leaving.remove(entry)
        del version  # the last reference but the task's: the model's memory goes now
        refreeze()
        log.info("model %s: a version unloaded", entry.model_id)
        self._count()

    def _count(self) -> None:
        gauge = self.metrics.models_loaded
        versions = [v for e in (*self.entries.values(), *self.leaving) for v in e.versions]
        gauge.labels("ready").set(sum(v.accepting for v in versions))
        gauge.labels("draining").set(sum(not v.accepting for v in versions))
        gauge.labels("failed").set(sum(r.status == "failed" for r in self.files.values()))

    # --- explicit control (operators) ------------------------------------------------------------

    def _path_for(self, model_id: str) -> Path | None:
        entry = self.entries.get(model_id)
        if entry is not None:
            return entry.path
        for record in self.files.values():
            if record.shown_id == model_id:
                return record.path
        if MODEL_ID.fullmatch(model_id):
            for directory in self.directories:
                if (directory / f"{model_id}.pt").is_file():
                    return directory / f"{model_id}.pt"
        return None

    async def load(self, model_id: str) -> FileRecord | None:
        """Load (again) the file of ``model_id`` now, even unchanged; None if there is none."""
        path = self._path_for(model_id)
        signature = signature_of(path) if path is not None else None
        if path is None or signature is None:
            return None
        async with self._lock:
            await self._load_file(path, signature, self.files.get(path))
            self._count()
        return self.files[path]

    async def unload(self, model_id: str) -> ModelEntry | None:
        """Stop serving ``model_id`` (it drains); its file is skipped until it changes or is loaded."""
        async with self._lock:
            entry = self.entries.get(model_id)
            if entry is None:
                return None
            if entry.path is not None and entry.path in self.files:
                self.files[entry.path].status = "unloaded"
            self._remove(entry)
            self._count()
            return entry

    # --- shutdown --------------------------------------------------------------------------------

    def all_versions(self) -> list[ServedVersion]:
        return [v for e in (*self.entries.values(), *self.leaving) for v in e.versions]

    def engine_failure(self) -> str | None:
        """Why an engine thread died, if one did (the process should then be restarted)."""
        for version in self.all_versions():
            if version.engine.failure is not None:
                return f"model {version.model_id}: {version.engine.failure}"
        return None

    async def close(self) -> None:
        for task in list(self._drains):
            task.cancel()
        for version in self.all_versions():
            await asyncio.to_thread(version.engine.stop)


def refreeze() -> None:
    """Start-up freezes what it made out of the cyclic GC (service/main.py: full collections of it
    stalled every stream); a model loaded later, or the cycles of one unloaded, are brought in line
    by one full collection here, once per change of the models served."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()

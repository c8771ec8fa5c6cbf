"""GET /v1/models: the OpenAI-style list of every model, with its versions and status.

Each row: the id, its current version's fingerprint, status (``loading``, ``ready``,
``draining``, ``failed``), the reason when failed, the architecture and validation bits/char, when
it was loaded, and every version still loaded (older ones stay for their sessions).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from service.artifact import LoadedModel
from service.dependencies import RegistryDep
from service.errors import ApiError
from service.repository import ModelEntry, ModelRegistry, ServedVersion
from service.repository.files import FileRecord

router = APIRouter(tags=["openai"])


def describe(model: LoadedModel) -> dict[str, Any]:
    meta = model.meta
    return {
        "id": model.model_id,
        "object": "model",
        "created": model.created,
        "owned_by": "chargen",
        "fingerprint": model.fingerprint,
        "layers": model.layers,
        "hidden": model.hidden,
        "vocab_size": len(model.vocab),
        "vocab": model.vocab,  # a character's id (logit_bias's keys, logprobs) is its index here
        "params": meta.get("params"),
        "val_bpc": meta.get("val_bpc"),
        "train_steps": meta.get("train_steps"),
    }


def describe_version(version: ServedVersion) -> dict[str, Any]:
    return {"fingerprint": version.fingerprint, "status": version.status, "loaded_at": int(version.loaded_at)}


def describe_entry(entry: ModelEntry, registry: ModelRegistry) -> dict[str, Any]:
    shown = entry.current or entry.versions[-1]
    default = registry.default_entry()
    return {
        **describe(shown.model),
        "status": "ready" if entry.current is not None else "draining",
        "reason": None,
        "loaded_at": int(shown.loaded_at),
        "file": entry.path.name if entry.path is not None else None,
        "default": default is entry,
        "last_error": entry.last_error,
        "versions": [describe_version(v) for v in entry.versions],
    }


def describe_file(record: FileRecord) -> dict[str, Any]:
    """A file that is not (yet) a served model: loading, or failed with the reason."""
    return {
        "id": record.shown_id,
        "object": "model",
        "created": None,
        "owned_by": "chargen",
        "fingerprint": None,
        "layers": None,
        "hidden": None,
        "vocab_size": None,
        "params": None,
        "val_bpc": None,
        "train_steps": None,
        "status": record.status,
        "reason": record.reason,
        "loaded_at": None,
        "file": record.path.name,
        "default": False,
        "last_error": None,
        "versions": [],
    }


def rows(registry: ModelRegistry) -> list[dict[str, Any]]:
    shown = [describe_entry(e, registry) for e in registry.entries.values()]
    shown += [describe_entry(e, registry) for e in registry.leaving if e.versions]
    taken = {(row["id"], row["status"]) for row in shown}
    served = set(registry.entries)
    for record in registry.files.values():
        unserved = record.status in ("loading", "failed") and record.shown_id not in served
        if unserved and (record.shown_id, record.status) not in taken:
            shown.append(describe_file(record))
    return sorted(shown, key=lambda row: (row["id"], row["status"]))


def find(registry: ModelRegistry, model_id: str) -> dict[str, Any]:
    entry = registry.entries.get(model_id)
    if entry is not None:
        return describe_entry(entry, registry)
    for row in rows(registry):
        if model_id in (row["id"], row["fingerprint"]):
            return row
    raise ApiError(
        404,
        f"model: {model_id!r} is not served here (served: {', '.join(map(repr, registry.served_ids)) or 'none'})",
        "model",
        "model_not_found",
    )


@router.get("/models")
async def list_models(registry: RegistryDep) -> dict[str, Any]:
    return {"object": "list", "data": rows(registry)}


@router.get("/models/{model_id}")
async def get_model(model_id: str, registry: RegistryDep) -> dict[str, Any]:
    return find(registry, model_id)

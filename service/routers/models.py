"""GET /v1/models: the OpenAI-style list, with the one loaded model."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from service.artifact import LoadedModel
from service.dependencies import ModelDep
from service.errors import ApiError

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


@router.get("/models")
async def list_models(model: ModelDep) -> dict[str, Any]:
    return {"object": "list", "data": [describe(model)]}


@router.get("/models/{model_id}")
async def get_model(model_id: str, model: ModelDep) -> dict[str, Any]:
    if model_id not in (model.model_id, model.fingerprint):
        raise ApiError(404, f"model: {model_id!r} is not served here", "model", "model_not_found")
    return describe(model)

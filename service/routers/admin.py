"""POST /v1/models/{id}/load and /unload: explicit control for operators (Triton's EXPLICIT mode).

Only with an admin key (``CHARGEN_ADMIN_KEYS``, kept as SHA-256 digests like the API keys): no key
is a 401, a key that is not an admin key (an API key, say) a 403, and with no admin keys
configured the routes are off (403). They act on this process only: with several replicas (or
workers) an operator calls each, or changes the models directory, which every replica watches.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from service.auth import BEARER, ApiKeys
from service.dependencies import RegistryDep
from service.errors import ApiError, error_response
from service.routers.models import describe_file, find

router = APIRouter(
    tags=["admin"],
    responses={
        403: error_response("not an admin key, or admin endpoints off (no CHARGEN_ADMIN_KEYS)"),
        409: error_response("the service serves one CHARGEN_MODEL, not a models directory"),
    },
)


async def require_admin(request: Request) -> None:
    keys: ApiKeys = request.app.state.admin_keys
    if not keys.enabled:
        raise ApiError(403, "admin endpoints are off: set CHARGEN_ADMIN_KEYS to use them", None, "admin_disabled")
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    credentials = credentials.strip()
    if scheme.lower() != "bearer" or not credentials:
        raise ApiError(
            401, "no admin key: send the header Authorization: Bearer <key>", None, "missing_api_key", dict(BEARER)
        )
    if keys.owner_of(credentials) is None:  # the key itself is never echoed or logged
        raise ApiError(403, "this key is not an admin key", None, "not_admin")


AdminDep = Annotated[None, Depends(require_admin)]


def need_directory(registry: Any) -> None:
    if not registry.directories:
        raise ApiError(
            409, "explicit load and unload need a models directory (CHARGEN_MODELS_DIR)", None, "no_models_dir"
        )


@router.post("/models/{model_id}/load", responses={422: error_response("the model's file is not a usable artifact")})
async def load(model_id: str, registry: RegistryDep, _: AdminDep) -> Any:
    """Load the model's file now (again, even unchanged); 422 with the reason if it does not load."""
    need_directory(registry)
    record = await registry.load(model_id)
    if record is None:
        where = ":".join(map(str, registry.directories))
        message = f"model: no artifact file for {model_id!r} in {where} (looked for {model_id}.pt)"
        raise ApiError(404, message, "model", "model_not_found")
    if record.status == "failed":
        raise ApiError(422, f"model: {record.reason}", "model", "model_load_failed")
    return find(registry, record.shown_id) if record.status == "ready" else describe_file(record)


@router.post("/models/{model_id}/unload", status_code=202)
async def unload(model_id: str, registry: RegistryDep, _: AdminDep) -> Any:
    """Stop serving the model: it takes no new work, its streams finish, then it is unloaded. Its
    file is left alone until it changes or is loaded again."""
    need_directory(registry)
    entry = await registry.unload(model_id)
    if entry is None:
        served = ", ".join(map(repr, registry.served_ids)) or "none"
        raise ApiError(404, f"model: {model_id!r} is not served here (served: {served})", "model", "model_not_found")
    body = {"id": model_id, "object": "model", "status": "draining" if entry.versions else "unloaded"}
    return JSONResponse(body, status_code=202)

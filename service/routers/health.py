"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.dependencies import MetricsDep
from service.state_store import StoreUnavailable

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz(request: Request) -> JSONResponse:
    """200 while the process can serve; 503 once an engine thread has died (restart the process)."""
    registry = getattr(request.app.state, "registry", None)
    if registry is not None and (reason := registry.engine_failure()) is not None:
        return JSONResponse({"status": "failed", "reason": reason}, status_code=503)
    return JSONResponse({"status": "ok"})


@router.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    """200 only when a model is loaded, the engines of the models served run and the state store
    answers."""
    state = request.app.state
    checks: dict[str, Any] = {}
    registry = getattr(state, "registry", None)
    default = registry.default_entry() if registry is not None else None
    model = default.current.model if default is not None and default.current is not None else None
    engine = default.current.engine if default is not None and default.current is not None else None
    live = [v for e in registry.entries.values() for v in e.live] if registry is not None else []
    store = getattr(state, "store", None)
    checks["model"] = "ok" if model is not None else "not loaded"
    checks["engine"] = "ok" if live and all(v.engine.alive for v in live) else "not running"
    degraded: dict[str, str] = {}
    if store is None:
        checks["store"] = "not connected"
    else:
        try:
            note = await asyncio.wait_for(store.ping(), timeout=state.settings.redis_timeout_s + 1)
            checks["store"] = "ok"
            if note:  # a Redis Cluster shard failing over: still ready, the other shards serve
                degraded["store"] = note
        except (StoreUnavailable, TimeoutError) as err:
            checks["store"] = f"unavailable: {err or 'timeout'}"
    failing = [f"{name}: {value}" for name, value in checks.items() if value != "ok"]
    body: dict[str, Any] = {"status": "ready" if not failing else "not ready", "checks": checks}
    if degraded:
        body["degraded"] = degraded
    if failing:
        body["reason"] = "; ".join(failing)
    if engine is not None:
        body["batch_invariant"] = engine.batch_invariant
        body["step_min_rows"] = engine.step_min_rows
    if model is not None:
        body["model"] = model.model_id  # the default model
    if registry is not None:
        body["models"] = registry.served_ids
    return JSONResponse(body, status_code=200 if not failing else 503)


@router.get("/metrics")
async def metrics(metrics: MetricsDep) -> Response:
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

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
    """200 while the process can serve; 503 once its engine thread has died (restart the process)."""
    engine = getattr(request.app.state, "engine", None)
    if engine is not None and engine.failure is not None:
        return JSONResponse({"status": "failed", "reason": engine.failure}, status_code=503)
    return JSONResponse({"status": "ok"})


@router.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    """200 only when the model is loaded, the engine runs and the state store answers."""
    state = request.app.state
    checks: dict[str, Any] = {}
    model = getattr(state, "model", None)
    engine = getattr(state, "engine", None)
    store = getattr(state, "store", None)
    checks["model"] = "ok" if model is not None else "not loaded"
    checks["engine"] = "ok" if engine is not None and engine.alive else "not running"
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
        body["model"] = model.model_id
    return JSONResponse(body, status_code=200 if not failing else 503)


@router.get("/metrics")
async def metrics(metrics: MetricsDep) -> Response:
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

"""FastAPI dependencies: the objects the lifespan put on app.state, injected into routes.

They are ``async def`` although they never await: FastAPI runs a plain ``def`` dependency in its
thread pool, and three thread hops per request cost a burst of 64 new streams tens of
milliseconds, fighting the engine thread for the GIL.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.errors import ApiError
from service.generation import Generations
from service.metrics import Metrics
from service.repository import ModelRegistry
from service.settings import Settings
from service.state_store import SessionStore


def _state(request: Request, name: str) -> object:
    value = getattr(request.app.state, name, None)
    if value is None:
        raise ApiError(503, "the service is starting up", None, "not_ready")
    return value


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


async def get_registry(request: Request) -> ModelRegistry:
    """The models served: a route resolves the request's ``model`` (or its session's) with it."""
    return _state(request, "registry")  # type: ignore[return-value]


async def get_store(request: Request) -> SessionStore:
    return _state(request, "store")  # type: ignore[return-value]


async def get_generations(request: Request) -> Generations:
    return _state(request, "generations")  # type: ignore[return-value]


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics  # type: ignore[no-any-return]


SettingsDep = Annotated[Settings, Depends(get_settings)]
RegistryDep = Annotated[ModelRegistry, Depends(get_registry)]
StoreDep = Annotated[SessionStore, Depends(get_store)]
GenerationsDep = Annotated[Generations, Depends(get_generations)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]

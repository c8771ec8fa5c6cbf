"""Sessions: create (optionally primed with a prompt), inspect, delete, fork."""

from __future__ import annotations

import secrets
import time
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Body
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from service.artifact import LoadedModel
from service.auth import OwnerDep
from service.dependencies import GenerationsDep, MetricsDep, RegistryDep, SettingsDep, StoreDep
from service.generation import GenerationSpec
from service.problems import Problem, session_busy, store_unavailable
from service.sampling import SamplingParams
from service.session_access import read_owned_session, release_quietly, take_lease, unusable_state
from service.state_codec import (
    SessionState,
    StateDecodeError,
    describe_state,
    encode_state,
)
from service.state_store import SessionBusy, SessionNotFound, SessionStore, StoreUnavailable

router = APIRouter(tags=["sessions"])


class CreateSessionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str = ""
    model: str | None = Field(None, description="model id or version fingerprint (default: the default model)")


class SessionCreated(BaseModel):
    session_id: str
    expires_in_s: int
    model: str
    model_fingerprint: str  # the version the session is pinned to


class SessionInfo(BaseModel):
    session_id: str
    chars_consumed: int
    model: str
    model_fingerprint: str
    expires_in_s: int


def new_session_id() -> str:
    return secrets.token_urlsafe(24)  # 192 random bits


def fresh_state(model: LoadedModel) -> bytes:
    zeros = np.zeros((model.layers, model.hidden), dtype=np.float32)
    return encode_state(SessionState(h=zeros, c=zeros.copy(), pending=-1, chars_consumed=0), model.fingerprint)


@router.post("/sessions", status_code=201, response_model=SessionCreated)
async def create_session(
    generations: GenerationsDep,
    store: StoreDep,
    registry: RegistryDep,
    settings: SettingsDep,
    metrics: MetricsDep,
    owner: OwnerDep,
    body: Annotated[CreateSessionRequest | None, Body()] = None,
) -> Any:
    prompt = body.prompt if body is not None else ""
    requested = body.model if body is not None else None
    spec = GenerationSpec(prompt, 0, SamplingParams(temperature=0), owner=owner, model=requested)
    generations.validate(spec)
    model = registry.resolve(requested).model  # the session is pinned to this version
    session_id = new_session_id()
    try:
        await store.create(session_id, fresh_state(model), owner)
    except StoreUnavailable as err:
        raise store_unavailable(err) from None
    metrics.sessions_created.inc()
    if prompt:  # prime: feed the prompt through the engine and save the state after it
        spec.session_id = session_id
        try:
            job = await generations.start(spec, time.perf_counter())
        except Problem:
            await drop(store, session_id)
            raise
        outcome = await job.outcome()
        if outcome.problem is not None:
            await drop(store, session_id)
            raise outcome.problem
    return SessionCreated(
        session_id=session_id,
        expires_in_s=settings.session_ttl_s,
        model=model.model_id,
        model_fingerprint=model.fingerprint,
    )


async def drop(store: SessionStore, session_id: str) -> None:
    try:
        token, _ = await store.acquire(session_id)
        await store.delete(session_id, token)
    except (SessionNotFound, SessionBusy, StoreUnavailable):
        pass  # it expires by itself


@router.get("/sessions/{session_id}", response_model=SessionInfo)
async def get_session(session_id: str, store: StoreDep, registry: RegistryDep, owner: OwnerDep) -> Any:
    stored = await read_owned_session(store, session_id, owner)
    try:
        fingerprint, consumed = describe_state(stored.state)
    except StateDecodeError as err:
        raise unusable_state(err) from None
    version = registry.by_digest(fingerprint)  # None: a version retired or not served here
    return SessionInfo(
        session_id=session_id,
        chars_consumed=consumed,
        model=version.model_id if version is not None else fingerprint,
        model_fingerprint=fingerprint,
        expires_in_s=stored.expires_in_s,
    )


@router.delete("/sessions/{session_id}", status_code=204)
async def delete_session(session_id: str, store: StoreDep, owner: OwnerDep) -> Response:
    token, _ = await take_lease(store, session_id, owner)
    try:
        if not await store.delete(session_id, token):
            raise session_busy(session_id)
    except StoreUnavailable as err:
        raise store_unavailable(err) from None
    return Response(status_code=204)


@router.post("/sessions/{session_id}/fork", status_code=201)
async def fork_session(
    session_id: str, store: StoreDep, settings: SettingsDep, metrics: MetricsDep, owner: OwnerDep
) -> Any:
    token, state = await take_lease(store, session_id, owner)
    new_id = new_session_id()
    try:
        await store.create(new_id, state, owner)  # the fork belongs to the same key
    except StoreUnavailable as err:
        raise store_unavailable(err) from None
    finally:
        await release_quietly(store, session_id, token)
    metrics.sessions_created.inc()
    return JSONResponse(
        {"session_id": new_id, "expires_in_s": settings.session_ttl_s, "forked_from": session_id}, status_code=201
    )

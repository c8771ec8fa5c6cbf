"""POST /v1/generate: chargen's own generation endpoint, JSON or server-sent events."""

from __future__ import annotations

import time
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from service.auth import OwnerDep
from service.dependencies import GenerationsDep
from service.engine import Finished
from service.generation import GenerationSpec
from service.job import Job
from service.routers.results import collect, stream
from service.sampling import SamplingParams
from service.sse import EventStreamResponse

router = APIRouter(tags=["generate"])

SEED_RANGE = {"ge": -(2**63), "le": 2**64 - 1}


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = ""
    max_new_chars: int = Field(200, ge=0)
    temperature: float = Field(1.0, ge=0, le=100, allow_inf_nan=False, description="0 = greedy")
    top_k: int | None = Field(None, ge=0, le=2**31, description="null or 0: no limit")
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, **SEED_RANGE)
    stop: list[str] | None = Field(None, description="at most 4; the stop string is not returned")
    session_id: str | None = None
    stream: bool = False
    model: str | None = Field(None, description="model id or version fingerprint (default: the default model)")

    def spec(self) -> GenerationSpec:
        params = SamplingParams(self.temperature, self.top_k, self.top_p, self.seed)
        return GenerationSpec(
            self.prompt,
            self.max_new_chars,
            params,
            tuple(self.stop or ()),
            self.session_id,
            self.stream,
            model=self.model,
        )


class Usage(BaseModel):
    prompt_chars: int
    completion_chars: int


class GenerateResponse(BaseModel):
    text: str
    finish_reason: Literal["length", "stop"]
    session_id: str | None
    model: str
    usage: Usage


def usage(spec: GenerationSpec, completion_chars: int) -> dict[str, int]:
    return {"prompt_chars": len(spec.prompt), "completion_chars": completion_chars}


@router.post("/generate", response_model=GenerateResponse, responses={200: {"content": {"text/event-stream": {}}}})
async def generate(body: GenerateRequest, request: Request, generations: GenerationsDep, owner: OwnerDep) -> Response:
    received = time.perf_counter()
    spec = body.spec()
    spec.owner = owner
    generations.validate(spec)
    job = await generations.start(spec, received)
    if spec.stream:
        return stream_events(job)
    text, finished = await collect(job, request)
    payload = GenerateResponse(
        text=text,
        finish_reason=finished.reason,  # type: ignore[arg-type]
        session_id=spec.session_id,
        model=job.model_id,
        usage=Usage(**usage(spec, finished.completion_chars)),
    )
    return JSONResponse(payload.model_dump())


def stream_events(job: Job) -> EventStreamResponse:
    def final(finished: Finished) -> dict[str, Any]:
        return {
            "finish_reason": finished.reason,
            "session_id": job.session_id,
            "usage": usage(job.spec, finished.completion_chars),
        }

    return stream(job, lambda piece: {"text": piece}, final)

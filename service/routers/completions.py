"""POST /v1/completions: OpenAI's legacy completions API (a token is one character here)."""

from __future__ import annotations

import secrets
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from service.artifact import LoadedModel
from service.auth import OwnerDep
from service.dependencies import GenerationsDep
from service.errors import ApiError
from service.generation import GenerationSpec
from service.job import Job
from service.routers.results import collect, stream
from service.sampling import SamplingParams
from service.sse import EventStreamResponse

router = APIRouter(tags=["openai"])


class CompletionRequest(BaseModel):
    # OpenAI clients send fields we do not use (user, stream_options, ...): ignore them.
    model_config = ConfigDict(extra="ignore")

    model: str
    prompt: str = ""
    max_tokens: int | None = Field(16, ge=0, description="characters")
    temperature: float | None = Field(1.0, ge=0, le=100, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, le=2**31, description="extension: null or 0 = no limit")
    n: int | None = 1
    stream: bool | None = False
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    echo: bool | None = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    session_id: str | None = Field(None, description="extension: continue a chargen session")

    def check_supported(self) -> None:
        if self.n not in (None, 1):
            raise ApiError(400, f"n: only n=1 is supported, got {self.n}", "n", "unsupported_value")
        if self.best_of not in (None, 1):
            raise ApiError(400, "best_of: only best_of=1 is supported", "best_of", "unsupported_value")
        if self.echo:
            raise ApiError(400, "echo: echo=true is not supported", "echo", "unsupported_value")
        if self.logprobs is not None:
            raise ApiError(400, "logprobs: log probabilities are not supported", "logprobs", "unsupported_value")
        if self.suffix:
            raise ApiError(400, "suffix: suffixes are not supported", "suffix", "unsupported_value")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                raise ApiError(400, f"{name}: penalties are not supported", name, "unsupported_value")

    def spec(self) -> GenerationSpec:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        temperature = 1.0 if self.temperature is None else self.temperature
        params = SamplingParams(temperature, self.top_k, self.top_p, self.seed)
        max_new = 16 if self.max_tokens is None else self.max_tokens
        return GenerationSpec(self.prompt, max_new, params, stop, self.session_id, bool(self.stream), model=self.model)


def chunk(
    completion_id: str, created: int, model: LoadedModel, text: str, finish_reason: str | None, **extra: Any
) -> dict[str, Any]:
    return {
        "id": completion_id,
        "object": "text_completion",
        "created": created,
        "model": model.model_id,
        "system_fingerprint": model.fingerprint,
        "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}],
        **extra,
    }


@router.post("/completions", responses={200: {"content": {"text/event-stream": {}}}})
async def completions(
    body: CompletionRequest, request: Request, generations: GenerationsDep, owner: OwnerDep
) -> Response:
    received = time.perf_counter()
    if body.session_id is None:  # an unknown model is a 404 before anything else
        generations.registry.resolve(body.model)
    body.check_supported()
    spec = body.spec()
    spec.owner = owner
    generations.validate(spec, max_param="max_tokens")
    job = await generations.start(spec, received)
    assert job.version is not None
    model = job.version.model  # a session's requests run on the version it was made on
    completion_id = "cmpl-" + secrets.token_hex(12)
    created = int(time.time())
    if spec.stream:
        return stream_chunks(job, completion_id, created, model)
    text, finished = await collect(job, request)
    used = len(spec.prompt)
    extra: dict[str, Any] = {
        "usage": {
            "prompt_tokens": used,
            "completion_tokens": finished.completion_chars,
            "total_tokens": used + finished.completion_chars,
        }
    }
    if spec.session_id is not None:
        extra["session_id"] = spec.session_id
    return JSONResponse(chunk(completion_id, created, model, text, finished.reason, **extra))


def stream_chunks(job: Job, completion_id: str, created: int, model: LoadedModel) -> EventStreamResponse:
    return stream(
        job,
        lambda piece: chunk(completion_id, created, model, piece, None),
        lambda finished: chunk(completion_id, created, model, "", finished.reason),
    )

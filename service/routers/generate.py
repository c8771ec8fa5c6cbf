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
from service.routers.choices import StreamedLogprobs, choice_logprobs, echoed, parse_logit_bias
from service.routers.results import collect_all, stream_all
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
    n: int = Field(1, ge=1, description="choices (CHARGEN_MAX_N at most); the prompt is read once")
    logprobs: int | None = Field(None, ge=0, le=5, description="each character's log-probability and the top k")
    echo: bool = False
    presence_penalty: float = Field(0.0, ge=-2, le=2, allow_inf_nan=False)
    frequency_penalty: float = Field(0.0, ge=-2, le=2, allow_inf_nan=False)
    logit_bias: dict[str, float] | None = Field(None, description="character id -> -100..100")
    model: str | None = Field(None, description="model id or version fingerprint (default: the default model)")

    def spec(self) -> GenerationSpec:
        params = SamplingParams(
            self.temperature,
            self.top_k,
            self.top_p,
            self.seed,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            logit_bias=parse_logit_bias(self.logit_bias),
        )
        stop = tuple(self.stop or ())
        return GenerationSpec(
            self.prompt,
            self.max_new_chars,
            params,
            stop,
            self.session_id,
            self.stream,
            n=self.n,
            logprobs=self.logprobs,
            echo=self.echo,
            model=self.model,
        )


class Usage(BaseModel):
    prompt_chars: int
    completion_chars: int


class Choice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["length", "stop"]
    logprobs: dict[str, Any] | None = None


class GenerateResponse(BaseModel):
    text: str  # the first choice's (with echo: the prompt, then the generated text)
    finish_reason: Literal["length", "stop"]
    session_id: str | None
    model: str
    usage: Usage
    logprobs: dict[str, Any] | None = None  # with logprobs: OpenAI's shape (docs/service.md)
    choices: list[Choice] | None = None  # with n > 1: every choice, the first being the fields above


def usage(spec: GenerationSpec, completion_chars: int) -> dict[str, int]:
    return {"prompt_chars": len(spec.prompt), "completion_chars": completion_chars}


@router.post("/generate", response_model=GenerateResponse, responses={200: {"content": {"text/event-stream": {}}}})
async def generate(body: GenerateRequest, request: Request, generations: GenerationsDep, owner: OwnerDep) -> Response:
    received = time.perf_counter()
    spec = body.spec()
    spec.owner = owner
    generations.validate(spec)
    jobs = await generations.start_choices(spec, received)
    assert jobs[0].version is not None
    model = jobs[0].version.model  # a session's requests run on the version it was made on
    if spec.stream:
        return stream_events(jobs, model.vocab)
    results = await collect_all(jobs, request)
    choices = [
        Choice(
            index=i,
            text=echoed(job) + text,
            finish_reason=finished.reason,  # type: ignore[arg-type]
            logprobs=choice_logprobs(model.vocab, job, text),
        )
        for i, (job, (text, finished)) in enumerate(zip(jobs, results, strict=True))
    ]
    payload = GenerateResponse(
        text=choices[0].text,
        finish_reason=choices[0].finish_reason,
        session_id=spec.session_id,
        model=jobs[0].model_id,
        usage=Usage(**usage(spec, sum(finished.completion_chars for _, finished in results))),
        logprobs=choices[0].logprobs,
        choices=choices if spec.n > 1 else None,
    )
    return JSONResponse(payload.model_dump(exclude_none=True) | {"session_id": spec.session_id})


def stream_events(jobs: list[Job], vocab: list[str]) -> EventStreamResponse:
    """``{"text": ...}`` per piece (with ``index`` when n > 1, ``logprobs`` when asked), then each
    choice's final event; with echo, each choice opens with its prompt."""
    logprobs = [StreamedLogprobs(vocab, job) for job in jobs]
    several = len(jobs) > 1

    def piece(i: int, text: str, lp: dict[str, Any] | None) -> dict[str, Any]:
        event: dict[str, Any] = {"text": text}
        if several:
            event["index"] = i
        if lp is not None:
            event["logprobs"] = lp
        return event

    def final(i: int, finished: Finished) -> dict[str, Any]:
        event = {
            "finish_reason": finished.reason,
            "session_id": jobs[i].session_id,
            "usage": usage(jobs[i].spec, finished.completion_chars),
        }
        return event | {"index": i} if several else event

    return stream_all(
        jobs,
        lambda i, text: piece(i, text, logprobs[i].piece(text)),
        final,
        (lambda i: piece(i, jobs[i].spec.prompt, logprobs[i].prompt())) if jobs[0].spec.echo else None,
    )

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
from service.engine import Finished
from service.errors import ApiError
from service.generation import GenerationSpec
from service.job import Job
from service.routers.choices import StreamedLogprobs, choice_logprobs, echoed, parse_logit_bias
from service.routers.results import collect_all, stream_all
from service.sampling import SamplingParams
from service.sse import EventStreamResponse

router = APIRouter(tags=["openai"])


# vLLM's sampling extensions this service does not implement: refused when set, never ignored
# (ignoring one would silently sample differently from what the client asked).
REFUSED_EXTRAS = {
    "use_beam_search": "beam search is not implemented (vLLM dropped it from completions too)",
    "min_p": "min_p is not implemented; use top_p or top_k",
    "repetition_penalty": "repetition_penalty is not implemented; use presence_penalty or frequency_penalty",
    "length_penalty": "length_penalty only applies to beam search, which is not implemented",
    "min_tokens": "min_tokens is not implemented: a character model has no end-of-sequence token to hold back",
    "ignore_eos": "there is no end-of-sequence token: generation always runs to max_tokens or a stop string",
    "stop_token_ids": "stop_token_ids is not implemented; use stop (a token is one character)",
    "include_stop_str_in_output": "include_stop_str_in_output is not implemented: the stop string is never returned",
    "allowed_token_ids": "allowed_token_ids is not implemented; use logit_bias",
    "prompt_logprobs": "prompt_logprobs is not implemented; use echo with logprobs",
    "truncate_prompt_tokens": "truncate_prompt_tokens is not implemented; the prompt is read whole",
    "guided_json": "guided decoding is not implemented",
    "guided_regex": "guided decoding is not implemented",
    "guided_choice": "guided decoding is not implemented",
    "guided_grammar": "guided decoding is not implemented",
    "response_format": "response formats are not implemented",
    "logits_processors": "custom logits processors are not implemented",
}


class CompletionRequest(BaseModel):
    # OpenAI clients send fields that change nothing here (user, ...): accepted; vLLM's sampling
    # extensions we lack are refused by name (REFUSED_EXTRAS).
    model_config = ConfigDict(extra="allow")

    model: str
    prompt: str = ""
    max_tokens: int | None = Field(16, ge=0, description="characters")
    temperature: float | None = Field(1.0, ge=0, le=100, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, le=2**31, description="extension: null or 0 = no limit")
    n: int | None = Field(1, ge=1, description="choices, up to CHARGEN_MAX_N; the prompt is read once")
    stream: bool | None = False
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    echo: bool | None = False
    logprobs: int | None = Field(None, ge=0, le=5, description="the model's log-probabilities, before sampling")
    best_of: int | None = None
    suffix: str | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2, allow_inf_nan=False)
    frequency_penalty: float | None = Field(None, ge=-2, le=2, allow_inf_nan=False)
    logit_bias: dict[str, float] | None = Field(
        None, description="character id (its index in /v1/models' vocab) -> -100..100"
    )
    stream_options: dict[str, Any] | None = Field(None, description="include_usage: a last chunk with the usage")
    session_id: str | None = Field(None, description="extension: continue a chargen session")

    def check_supported(self) -> None:
        for name, value in (self.model_extra or {}).items():
            if name in REFUSED_EXTRAS and value not in (None, False, [], {}):
                raise ApiError(400, f"{name}: {REFUSED_EXTRAS[name]}", name, "unsupported_value")
        if self.best_of not in (None, 1, self.n or 1):
            message = "best_of: deprecated by vLLM and OpenAI and not supported; "
            message += "send n and rank the choices by their logprobs"
            raise ApiError(400, message, "best_of", "unsupported_value")
        if self.suffix:
            raise ApiError(
                400,
                "suffix: insertion after a suffix is not supported by this left-to-right model",
                "suffix",
                "unsupported_value",
            )

    def spec(self) -> GenerationSpec:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        temperature = 1.0 if self.temperature is None else self.temperature
        params = SamplingParams(
            temperature,
            self.top_k,
            self.top_p,
            self.seed,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            logit_bias=parse_logit_bias(self.logit_bias),
        )
        max_new = 16 if self.max_tokens is None else self.max_tokens
        return GenerationSpec(
            self.prompt,
            max_new,
            params,
            stop,
            self.session_id,
            bool(self.stream),
            model=self.model,
            n=self.n or 1,
            logprobs=self.logprobs,
            echo=bool(self.echo),
        )


def payload(
    completion_id: str, created: int, model: LoadedModel, choices: list[dict[str, Any]], **extra: Any
) -> dict[str, Any]:
    return {
        "id": completion_id,
        "object": "text_completion",
        "created": created,
        "model": model.model_id,
        "system_fingerprint": model.fingerprint,
        "choices": choices,
        **extra,
    }


def choice(index: int, text: str, finish_reason: str | None, logprobs: dict[str, Any] | None) -> dict[str, Any]:
    return {"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish_reason}


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
    jobs = await generations.start_choices(spec, received)
    assert jobs[0].version is not None
    model = jobs[0].version.model  # a session's requests run on the version it was made on
    completion_id = "cmpl-" + secrets.token_hex(12)
    created = int(time.time())
    if spec.stream:
        include_usage = bool((body.stream_options or {}).get("include_usage"))
        return stream_chunks(jobs, completion_id, created, model, include_usage)
    results = await collect_all(jobs, request)
    choices = [
        choice(i, echoed(job) + text, finished.reason, choice_logprobs(model.vocab, job, text))
        for i, (job, (text, finished)) in enumerate(zip(jobs, results, strict=True))
    ]
    extra: dict[str, Any] = {"usage": usage(spec, [finished for _, finished in results])}
    if spec.session_id is not None:
        extra["session_id"] = spec.session_id
    return JSONResponse(payload(completion_id, created, model, choices, **extra))


def usage(spec: GenerationSpec, finished: list[Finished]) -> dict[str, int]:
    """Exact counts: the prompt once (it is read once, whatever n), every choice's generated text
    (an echoed prompt is not generated)."""
    prompt, generated = len(spec.prompt), sum(f.completion_chars for f in finished)
    return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}


def stream_chunks(
    jobs: list[Job], completion_id: str, created: int, model: LoadedModel, include_usage: bool
) -> EventStreamResponse:
    """One chunk per piece of any choice (its ``index`` says which), each choice's final chunk with
    its finish_reason; with echo, each choice opens with its prompt; with ``stream_options:
    {"include_usage": true}`` a last chunk with no choices carries the usage, as OpenAI sends it."""
    logprobs = [StreamedLogprobs(model.vocab, job) for job in jobs]
    spec = jobs[0].spec

    def chunk(i: int, text: str, finish_reason: str | None, lp: dict[str, Any] | None) -> dict[str, Any]:
        return payload(completion_id, created, model, [choice(i, text, finish_reason, lp)])

    return stream_all(
        jobs,
        lambda i, piece: chunk(i, piece, None, logprobs[i].piece(piece)),
        lambda i, finished: chunk(i, "", finished.reason, None),
        (lambda i: chunk(i, jobs[i].spec.prompt, None, logprobs[i].prompt())) if spec.echo else None,
        (lambda finished: payload(completion_id, created, model, [], usage=usage(spec, finished)))
        if include_usage
        else None,
    )

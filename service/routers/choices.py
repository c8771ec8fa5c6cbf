"""A request's choices over HTTP: each choice's text (the prompt first, with echo) and its
log-probabilities in OpenAI's ``logprobs`` shape, a token being one character.

The numbers come from the engine (service/engine/logprobs.py): the model's own log-softmax, before
temperature, top_k, top_p, logit_bias and penalties.
"""

from __future__ import annotations

from typing import Any

from service.engine.requests import Score
from service.errors import ApiError
from service.job import Job

LOGPROB_FLOOR = -9999.0  # JSON has no -inf; vLLM reports this floor


def logprobs_of(vocab: list[str], text: str, scores: list[Score | None], offset: int = 0) -> dict[str, Any]:
    """OpenAI's logprobs object for ``text``: one score per character (None for a prompt's first
    character, which nothing predicts). ``top_logprobs`` holds the character itself and the k most
    likely ones (so k or k + 1 entries), as vLLM does; ``text_offset`` counts from ``offset``."""
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    for ch, score in zip(text, scores, strict=True):
        if score is None:
            token_logprobs.append(None)
            top_logprobs.append(None)
            continue
        lp, alternatives = score
        token_logprobs.append(max(lp, LOGPROB_FLOOR))
        top = {ch: max(lp, LOGPROB_FLOOR)}
        top.update((vocab[i], max(v, LOGPROB_FLOOR)) for i, v in alternatives)
        top_logprobs.append(top)
    return {
        "tokens": list(text),
        "token_logprobs": token_logprobs,
        "top_logprobs": top_logprobs,
        "text_offset": list(range(offset, offset + len(text))),
    }


def echoed(job: Job) -> str:
    """What a choice's text starts with: the prompt with echo, else nothing."""
    return job.spec.prompt if job.spec.echo else ""


def choice_logprobs(vocab: list[str], job: Job, text: str) -> dict[str, Any] | None:
    """A whole (non-streamed) choice's logprobs: the echoed prompt's, then its generated text's."""
    if job.spec.logprobs is None:
        return None
    prompt = echoed(job)
    handle = job.handle
    scores = [*handle.prompt_logprobs[: len(prompt)], *handle.logprobs[: len(text)]]
    return logprobs_of(vocab, prompt + text, scores)


class StreamedLogprobs:
    """A streamed choice's logprobs, piece by piece: each piece's characters' scores, in order,
    with ``text_offset`` running on from the echoed prompt."""

    def __init__(self, vocab: list[str], job: Job) -> None:
        self.vocab = vocab
        self.job = job
        self.used = 0  # generated characters already described
        self.offset = 0

    def prompt(self) -> dict[str, Any] | None:
        """The echoed prompt's (the stream's first event with echo)."""
        if self.job.spec.logprobs is None:
            return None
        prompt = self.job.spec.prompt
        self.offset = len(prompt)
        return logprobs_of(self.vocab, prompt, list(self.job.handle.prompt_logprobs[: len(prompt)]))

    def piece(self, text: str) -> dict[str, Any] | None:
        if self.job.spec.logprobs is None:
            return None
        scores = self.job.handle.logprobs[self.used : self.used + len(text)]
        result = logprobs_of(self.vocab, text, list(scores), self.offset)
        self.used += len(text)
        self.offset += len(text)
        return result


def parse_logit_bias(bias: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
    """OpenAI's logit_bias (token id as a string -> -100..100) as (character id, bias) pairs; the
    ids' range is checked against the model's vocabulary in `Generations.validate`."""
    pairs = []
    for key, value in (bias or {}).items():
        if not key.strip().lstrip("-").isdigit():
            raise ApiError(400, f"logit_bias: key {key!r} is not a token id", "logit_bias", "invalid_value")
        if not -100 <= value <= 100:
            raise ApiError(400, f"logit_bias: {value} for {key!r} is not in -100..100", "logit_bias", "invalid_value")
        pairs.append((int(key), float(value)))
    return tuple(pairs)

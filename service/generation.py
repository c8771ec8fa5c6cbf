"""Starting a generation from the event loop's side: check it, take its session, queue its row.

The routes (native /v1/generate, OpenAI /v1/completions, session priming) share this: they differ
only in how they parse the request and shape the response. Everything here speaks in `Problem`s,
never HTTP (service/errors.py gives them their statuses); a running generation is a `Job`.

Life of a request with a session: take the session's lease (busy if another request holds it),
read and check its state, queue a row in the engine (at capacity when full), pass text on as it
comes, then save the state the engine returns (after exactly the text the client got) while
still holding the lease, and release it (service/job.py).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from service.engine import EngineFull, EngineStopped, GenerationRequest
from service.job import Job, Outcome
from service.metrics import Metrics
from service.problems import Problem, unknown_characters
from service.repository import ModelRegistry, ServedVersion
from service.sampling import SamplingParams
from service.session_access import release_quietly, state_for, take_lease
from service.settings import Settings
from service.state_store import SessionStore


@dataclass
class GenerationSpec:
    prompt: str
    max_new_chars: int
    params: SamplingParams
    stop: tuple[str, ...] = ()
    session_id: str | None = None
    stream: bool = False
    owner: str | None = None  # the caller's API key owner id (None: keys not configured)
    model: str | None = None  # the model id (or version fingerprint) asked for; None: the default
    n: int = 1  # choices, each its own generation from the prompt read once
    logprobs: int | None = None  # None: none; k: each character's log-probability and the top k
    echo: bool = False  # the prompt is returned before each choice's text (scored with logprobs)


class Generations:
    def __init__(self, registry: ModelRegistry, store: SessionStore, settings: Settings, metrics: Metrics) -> None:
        self.registry = registry
        self.store = store
        self.settings = settings
        self.metrics = metrics
        self._tasks: set[asyncio.Task[Outcome]] = set()
        self._jobs: set[Job] = set()
        self._per_owner: dict[str, int] = {}  # running generations per API key
        self.draining = False  # SIGTERM: refuse new generations, let running ones finish

    @property
    def active(self) -> int:
        """Generations not yet finished and saved."""
        return len(self._tasks)

    def stop_all(self) -> None:
        """Stop every running generation (drain timeout); each saves what its client was sent."""
        for job in list(self._jobs):
            job.stop()

    def validate(self, spec: GenerationSpec, prompt_param: str = "prompt", max_param: str = "max_new_chars") -> None:
        s = self.settings
        if not 1 <= spec.n <= s.max_n:
            raise Problem("too_many_choices", f"n: {spec.n} is not between 1 and {s.max_n} (CHARGEN_MAX_N)", "n")
        if spec.n > 1 and spec.session_id is not None:
            message = "n: a session has one text, so n > 1 cannot continue it; leave out session_id or send n=1"
            raise Problem("choices_with_session", message, "n")
        if len(spec.prompt) > s.max_prompt_chars:
            message = f"{prompt_param}: {len(spec.prompt)} characters, more than the limit of {s.max_prompt_chars}"
            raise Problem("prompt_too_long", message, prompt_param)
        if spec.session_id is None:  # with a session, its model is known once its state is read
            check_for_model(self.registry.resolve(spec.model), spec, prompt_param)
        if spec.max_new_chars > s.max_new_chars:
            message = f"{max_param}: {spec.max_new_chars} is over the limit of {s.max_new_chars}"
            raise Problem("too_many_chars", message, max_param)
        if len(spec.stop) > s.max_stop_strings:
            message = f"stop: at most {s.max_stop_strings} stop strings, got {len(spec.stop)}"
            raise Problem("too_many_stop_strings", message, "stop")
        for text in spec.stop:
            if not text:
                raise Problem("empty_stop_string", "stop: stop strings must not be empty", "stop")
            if len(text) > s.max_stop_chars:
                message = f"stop: a stop string is {len(text)} characters, over the limit of {s.max_stop_chars}"
                raise Problem("stop_string_too_long", message, "stop")

    async def start(self, spec: GenerationSpec, received_at: float | None = None) -> Job:
        """Take the session (if any), queue the row; raises a Problem when it cannot run."""
        return (await self.start_choices(spec, received_at))[0]

    async def start_choices(self, spec: GenerationSpec, received_at: float | None = None) -> list[Job]:
        """`start` for a request of ``spec.n`` choices: one job per choice, in order."""
        if self.draining:
            raise Problem("draining", "the service is shutting down; retry on another replica", retry_after_s=1)
        limit = self.settings.max_streams_per_key
        if spec.owner is not None and limit and self._per_owner.get(spec.owner, 0) + spec.n > limit:
            message = f"this API key already runs {limit} generations at once (the limit); retry when one ends"
            raise Problem("key_stream_limit", message, retry_after_s=self.settings.retry_after_s)
        # Take the key's slot before the first await, so concurrent requests cannot all pass the check.
        self._take_slot(spec.owner, spec.n)
        try:
            return await self._start(spec, received_at)
        except BaseException:
            self._free_slot(spec.owner, spec.n)
            raise

    def _take_slot(self, owner: str | None, slots: int = 1) -> None:
        if owner is not None:
            self._per_owner[owner] = self._per_owner.get(owner, 0) + slots

    def _free_slot(self, owner: str | None, slots: int = 1) -> None:
        if owner is not None:
            left = self._per_owner.pop(owner) - slots
            if left:
                self._per_owner[owner] = left

    async def _start(self, spec: GenerationSpec, received_at: float | None) -> list[Job]:
        sid, token, state = spec.session_id, None, None
        if sid is not None:
            token, blob = await take_lease(self.store, sid, spec.owner)
        try:
            if sid is not None:  # a session stays on the model version it was made on
                version = self.registry.for_session(blob, spec.model)
                check_for_model(version, spec)
                state = state_for(version.model, blob)
            else:
                version = self.registry.resolve(spec.model)
            request = GenerationRequest(
                prompt_ids=version.model.encode(spec.prompt),
                max_new_chars=spec.max_new_chars,
                params=spec.params,
                stop=spec.stop,
                state=state,
                auto_ack=not spec.stream,
                want_state=token is not None,
                n=spec.n,
                logprobs=spec.logprobs,
                score_prompt=spec.echo and spec.logprobs is not None,
            )
            try:
                handle = version.engine.submit(request)
            except EngineFull as err:
                message = f"the service is at capacity ({err}); retry shortly"
                raise Problem("capacity", message, retry_after_s=self.settings.retry_after_s) from None
            except EngineStopped as err:
                raise Problem("engine_stopped", f"the model engine is not running ({err})") from None
        except BaseException:
            if sid is not None and token is not None:
                await release_quietly(self.store, sid, token)
            raise
        metrics = self.metrics.for_model(version.model_id)
        received = received_at or time.perf_counter()
        return [
            self._run(Job(self.store, self.settings, metrics, spec, h, token if i == 0 else None, received), version)
            for i, h in enumerate([handle, *handle.siblings])  # only n=1 has a session (validate)
        ]

    def _run(self, job: Job, version: ServedVersion) -> Job:
        job.version = version
        version.jobs += 1  # the version stays loaded until this job has saved its session
        task = asyncio.get_running_loop().create_task(job.finalize())
        self._tasks.add(task)
        self._jobs.add(job)

        def done(task: asyncio.Task[Outcome]) -> None:
            self._tasks.discard(task)
            self._jobs.discard(job)
            self._free_slot(job.spec.owner)  # one of the slots taken in start_choices()
            version.jobs -= 1

        task.add_done_callback(done)
        job.attach(task)
        return job

    async def drain(self, timeout: float = 10.0) -> None:
        """Wait for in-flight saves (at shutdown)."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)


def check_for_model(version: ServedVersion, spec: GenerationSpec, prompt_param: str = "prompt") -> None:
    """What depends on the model: the prompt's characters and logit_bias's character ids."""
    vocab = len(version.model.vocab)
    for char_id, _ in spec.params.logit_bias:
        if not 0 <= char_id < vocab:
            message = f"logit_bias: {char_id} is not a character id (0..{vocab - 1}, see /v1/models' vocab)"
            raise Problem("unknown_token", message, "logit_bias")
    unknown = version.model.unknown_chars(spec.prompt)
    if unknown:
        raise unknown_characters(prompt_param, unknown)

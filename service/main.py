"""The app factory and `run` (what `chargen serve` calls)."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import gc
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from types import FrameType
from typing import Any

import torch
import uvicorn
from fastapi import Depends, FastAPI
from pydantic import ValidationError

from chargen.artifact import ArtifactError
from service import allocator
from service.artifact import LoadedModel, load_model
from service.auth import ApiKeys, require_key
from service.balancer import Acceptor, CountedConnections, LoadTable
from service.engine import EngineConfig
from service.errors import ERROR_RESPONSES, install_error_handlers
from service.generation import Generations
from service.metrics import FLUSH_INTERVAL_S, Metrics
from service.middleware import BodyLimitMiddleware, DrainingReadinessMiddleware, RequestMetricsMiddleware
from service.repository import ModelRegistry
from service.repository.watch import watch_models
from service.routers import admin, completions, generate, health, inspect, models, playground, sessions
from service.settings import Settings
from service.state_store import SessionStore, StoreUnavailable, open_store

log = logging.getLogger("chargen.service")

API_PREFIX = "/v1"  # every API route's prefix, given here once (the routers' paths omit it)


def configure_torch(settings: Settings) -> None:
    # Measured on the 2-core CI CPU: one intra-op thread per step is fastest (the other core
    # serves HTTP); oneDNN made no difference for these small matrices, so it stays off.
    torch.set_num_threads(settings.torch_threads)
    torch.backends.mkldnn.enabled = settings.mkldnn
    # The engine thread gives up the GIL inside every model step and must take it back after.
    # With Python's default 5 ms switch interval it waited behind a busy event loop for up to
    # 5 ms per step: a 5 ms step ran at a quarter of its speed beside a thread running Python.
    sys.setswitchinterval(settings.gil_switch_interval_ms / 1000)


def engine_config(settings: Settings) -> EngineConfig:
    return EngineConfig(
        max_streams=settings.max_streams,
        max_queue=settings.max_queue,
        max_batch=settings.max_batch,
        step_min_rows=settings.step_min_rows,
        prefill_chunk=settings.prefill_chunk,
        step_prefill_chars=settings.step_prefill_chars,
        decode_steps=settings.decode_steps,
        multi_step_ms=settings.multi_step_ms,
        stream_window=settings.stream_window,
        flush_interval_s=settings.flush_interval_ms / 1000,
        flush_events_per_s=settings.flush_events_per_s,
        torch_threads=settings.torch_threads,
    )


async def flush_metrics(metrics: Metrics) -> None:
    """A worker's engine figures into the shared metrics files, so any worker's /metrics has them."""
    while True:
        await asyncio.sleep(FLUSH_INTERVAL_S)
        metrics.flush()


async def sweep_expired(store: SessionStore, metrics: Metrics, interval_s: float) -> None:
    while True:
        await asyncio.sleep(interval_s)
        try:
            expired = await store.sweep_expired()
        except StoreUnavailable as err:
            log.warning("cannot sweep expired sessions: %s", err)
            continue
        if expired:
            metrics.sessions_expired.inc(expired)


def create_app(settings: Settings | None = None, model: LoadedModel | None = None) -> FastAPI:
    """The FastAPI app. The model (or every model of CHARGEN_MODELS_DIR) is loaded off the event
    loop at start-up unless given."""
    settings = settings or Settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        configure_torch(settings)
        registry = ModelRegistry(settings, metrics, engine_config(settings))
        if settings.models_dir is None:
            single = model or await asyncio.to_thread(load_model, settings.model_path, settings.model_id)
            await registry.start(single)
        else:
            await registry.start()
        store = open_store(settings)
        try:
            await store.open_connections(settings.max_streams)
        except StoreUnavailable as err:  # not fatal: /readyz reports it, and the pool connects later
            log.warning("cannot connect to the session store yet: %s", err)
        generations = Generations(registry, store, settings, metrics)
        app.state.registry, app.state.store = registry, store
        app.state.generations = generations
        sweeper = asyncio.create_task(sweep_expired(store, metrics, settings.sweep_interval_s))
        watcher = None
        if settings.models_dir is not None:  # every process (replica, worker) watches for itself
            watcher = asyncio.create_task(watch_models(registry, settings.model_directories, settings.models_poll_s))
        flusher = asyncio.create_task(flush_metrics(metrics)) if metrics.shared else None
        # What start-up made (modules, the model, the app) lives as long as the process: freeze it
        # out of the cyclic GC. Its full collections walked all of it, 80-180 ms each under load,
        # and every stream stalled for that long (docs/benchmarks.md).
        gc.collect()
        gc.freeze()
        log.info(
            "serving %s with sessions in %s, on %s",
            ", ".join(f"{v.model_id} ({v.fingerprint[:19]})" for v in registry.all_versions()) or "no model yet",
            store.describe(),  # never the URL's user name or password
            allocator.describe(),
        )
        try:
            yield
        finally:
            sweeper.cancel()
            if watcher is not None:
                watcher.cancel()
            await registry.close()
            await generations.drain()  # rows stopped by the engine save what their clients got
            await store.close()
            if flusher is not None:
                flusher.cancel()
                metrics.flush()

    app = FastAPI(
        title="chargen",
        version="0.1.0",
        lifespan=lifespan,
        description="Character-level LSTM text generation with sessions whose state lives in Redis.",
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.api_keys = ApiKeys(settings.api_keys.get_secret_value())
    app.state.admin_keys = ApiKeys(settings.admin_keys.get_secret_value())
    install_error_handlers(app)
    # API routes: the API key check (a no-op without CHARGEN_API_KEYS) and the error responses
    # they can give, declared for the OpenAPI document. Health, metrics and the playground page
    # stay open: probes and the page itself need no key (the page's API calls send one).
    protected = [Depends(require_key)]
    for router in (generate.router, completions.router, models.router, sessions.router, inspect.router):
        app.include_router(router, prefix=API_PREFIX, dependencies=protected, responses=ERROR_RESPONSES)
    # load/unload: operators' admin keys (CHARGEN_ADMIN_KEYS), checked by the routes themselves
    app.include_router(admin.router, prefix=API_PREFIX, responses=ERROR_RESPONSES)
    app.include_router(health.router)  # /healthz, /readyz, /metrics: where probes and scrapers look
    app.include_router(playground.router)  # GET /: the playground page
    playground.mount_static(app)
    app.openapi = lambda: accurate_openapi(app)  # type: ignore[method-assign]
    # added last = outermost: count every request, including those the body limit refuses
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(DrainingReadinessMiddleware)
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)
    return app


def accurate_openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document without its default 422 responses: the service answers 400 instead."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        for path in schema.get("paths", {}).values():
            for operation in path.values():
                operation.get("responses", {}).pop("422", None)
        metrics = schema.get("paths", {}).get("/metrics", {}).get("get")
        if metrics is not None:  # Prometheus text, not JSON
            metrics["responses"]["200"]["content"] = {"text/plain": {"schema": {"type": "string"}}}
        components = schema.get("components", {}).get("schemas", {})
        components.pop("HTTPValidationError", None)
        components.pop("ValidationError", None)
        app.openapi_schema = schema
    return app.openapi_schema


class DrainingServer(uvicorn.Server):
    """uvicorn with a graceful drain on SIGTERM/SIGINT, and exit status 0 after it.

    uvicorn alone closes its listening socket at once and then waits for open connections. Here
    the first signal instead: marks the service draining (new generations get 503 ``draining``,
    ``/readyz`` 503, so a load balancer moves on), lets running generations finish for up to
    ``drain_timeout_s``, then stops the ones left (each saves its session at what its client was
    sent and ends its stream with an error event), and only then lets uvicorn shut down (the
    lifespan stops the engine thread and closes the store). A second signal exits at once.

    A worker process (``parent_pid`` given) takes its signals from the supervisor, which forwards
    SIGTERM: it ignores the SIGINT a terminal's Ctrl-C sends the whole process group (or the
    supervisor's forwarded SIGTERM would count as a second signal), and drains by itself if the
    supervisor dies.
    """

    def __init__(
        self, config: uvicorn.Config, generations: Any, drain_timeout_s: float, parent_pid: int | None = None
    ) -> None:
        super().__init__(config)
        self._generations_of = generations  # callable: the app's Generations, once started
        self.drain_timeout_s = drain_timeout_s
        self.parent_pid = parent_pid
        self._drain_requested = False
        self._drain_deadline: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.parent_pid is not None and sig == signal.SIGINT:
            return
        # Not recorded in _captured_signals: uvicorn would re-raise it after shutdown, and the
        # process would die of the signal instead of exiting 0 after a clean drain.
        if self._drain_requested or self.should_exit:
            self.should_exit = self.force_exit = True
        else:
            self._drain_requested = True

    async def on_tick(self, counter: int) -> bool:
        if self.parent_pid is not None and not self._drain_requested and os.getppid() != self.parent_pid:
            log.warning("the supervisor (pid %d) is gone: draining", self.parent_pid)
            self._drain_requested = True
        if self._drain_requested and not self.should_exit:
            await self._drain_step()
        return await super().on_tick(counter)

    async def _drain_step(self) -> None:
        generations = self._generations_of()
        if generations is None:  # still starting: nothing to drain
            self.should_exit = True
            return
        if self._drain_deadline is None:
            generations.draining = True
            self._drain_deadline = time.monotonic() + self.drain_timeout_s
            log.info("draining: %d generation(s) running, up to %.0f s", generations.active, self.drain_timeout_s)
        if generations.active and time.monotonic() >= self._drain_deadline:
            log.warning("drain timeout: stopping %d generation(s), saving what was sent", generations.active)
            generations.stop_all()
            await generations.drain(timeout=10.0)
        if not generations.active:
            log.info("drained; shutting down")
            self.should_exit = True


def read_settings(**overrides: Any) -> Settings | None:
    """The settings, or None after one line on stderr naming each bad CHARGEN_* variable."""
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as err:
        problems = "; ".join(
            f"CHARGEN_{'_'.join(map(str, e['loc'])).upper()}: {e['msg']}" if e["loc"] else e["msg"]
            for e in err.errors()
        )
        print(f"chargen: error: invalid settings: {problems}", file=sys.stderr)
        return None


def read_model(settings: Settings) -> LoadedModel | None:
    """The artifact to serve, or None after one line on stderr saying what is wrong with it."""
    try:
        return load_model(settings.model_path, settings.model_id)
    except ArtifactError as err:
        print(f"chargen: error: {err}", file=sys.stderr)
        return None


def logging_config(settings: Settings) -> dict[str, Any]:
    """uvicorn's logging, with the service's own loggers printing as uvicorn's do.

    uvicorn configures only its own loggers: without a handler of their own, the service's info
    lines (what it serves, the drain on SIGTERM) went nowhere.
    """
    config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    config["loggers"]["chargen"] = {"handlers": ["default"], "level": settings.log_level.upper(), "propagate": False}
    return config


class WorkerServer(DrainingServer):
    """A worker of ``--workers N``: its connections come from an `Acceptor` taking turns on the
    shared socket, and it leaves (drains, exits 1) once one of its engine threads has died, for
    the supervisor to start another: a dead engine would otherwise keep taking its share of the
    connections and answer each with 503 while probes on the shared port mostly reach the others.
    """

    def __init__(
        self,
        *args: Any,
        listener: socket.socket,
        table: LoadTable,
        slot: int,
        engine_failure: Callable[[], str | None],
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.listener = listener
        self.table = table
        self.slot = slot
        self.engine_failure = engine_failure  # why an engine of this worker died, or None
        self.engine_died = False
        self.acceptor: Acceptor | None = None
        self.counted: Callable[[int], None] | None = None  # set by worker_server(): the connections gauge
        self.server_state.connections = CountedConnections(self._connections_changed)

    async def on_tick(self, counter: int) -> bool:
        if not self.engine_died and (failure := self.engine_failure()) is not None:
            log.error("an engine of this worker died (%s): draining, then exiting for a new worker", failure)
            self.engine_died = self._drain_requested = True
            if self.acceptor is not None:
                self.acceptor.stop()  # the other workers take the new connections from here
        return await super().on_tick(counter)

    def _connections_changed(self) -> None:
        if self.acceptor is not None:
            self.acceptor.changed()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=[])  # the lifespan, and no listening server of uvicorn's own
        config = self.config

        def protocol() -> asyncio.Protocol:  # as uvicorn's own startup makes them
            return config.http_protocol_class(  # type: ignore[call-arg]
                config=config, server_state=self.server_state, app_state=self.lifespan.state
            )

        self.acceptor = Acceptor(
            self.listener, self.table, self.slot, protocol, self.server_state.connections, self.counted
        )
        self.acceptor.start()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self.acceptor is not None:
            self.acceptor.stop()
        await super().shutdown(sockets)


def uvicorn_config(app: Any, settings: Settings) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=logging_config(settings),
        log_level=settings.log_level,
        # access lines are info messages: above info they would be formatted only to be dropped
        access_log=settings.log_level.lower() in ("trace", "debug", "info"),
        timeout_graceful_shutdown=10,  # after the drain: only requests without a generation are left
    )


def bind_listener(config: uvicorn.Config, settings: Settings) -> socket.socket | None:
    """The listening socket (None: uvicorn could not bind it and said why)."""
    try:
        listener = config.bind_socket()
    except SystemExit:
        return None
    if settings.socket_send_buffer_bytes:
        # Accepted connections inherit the listening socket's send buffer. A fixed size (instead
        # of autotuning up to megabytes) means a client that stops reading blocks the stream's
        # writes after ~2x this many bytes, so the stream window stops its generation promptly.
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, settings.socket_send_buffer_bytes)
    return listener


def worker_server(
    app: Any, settings: Settings, listener: socket.socket, table: LoadTable, slot: int, parent_pid: int | None
) -> WorkerServer:
    """The uvicorn server of one worker of ``--workers N`` (service/balancer.py for the turns)."""

    def engine_failure() -> str | None:
        registry = getattr(app.state, "registry", None)
        return registry.engine_failure() if registry is not None else None

    server = WorkerServer(
        uvicorn_config(app, settings),
        lambda: getattr(app.state, "generations", None),
        settings.drain_timeout_s,
        parent_pid,
        listener=listener,
        table=table,
        slot=slot,
        engine_failure=engine_failure,
    )
    server.counted = app.state.metrics.worker_connections.set
    return server


def serve(
    settings: Settings,
    loaded: LoadedModel | None,
    listener: socket.socket | None = None,
    parent_pid: int | None = None,
    balance: tuple[LoadTable, int] | None = None,
) -> int:
    """One service process on ``listener`` (default: its own socket) until it has drained.

    ``balance``: a worker's table of connection counts and its slot there: it then accepts on
    the shared ``listener`` in turn with the other workers (service/balancer.py)."""
    app = create_app(settings, loaded)
    server: DrainingServer
    if balance is not None and listener is not None:
        server = worker_server(app, settings, listener, *balance, parent_pid)
    else:
        config = uvicorn_config(app, settings)
        generations = lambda: getattr(app.state, "generations", None)  # noqa: E731
        server = DrainingServer(config, generations, settings.drain_timeout_s, parent_pid)
        listener = listener or bind_listener(config, settings)
        if listener is None:
            return 1
    with contextlib.suppress(KeyboardInterrupt):
        server.run(sockets=[listener])
    return exit_status(server)


def exit_status(server: DrainingServer) -> int:
    """0 after a clean drain; 1 when it never started or left because an engine died."""
    return 0 if server.started and not getattr(server, "engine_died", False) else 1


def run(host: str | None = None, port: int | None = None, model: str | None = None, workers: str | None = None) -> int:
    """Serve until interrupted; returns the process exit code (2: bad settings or model)."""
    settings = read_settings(host=host, port=port, model=model, workers=workers)
    if settings is None:
        return 2
    try:
        if settings.worker_count == 1:  # returns unless it should start again (service/allocator.py)
            allocator.restart_with_tcmalloc(settings.allocator)
        else:  # each worker starts on the allocator
            allocator.preloading(settings.allocator, os.environ)
    except allocator.AllocatorMissing as err:
        print(f"chargen: error: {err}", file=sys.stderr)
        return 2
    loaded = None
    if settings.models_dir is None:  # a directory's bad files are listed failed, not fatal
        loaded = read_model(settings)
        if loaded is None:
            return 2
    if settings.worker_count > 1:
        from service.workers import supervise

        del loaded  # checked here so that a bad artifact is one error, not one per worker
        return supervise(settings)
    return serve(settings, loaded)


if __name__ == "__main__":
    raise SystemExit(run())

"""Helpers for the service tests: real uvicorn servers (threads or `chargen serve` processes),
incremental SSE reading, and tiny artifacts made with the trainer's own export code."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from service.main import create_app
from service.settings import Settings

CHARGEN = str(Path(sys.executable).with_name("chargen"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(predicate: Any, timeout: float = 60.0, interval: float = 0.05, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(httpx.HTTPError):
            value = predicate()
            if value:
                return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


class ServerThread:
    """The real app under uvicorn on a free port, in a thread of the test process."""

    def __init__(self, **settings: Any) -> None:
        self.port = free_port()
        self.settings = Settings(host="127.0.0.1", port=self.port, **settings)
        self.app = create_app(self.settings)
        config = uvicorn.Config(
            self.app, host="127.0.0.1", port=self.port, log_level="warning", timeout_graceful_shutdown=5
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ServerThread:
        self.thread.start()
        wait_until(lambda: self.server.started, what="uvicorn to start")
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)


class ServerProcess:
    """`chargen serve` in its own process, configured through CHARGEN_* variables."""

    def __init__(self, model: Path | None, port: int | None = None, **env: Any) -> None:
        """``model`` None: no --model (with ``models_dir=...`` in ``env``, a models directory)."""
        self.model = model
        self.port = port or free_port()
        self.env = {**os.environ, **{f"CHARGEN_{k.upper()}": str(v) for k, v in env.items()}}
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ServerProcess:
        model = ["--model", str(self.model)] if self.model is not None else []
        self.proc = subprocess.Popen(
            [CHARGEN, "serve", "--host", "127.0.0.1", "--port", str(self.port), *model],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        proc = self.proc

        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"chargen serve exited: {proc.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
            return httpx.get(self.url + "/readyz", timeout=2).status_code == 200

        wait_until(ready, timeout=90, interval=0.2, what="chargen serve to be ready")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def sse_data(response: httpx.Response) -> Iterator[Any]:
    """Each `data:` payload as it arrives (parsed JSON, or the string "[DONE]")."""
    for line in response.iter_lines():
        if line.startswith("data: "):
            payload = line[len("data: ") :]
            yield payload if payload == "[DONE]" else json.loads(payload)


def generate(client: httpx.Client, url: str, **body: Any) -> dict[str, Any]:
    response = client.post(url + "/v1/generate", json=body)
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def generate_retrying_busy(client: httpx.Client, url: str, **body: Any) -> dict[str, Any]:
    """A session is saved and released just after a disconnect; wait out that moment's 409."""
    for _ in range(200):
        response = client.post(url + "/v1/generate", json=body)
        if response.status_code != 409:
            assert response.status_code == 200, response.text
            return response.json()  # type: ignore[no-any-return]
        time.sleep(0.05)
    raise AssertionError("session stayed busy")


def new_session(client: httpx.Client, url: str, prompt: str = "") -> str:
    response = client.post(url + "/v1/sessions", json={"prompt": prompt} if prompt else None)
    assert response.status_code == 201, response.text
    return response.json()["session_id"]  # type: ignore[no-any-return]


def metric(client: httpx.Client, url: str, name: str) -> float:
    total = 0.0
    for line in client.get(url + "/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def export_random_model(out: Path, vocab: list[str], seed: int, layers: int = 2, hidden: int = 32) -> Path:
    """A randomly initialised model exported like the trainer does (another fingerprint)."""
    import torch

    from chargen.artifact import jit_deprecation_accepted
    from training.export import build_meta, script
    from training.model import CharLSTM, ModelConfig

    torch.manual_seed(seed)
    model = CharLSTM(ModelConfig(vocab_size=len(vocab), layers=layers, hidden=hidden)).eval()
    checkpoint = {"best_val_loss": None, "config": {}, "vocab": vocab, "corpus": {"name": "random"}, "step": 0}
    meta = build_meta(model, checkpoint)
    scripted = script(model)
    with jit_deprecation_accepted():
        torch.jit.save(scripted, str(out), _extra_files={"meta.json": json.dumps(meta)})
    return out


def with_meta(source: Path, out: Path, **changes: Any) -> Path:
    """The same artifact with meta.json changed (its name, a newer format, ...)."""
    import torch

    from chargen.artifact import jit_deprecation_accepted

    extra = {"meta.json": ""}
    with jit_deprecation_accepted():
        module = torch.jit.load(str(source), _extra_files=extra)
        meta = json.loads(extra["meta.json"]) | changes
        torch.jit.save(module, str(out), _extra_files={"meta.json": json.dumps(meta)})
    return out


def read_stream(url: str, body: dict[str, Any]) -> list[tuple[float, bytes]]:
    """POST a streaming request; every read from the socket with its arrival time since the start."""
    chunks: list[tuple[float, bytes]] = []
    started = time.monotonic()
    with httpx.Client(timeout=60) as client, client.stream("POST", f"{url}/v1/generate", json=body) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        for raw in response.iter_raw():  # raw socket reads: no re-chunking by the client
            chunks.append((time.monotonic() - started, raw))
    return chunks


def assert_streamed_as_produced(url: str, chars: int) -> None:
    """A stream through a proxy arrives as it is generated, not buffered until its end."""
    body = {"prompt": "ROMEO:", "max_new_chars": chars, "temperature": 1.0, "seed": 7, "stream": True}
    chunks = read_stream(url, body)

    events = [line for _, raw in chunks for line in raw.decode().splitlines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    text = "".join(json.loads(e[6:]).get("text", "") for e in events[:-1] if e != "data: [DONE]")
    assert len(text) == chars

    with_text = [t for t, raw in chunks if b'"text"' in raw]
    first, last = with_text[0], chunks[-1][0]
    # Buffered to the end, everything would come in one or two reads at the very end. Streamed,
    # characters arrive over the whole generation: many reads, the first early, with gaps between.
    assert len(with_text) >= 10, (
        f"only {len(with_text)} reads carried text: {[(round(t, 3), len(r)) for t, r in chunks]}"
    )
    assert last > 0.05, f"generation took {last:.3f}s: too fast to tell streaming from buffering"
    assert first < 0.5 * last, f"first text after {first:.3f}s of {last:.3f}s: held back by the proxy"
    # Reads come in bursts (several events per engine tick), so count where they fall rather than
    # gaps between them: text arrives in both halves of the generation, not all at its end.
    middle = (first + last) / 2
    early, late = sum(t < middle for t in with_text), sum(t >= middle for t in with_text)
    assert early >= 3 and late >= 3, f"reads not spread out in time: {early} before {middle:.3f}s, {late} after"

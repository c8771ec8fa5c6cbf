"""The service's one settings object: every knob, read from ``CHARGEN_*`` environment variables."""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from chargen.artifact import BUNDLED_MODEL
from service.state_store.layout import check_prefix
from service.state_store.target import check_url, read_password_file


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CHARGEN_", extra="ignore")

    # what to serve and where
    model: str | None = Field(None, description="TorchScript artifact to serve (default: the bundled model)")
    model_id: str | None = Field(
        None, description="id of the one model (default: its meta.json name, else the file's stem); not with models_dir"
    )
    # a model repository (docs/models.md): every artifact in a directory, watched for changes
    models_dir: str | None = Field(
        None, description="serve every *.pt artifact in this directory, or DIR:DIR... (not with model); watched"
    )
    default_model: str | None = Field(None, description="the id used when a request names none (default: newest)")
    keep_versions: int = Field(
        1, ge=0, description="earlier versions of a replaced model kept loaded for the sessions made on them"
    )
    max_models: int = Field(8, ge=1, description="models served at once; a file past the limit is listed failed")
    models_poll_s: float = Field(2.0, gt=0, description="the directory is rescanned at least this often")
    admin_keys: SecretStr = Field(
        SecretStr(""),
        description="comma-separated keys (or sha256:<hex>) for POST /v1/models/{id}/load|unload; empty: disabled",
    )
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    workers: int | Literal["auto"] = Field(
        1,
        description="worker processes sharing the port, each a whole service with one engine (auto: one per "
        "core this process may use); more than 1 needs sessions in Redis (docs/scaling.md: worker processes)",
    )

    # session state
    state_url: str = Field(
        "memory://",
        description="memory://, redis://[user:password@]host:port/db (rediss://: TLS), or a Redis Cluster: "
        "redis+cluster://host:port[,host:port...]/ (docs/scaling.md)",
        repr=False,  # it may hold a password: a Settings object is shown in tracebacks and debug logs
    )
    state_password_file: Path | None = Field(None, description="Redis password read from this file (a secret)")
    state_tls_ca_file: Path | None = Field(None, description="CA certificates that rediss:// servers must chain to")
    state_tls_cert_file: Path | None = Field(None, description="client certificate, for servers that ask for one")
    state_tls_key_file: Path | None = Field(None, description="the client certificate's private key")
    session_ttl_s: int = Field(3600, ge=1, description="sliding: refreshed on each use")
    lease_ms: int = Field(30_000, ge=100, description="per-session lock, renewed while in use")
    redis_prefix: str = "chargen:"
    redis_timeout_s: float = Field(2.0, gt=0, description="connect/read timeout; past it a session request gets 503")
    sweep_interval_s: float = Field(30.0, gt=0, description="how often expired sessions are counted")

    # limits on what a client may ask for
    max_prompt_chars: int = Field(8192, ge=1)
    max_new_chars: int = Field(4096, ge=1)
    max_stop_strings: int = Field(4, ge=0)
    max_stop_chars: int = Field(64, ge=1)
    max_n: int = Field(16, ge=1, description="choices one request may ask for (n), each an engine row")
    max_body_bytes: int = Field(65_536, ge=1024)

    # bounded work and the batching engine
    max_streams: int = Field(64, ge=1, description="generations running at once (rows in the engine)")
    max_queue: int = Field(64, ge=0, description="generations waiting for a row; past it: 429")
    retry_after_s: int = Field(1, ge=1)
    max_batch: int = Field(64, ge=1, description="rows per model step (1 = batching off)")
    step_min_rows: int | None = Field(
        None,
        ge=1,
        description="pad steps with a seeded or greedy row to this many rows; unset: measured at start-up "
        "(docs: batch invariance)",
    )
    prefill_chunk: int = Field(64, ge=1, description="characters of a long prompt fed per engine tick")
    step_prefill_chars: int = Field(
        32, ge=0, description="a prompt with at most this many characters left is fed inside the batched steps"
    )
    decode_steps: int = Field(
        16,
        ge=1,
        le=64,
        description="characters a batch takes per tick while no request waits, at most (1: one per tick)",
    )
    multi_step_ms: float = Field(
        20.0,
        ge=0,
        description="a tick of several characters lasts at most about this long, by the step time measured at "
        "its batch size: how long a new request may wait to join (0: one character per tick)",
    )
    stream_window: int = Field(128, ge=1, description="characters the engine may run ahead of what a client was sent")
    flush_interval_ms: float = Field(
        20.0,
        ge=0,
        description="while busy, the engine hands text to the event loop at most this often (a stream's first "
        "characters and its end go out at once)",
    )
    flush_events_per_s: float = Field(
        800.0,
        ge=0,
        description="with many streams, text is handed over less often than flush_interval_ms, so that the event "
        "loop gets at most about this many events (one per stream with new text) a second (0: no such limit)",
    )

    # access and lifecycle: API keys, per-key limits, draining, stalled clients
    api_keys: SecretStr = Field(
        SecretStr(""),
        description="comma-separated API keys, or sha256:<hex> digests of them; empty: no authentication",
    )
    max_streams_per_key: int = Field(16, ge=0, description="generations one API key may run at once (0: no limit)")
    drain_timeout_s: float = Field(20.0, ge=0, description="on SIGTERM, how long running generations may finish")
    stream_stall_timeout_s: float = Field(
        60.0, gt=0, description="a streaming client that accepts nothing for this long is dropped (row and lease freed)"
    )
    socket_send_buffer_bytes: int = Field(
        65_536, ge=0, description="SO_SNDBUF of accepted connections (0: the kernel's autotuning)"
    )

    # torch on this CPU
    torch_threads: int = Field(1, ge=1)
    gil_switch_interval_ms: float = Field(
        0.5,
        gt=0,
        description="how long a Python thread may keep the GIL while another waits (docs: the engine and the GIL)",
    )
    mkldnn: bool = False
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="the engine's model steps: bf16 weights (turns mkldnn on), fp32, or auto: bf16 only where a "
        "start-up measurement finds it faster at 1 row and at max_batch rows (docs/benchmarks.md: bf16)",
    )
    allocator: Literal["auto", "tcmalloc", "system"] = Field(
        "auto",
        description="malloc of the processes that run the model: tcmalloc (preloaded; auto: where the dynamic "
        "linker finds libtcmalloc_minimal) or the system's (docs/benchmarks.md: the allocator)",
    )
    log_level: str = "info"

    @field_validator("state_url")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        check_url(value)  # its message never repeats the URL, which may hold a password
        return value

    @field_validator("workers", mode="before")
    @classmethod
    def _worker_count(cls, value: object) -> int | str:
        if value == "auto":
            return value
        try:
            count = int(str(value))
        except ValueError:
            count = 0
        if not 1 <= count <= 256:
            raise ValueError(f"expected a whole number from 1 to 256, or auto; got {value!r}")
        return count

    @field_validator("redis_prefix")
    @classmethod
    def _no_hash_tag(cls, value: str) -> str:
        return check_prefix(value)

    @field_validator("state_password_file", "state_tls_ca_file", "state_tls_cert_file", "state_tls_key_file")
    @classmethod
    def _readable(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if value is None:
            return None
        if not value.is_file():
            raise ValueError(f"{value} is not a readable file")
        if info.field_name == "state_password_file":
            read_password_file(value)  # readable and not empty
            check_url(info.data.get("state_url", "memory://"), value)  # and not a second password
        return value

    @model_validator(mode="after")
    def _client_certificate_whole(self) -> Settings:
        if (self.state_tls_cert_file is None) != (self.state_tls_key_file is None):
            raise ValueError("CHARGEN_STATE_TLS_CERT_FILE and CHARGEN_STATE_TLS_KEY_FILE go together")
        return self

    @field_validator("model", "model_id", "models_dir", "default_model", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        # compose and Kubernetes set a variable to "" to clear an image's default
        if isinstance(value, Path):
            return str(value)
        return None if value == "" else value

    @model_validator(mode="after")
    def _one_source_of_models(self) -> Settings:
        if self.models_dir is not None:
            if self.model is not None:
                raise ValueError("CHARGEN_MODEL and CHARGEN_MODELS_DIR are exclusive: serve one file or a directory")
            if self.model_id is not None:
                raise ValueError("CHARGEN_MODEL_ID names the one model of CHARGEN_MODEL; not with CHARGEN_MODELS_DIR")
            for directory in self.model_directories:
                if not directory.is_dir():
                    raise ValueError(f"CHARGEN_MODELS_DIR: {directory} is not a directory")
        return self

    @property
    def model_directories(self) -> list[Path]:
        """CHARGEN_MODELS_DIR's directories (separated by ':', as in PATH); empty without it."""
        if self.models_dir is None:
            return []
        return [Path(part).expanduser() for part in self.models_dir.split(os.pathsep) if part]

    @property
    def worker_count(self) -> int:
        """CHARGEN_WORKERS as a number: ``auto`` is the cores this process may run on."""
        return len(os.sched_getaffinity(0)) if self.workers == "auto" else self.workers

    @cached_property
    def model_path(self) -> Path:
        """The artifact to serve: CHARGEN_MODEL (a relative path is from the working directory),
        else the Shakespeare model shipped inside the package, wherever it is installed."""
        return Path(self.model).expanduser() if self.model else BUNDLED_MODEL

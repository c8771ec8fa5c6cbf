"""Training configuration: one dataclass, loadable from TOML, overridable from the command line."""

from __future__ import annotations

import inspect
import re
import tokenize
import tomllib
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A configuration the trainer cannot run (unknown key, wrong type, impossible value)."""


@dataclass
class TrainConfig:
    # data
    corpus: str = "tinyshakespeare"  # a UTF-8 text file, or "tinyshakespeare" to fetch the standard one
    out: str = "runs/default"  # every output of the run: checkpoints, metrics, plot, model.pt
    name: str = ""  # the model's name, its id in the service's /v1/models ("": the name of the out directory)
    # model (Graves 2013: stacked peephole LSTM with skip connections)
    layers: int = 3  # stacked LSTM layers
    hidden: int = 256  # units per layer
    dropout: float = 0.1  # dropout probability between layers and before the output layer
    # batches: B contiguous streams through the training text, T characters per step
    batch_size: int = 32  # B, the number of streams
    seq_len: int = 100  # T, the truncated-BPTT length; the state is carried across steps
    # optimisation: AdamW, linear warm-up then cosine decay to min_lr
    max_steps: int = 5000  # optimiser steps in the whole run
    learning_rate: float = 2e-3  # peak learning rate, reached after warm-up
    min_lr: float = 1e-4  # learning rate at the end of the cosine decay
    warmup_steps: int = 100  # linear warm-up from 0 to learning_rate
    weight_decay: float = 0.0  # AdamW decoupled weight decay of the weight matrices (not biases, peepholes)
    grad_clip: float = 1.0  # clip the global gradient norm to this (0 = no clipping)
    # evaluation and checkpoints
    eval_interval: int = 250  # steps between evaluations on the whole validation split
    log_interval: int = 50  # steps between log lines / metrics records
    early_stop_patience: int = 0  # evaluations without improvement before stopping (0 = never)
    # run
    seed: int = 1337  # seeds parameters, dropout and stream offsets: same seed, same run on CPU
    device: str = "auto"  # "auto" (CUDA if present, else CPU), "cpu", "cuda", "cuda:1", ...
    compile: str = "auto"  # torch.compile the LSTM cell: "auto" (on CUDA only), "yes", "no"

    def validate(self) -> None:
        positive = ["layers", "hidden", "batch_size", "seq_len", "max_steps", "eval_interval", "log_interval"]
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.learning_rate <= 0 or self.min_lr < 0 or self.min_lr > self.learning_rate:
            raise ConfigError("need 0 <= min_lr <= learning_rate and learning_rate > 0")
        if self.warmup_steps < 0 or self.grad_clip < 0 or self.early_stop_patience < 0:
            raise ConfigError("warmup_steps, grad_clip and early_stop_patience must be >= 0")
        if self.name:
            check_model_name(self.name)
        if self.compile not in ("auto", "yes", "no"):
            raise ConfigError(f"compile must be auto, yes or no, got {self.compile!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    # Fields that may differ between a run and its resumption without changing the result (beyond
    # float rounding: a run resumes bit for bit only on the same device, with the same compile).
    RESUMABLE_CHANGES = ("device", "out", "compile", "name")

    def mismatches(self, saved: dict[str, Any]) -> list[str]:
        """Names of the fields whose values differ from a saved run's configuration."""
        mine = self.to_dict()
        return [name for name in mine if name not in self.RESUMABLE_CHANGES and saved.get(name) != mine[name]]


MODEL_NAME = re.compile(r"[^/\s\x00-\x1f\x7f]{1,128}")  # an id a URL path (/v1/models/{id}) can carry


def check_model_name(name: str) -> str:
    if not MODEL_NAME.fullmatch(name):
        raise ConfigError(f"name must be 1-128 characters without '/', spaces or control characters, got {name!r}")
    return name


def field_comments() -> dict[str, str]:
    """Each field's comment in the class body above (`name: type = default  # meaning`): the
    meaning `chargen train --help` shows, written once, where a reader of the config sees it."""
    names = {f.name for f in fields(TrainConfig)}
    lines = iter(inspect.getsource(TrainConfig).splitlines(keepends=True))
    comments = {}
    for token in tokenize.generate_tokens(lambda: next(lines, "")):
        name = token.line.split(":", 1)[0].strip()
        if token.type == tokenize.COMMENT and name in names:
            comments[name] = token.string.lstrip("#").strip()
    return comments


def field_types() -> dict[str, type]:
    return {f.name: type(getattr(TrainConfig(), f.name)) for f in fields(TrainConfig)}


def coerce(name: str, value: Any) -> Any:
    """Check (and for ints given as floats, convert) one value against the field's type."""
    types = field_types()
    if name not in types:
        raise ConfigError(f"unknown config key {name!r}")
    wanted = types[name]
    if wanted is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, wanted) or (wanted is int and isinstance(value, bool)):
        raise ConfigError(f"config key {name!r} must be {wanted.__name__}, got {value!r}")
    return value


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults, then the TOML file, then command-line overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                values = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"config file {path} is not valid TOML: {err}") from None
    values.update(overrides or {})
    config = TrainConfig(**{name: coerce(name, value) for name, value in values.items()})
    config.validate()
    return config

"""Checkpoint -> TorchScript artifact with meta.json: the only thing the service ever loads.

The artifact holds the scripted CharLSTM (forward, step, init_state, inspect) and an extra file
``meta.json`` describing the vocabulary, the architecture, the corpus and the validation loss.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from chargen.artifact import ARTIFACT_FORMAT, ARTIFACT_METHODS, jit_deprecation_accepted
from training.model import CharLSTM, ModelConfig, count_parameters, upgrade_state_dict
from training.train import LN2, atomic_write_bytes, load_checkpoint, weights_fingerprint


def fingerprint(model: torch.nn.Module) -> str:
    """sha256 over every parameter's name, shape and bytes: identifies these exact weights."""
    return weights_fingerprint(model.state_dict())


def script(model: CharLSTM) -> torch.jit.ScriptModule:
    with jit_deprecation_accepted():
        return torch.jit.script(model)


def build_meta(model: CharLSTM, checkpoint: dict[str, Any], name: str = "model") -> dict[str, Any]:
    val = checkpoint["best_val_loss"]
    finite = val is not None and math.isfinite(val)
    train_config = checkpoint["config"]
    return {
        "format": ARTIFACT_FORMAT,
        "name": name,  # the id the service serves it as (CHARGEN_MODEL_ID overrides it)
        # the scripted methods, so a reader can tell a newer export from an older one of the
        # same format (artifacts before "inspect" have no "methods" key)
        "methods": list(ARTIFACT_METHODS),
        "vocab": checkpoint["vocab"],
        "layers": model.layers,
        "hidden": model.hidden,
        "peepholes": True,
        "skip_connections": {"input_to_every_layer": True, "every_layer_to_output": True},
        "params": count_parameters(model),
        "corpus": checkpoint["corpus"],
        "val_loss_nats": val if finite else None,
        "val_bpc": val / LN2 if finite else None,
        "train_steps": checkpoint["step"],
        "train_config": {k: v for k, v in train_config.items() if k not in ("out", "device", "corpus", "name")},
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "torch_version": str(torch.__version__),
        "fingerprint": fingerprint(model),
    }


def model_from_checkpoint(checkpoint: dict[str, Any]) -> CharLSTM:
    config = ModelConfig(**checkpoint["model_config"])
    model = CharLSTM(config)
    model.load_state_dict(upgrade_state_dict(checkpoint["model"], config.layers))
    return model.eval()


def model_name(checkpoint_path: Path, checkpoint: dict[str, Any]) -> str:
    """The name the run was trained with, else its run directory's (where the checkpoint lies)."""
    return checkpoint["config"].get("name") or checkpoint_path.resolve().parent.name or "model"


def export(checkpoint_path: str | Path, out_path: str | Path, name: str | None = None) -> dict[str, Any]:
    """Write the TorchScript artifact (atomically) and return its meta; ``name`` overrides the
    model's name (default: the run's ``name``, else its run directory's)."""
    checkpoint = load_checkpoint(Path(checkpoint_path))
    model = model_from_checkpoint(checkpoint)
    meta = build_meta(model, checkpoint, name or model_name(Path(checkpoint_path), checkpoint))
    scripted = script(model)
    extra = {"meta.json": json.dumps(meta, indent=1, ensure_ascii=False)}
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with jit_deprecation_accepted():
        atomic_write_bytes(out, lambda tmp: torch.jit.save(scripted, str(tmp), _extra_files=extra))
    return meta

"""The training loop: learning, outputs, exact resume, config checks, schedule."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_config
from training.config import ConfigError, TrainConfig, load_config
from training.train import load_checkpoint, lr_at, train


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "chars_per_s"} for r in rows]


def test_training_learns_and_writes_its_outputs(corpus_file: Path, tmp_path: Path) -> None:
    result = train(tiny_config(corpus_file, tmp_path, max_steps=60), progress_tty=False)
    rows = records(tmp_path / "metrics.jsonl")
    evals = [r for r in rows if r["kind"] == "eval"]
    trains = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in evals] == [20, 40, 60]
    assert trains[-1]["train_loss"] < trains[0]["train_loss"]
    assert evals[-1]["val_loss_nats"] < math.log(30)  # far better than uniform over the vocab
    assert evals[-1]["val_bpc"] == pytest.approx(evals[-1]["val_loss_nats"] / math.log(2))
    assert result.best_val_loss == min(r["val_loss_nats"] for r in evals)
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {p.name for p in tmp_path.iterdir()} == {"best.pt", "last.pt", "metrics.jsonl", "loss.png"}


def test_interrupted_and_resumed_equals_straight_through(corpus_file: Path, tmp_path: Path) -> None:
    straight = tmp_path / "straight"
    resumed = tmp_path / "resumed"
    # 40 steps cross an epoch boundary (state reset) and two evaluations; stop mid-log-window.
    config = dict(max_steps=40, batch_size=16, seq_len=32)
    train(tiny_config(corpus_file, straight, **config), progress_tty=False)
    first = train(tiny_config(corpus_file, resumed, **config), should_stop=lambda s: s == 27, progress_tty=False)
    assert first.interrupted and first.step == 27
    with pytest.raises(ConfigError, match="--resume"):
        train(tiny_config(corpus_file, resumed, **config), progress_tty=False)
    train(tiny_config(corpus_file, resumed, **config), resume=True, progress_tty=False)

    a, b = load_checkpoint(straight / "last.pt"), load_checkpoint(resumed / "last.pt")
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    assert torch.equal(a["h"], b["h"])
    assert without_timing(records(straight / "metrics.jsonl")) == without_timing(records(resumed / "metrics.jsonl"))


def test_resume_with_a_different_config_is_refused(corpus_file: Path, tmp_path: Path) -> None:
    train(tiny_config(corpus_file, tmp_path, max_steps=20), should_stop=lambda s: s == 5, progress_tty=False)
    before = (tmp_path / "last.pt").read_bytes()
    with pytest.raises(ConfigError, match="hidden"):
        train(tiny_config(corpus_file, tmp_path, max_steps=20, hidden=48), resume=True, progress_tty=False)
    assert (tmp_path / "last.pt").read_bytes() == before  # nothing overwritten


def test_early_stop(corpus_file: Path, tmp_path: Path) -> None:
    # A learning rate of 5 without clipping makes the loss diverge: validation stops improving.
    result = train(
        tiny_config(
            corpus_file,
            tmp_path,
            max_steps=200,
            eval_interval=10,
            learning_rate=5.0,
            min_lr=5.0,
            grad_clip=0.0,
            early_stop_patience=2,
        ),
        progress_tty=False,
    )
    assert result.stopped_early and result.step < 200


def test_learning_rate_warms_up_then_decays_to_min() -> None:
    config = TrainConfig(max_steps=1000, warmup_steps=100, learning_rate=1e-3, min_lr=1e-5)
    assert lr_at(0, config) == pytest.approx(1e-5)
    assert lr_at(99, config) == pytest.approx(1e-3)
    assert lr_at(550, config) == pytest.approx((1e-3 + 1e-5) / 2)
    assert lr_at(1000, config) == pytest.approx(1e-5)
    assert all(lr_at(s, config) >= lr_at(s + 1, config) for s in range(100, 1000))


def test_config_from_toml_with_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("layers = 2\nhidden = 64\nlearning_rate = 1\n")
    config = load_config(path, {"hidden": 32})
    assert (config.layers, config.hidden, config.learning_rate) == (2, 32, 1.0)
    path.write_text("layer = 2\n")
    with pytest.raises(ConfigError, match="unknown config key 'layer'"):
        load_config(path)
    path.write_text('hidden = "big"\n')
    with pytest.raises(ConfigError, match="'hidden' must be int"):
        load_config(path)


@pytest.mark.parametrize("name", ["tinyshakespeare-cpu.toml", "tinyshakespeare-gpu.toml"])
def test_shipped_configs_load(name: str) -> None:
    config = load_config(Path(__file__).parent.parent / "configs" / name)
    assert config.corpus == "tinyshakespeare"

"""The training loop: learning, outputs, exact resume, config checks, schedule."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.utils._python_dispatch import TorchDispatchMode

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


def test_weight_decay_applies_to_the_weight_matrices_only(corpus_file: Path, tmp_path: Path) -> None:
    """Biases (the forget gate's starts at 1) and the diagonal peepholes are not decayed: the groups
    are chosen by what a parameter is, not by its rank (here bias is [L, 4H], peephole [L, 3, H])."""
    train(tiny_config(corpus_file, tmp_path, max_steps=2, eval_interval=2, weight_decay=0.01), progress_tty=False)
    checkpoint = load_checkpoint(tmp_path / "last.pt")
    from training.export import model_from_checkpoint

    shapes = {tuple(p.shape): name for name, p in model_from_checkpoint(checkpoint).named_parameters()}
    assert len(shapes) == 7  # every parameter of the tiny model has its own shape: a shape names it
    state = checkpoint["optimizer"]["state"]
    groups = [
        (g["weight_decay"], sorted(shapes[tuple(state[i]["exp_avg"].shape)] for i in g["params"]))
        for g in checkpoint["optimizer"]["param_groups"]
    ]
    assert groups == [
        (0.01, ["input_proj.weight", "output.weight", "w_below", "w_h"]),
        (0.0, ["bias", "output.bias", "peephole"]),
    ]


class HostReads(TorchDispatchMode):
    """Counts reads of a tensor's value into Python (float(t), t.item(): a device sync on CUDA),
    outside the optimizer's step (AdamW reads its own step counter, a CPU tensor)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.in_optimizer = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func is torch.ops.aten._local_scalar_dense.default and not self.in_optimizer:
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_the_loop_reads_values_to_the_host_only_at_log_and_eval_steps(corpus_file: Path, tmp_path: Path) -> None:
    reads = HostReads()
    reads_by: dict[int, int] = {}  # step -> reads so far, when the loop asks should_stop(step)

    def after_step(step: int) -> bool:
        reads_by[step] = reads.count
        return False

    before = register_optimizer_step_pre_hook(lambda *a: setattr(reads, "in_optimizer", True))
    after = register_optimizer_step_post_hook(lambda *a: setattr(reads, "in_optimizer", False))
    try:
        with reads:
            config = tiny_config(corpus_file, tmp_path, max_steps=30, log_interval=10, eval_interval=15)
            train(config, should_stop=after_step, progress_tty=False)
    finally:
        before.remove()
        after.remove()
    # Step 1 also counts the set-up; the last step (30) is not followed by should_stop.
    steps_with_reads = [s for s in range(2, 30) if reads_by[s] > reads_by[s - 1]]
    assert steps_with_reads == [10, 15, 20]  # the log steps 10, 20 and the evaluation at 15


def test_a_one_layer_checkpoint_from_before_w_below_was_empty_still_loads(corpus_file: Path, tmp_path: Path) -> None:
    # Before 0.1's trainer fixes, a one-layer model kept an unused [1, H, 4H] w_below (DDP failed on
    # it). Such weights still export, with the same fingerprint, and resume.
    from training.export import export

    out = tmp_path / "run"
    train(tiny_config(corpus_file, out, layers=1, max_steps=4, eval_interval=4), progress_tty=False)
    current = out / "model.pt"
    export(out / "last.pt", current)
    saved = load_checkpoint(out / "last.pt")
    hidden = saved["model_config"]["hidden"]
    saved["model"]["w_below"] = torch.zeros(1, hidden, 4 * hidden)
    torch.save(saved, out / "last.pt")

    meta = export(out / "last.pt", tmp_path / "old.pt")
    assert meta["fingerprint"] == json.loads(_meta_of(current))["fingerprint"]
    resumed = train(
        tiny_config(corpus_file, out, layers=1, max_steps=4, eval_interval=4), resume=True, progress_tty=False
    )
    assert resumed.step == 4 and not resumed.interrupted


def _meta_of(artifact: Path) -> str:
    extra = {"meta.json": ""}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.jit.load(str(artifact), _extra_files=extra)
    return extra["meta.json"]

"""`chargen train --help`: every flag says what it means, in the words of training/config.py."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

from chargen.cli import build_parser
from training.config import TrainConfig

CONFIG_SOURCE = Path(__file__).resolve().parents[1] / "training" / "config.py"


def config_comments() -> dict[str, str]:
    """`name: type = default  # meaning` lines of TrainConfig, read here with a plain regex."""
    text = CONFIG_SOURCE.read_text()
    body = text[text.index("class TrainConfig") : text.index("    def validate")]
    return dict(re.findall(r"^    (\w+): [^=]+= .*?  # (.+)$", body, re.M))


def train_parser() -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["train"]


def test_every_train_flag_has_its_config_comment_as_help() -> None:
    comments = config_comments()
    assert sorted(comments) == sorted(f.name for f in fields(TrainConfig))  # one comment per field
    defaults = TrainConfig()
    helps = {a.dest: (a.help or "").replace("%%", "%") for a in train_parser()._actions}  # % is escaped
    for name, comment in comments.items():
        assert comment.strip(), name
        assert helps[name] == f"{comment} (default: {getattr(defaults, name)!r})", name


def test_train_help_prints_the_meanings() -> None:
    result = subprocess.run([sys.executable, "-m", "chargen", "train", "--help"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    flat = " ".join(result.stdout.split())  # argparse wraps long help lines
    assert "--max-steps MAX_STEPS optimiser steps in the whole run (default: 5000)" in flat
    assert "--seq-len SEQ_LEN T, the truncated-BPTT length; the state is carried across steps (default: 100)" in flat

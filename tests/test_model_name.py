"""The name a model is served under: set by training and export in meta.json's "name" (default:
the run directory's name), read by the service as CHARGEN_MODEL_ID > meta["name"] > file stem."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest

from chargen.artifact import BUNDLED_MODEL, read_artifact
from service.artifact import load_model
from tests.conftest import make_corpus_text
from tests.service_support import ServerProcess
from tests.test_cli import assert_usage_error, chargen
from training.config import ConfigError, TrainConfig

TINY = ["--layers", "1", "--hidden", "8", "--batch-size", "2", "--seq-len", "8", "--warmup-steps", "1"]
TINY += ["--max-steps", "2", "--eval-interval", "2", "--log-interval", "1", "--device", "cpu"]


def meta_of(path: Path) -> dict[str, object]:
    return read_artifact(path)[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "plays.txt"
    path.write_text(make_corpus_text(3000))
    return path


def test_training_names_the_model_after_its_run_directory_or_name(corpus: Path, tmp_path: Path) -> None:
    default = chargen("train", "--corpus", str(corpus), "--out", str(tmp_path / "sonnets"), *TINY)
    assert default.returncode == 0, default.stderr
    assert meta_of(tmp_path / "sonnets" / "model.pt")["name"] == "sonnets"

    named = chargen("train", "--corpus", str(corpus), "--out", str(tmp_path / "run"), "--name", "bard", *TINY)
    assert named.returncode == 0, named.stderr
    meta = meta_of(tmp_path / "run" / "model.pt")
    assert meta["name"] == "bard" and "name" not in meta["train_config"]  # "name" says it once

    # export: the name the run was trained with, or the run directory's, or --name
    shutil.copytree(tmp_path / "sonnets", tmp_path / "moved")
    exported = chargen("export", str(tmp_path / "moved" / "best.pt"), "-o", str(tmp_path / "a.pt"))
    assert exported.returncode == 0, exported.stderr
    assert meta_of(tmp_path / "a.pt")["name"] == "moved"
    chargen("export", str(tmp_path / "run" / "best.pt"), "-o", str(tmp_path / "b.pt"))
    assert meta_of(tmp_path / "b.pt")["name"] == "bard"
    chargen("export", str(tmp_path / "run" / "best.pt"), "-o", str(tmp_path / "c.pt"), "--name", "verse-2")
    assert meta_of(tmp_path / "c.pt")["name"] == "verse-2"

    # a resumed run renamed (allowed: the name changes nothing in training) exports the new name,
    # even where its best checkpoint was written under the old one
    renamed = chargen("train", "--corpus", str(corpus), "--out", str(tmp_path / "run"), "--name", "bard-2", *TINY,
                      "--resume")  # fmt: skip
    assert renamed.returncode == 0, renamed.stderr
    assert meta_of(tmp_path / "run" / "model.pt")["name"] == "bard-2"


def test_a_bad_name_is_refused_before_any_work(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = chargen("train", "--corpus", str(corpus), "--out", str(out), "--name", "a/b", *TINY)
    assert_usage_error(result, "name must be 1-128 characters without '/', spaces or control characters, got 'a/b'")
    assert not out.exists()
    with pytest.raises(ConfigError):
        TrainConfig(name=" ").validate()


def test_renaming_a_run_on_resume_is_allowed() -> None:
    saved = TrainConfig(name="old").to_dict()
    assert TrainConfig(name="new").mismatches(saved) == []


def test_the_service_serves_the_name_unless_chargen_model_id_says_otherwise(tiny_artifact: Path) -> None:
    assert meta_of(tiny_artifact)["name"] == "model"  # conftest names it so; the file is model.pt too
    assert load_model(BUNDLED_MODEL).model_id == "shakespeare"
    assert load_model(tiny_artifact, "override").model_id == "override"


def test_a_trained_model_answers_to_its_name_over_http(corpus: Path, tmp_path: Path) -> None:
    done = chargen("train", "--corpus", str(corpus), "--out", str(tmp_path / "shakespeare"), *TINY)
    assert done.returncode == 0, done.stderr
    model = tmp_path / "shakespeare" / "model.pt"
    body = {"model": "shakespeare", "prompt": "ROMEO:", "max_tokens": 5, "temperature": 0}
    with ServerProcess(model) as server:
        assert [m["id"] for m in httpx.get(server.url + "/v1/models").json()["data"]] == ["shakespeare"]
        answer = httpx.post(server.url + "/v1/completions", json=body, timeout=30)
        assert answer.status_code == 200, answer.text
        assert answer.json()["model"] == "shakespeare"
    with ServerProcess(model, model_id="mine") as server:
        assert [m["id"] for m in httpx.get(server.url + "/v1/models").json()["data"]] == ["mine"]
        assert httpx.post(server.url + "/v1/completions", json=body, timeout=30).status_code == 404

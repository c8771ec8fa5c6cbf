"""CHARGEN_PRECISION: a bf16 copy of the weights behind fp32 tensors, and what auto picks.

The tests force bf16 (whatever this CPU's speed): seeded text must still be independent of the
streams beside it, and the engine's padding is measured on the bf16 module itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from service.artifact import LoadedModel, load_model
from service.engine import Engine
from service.engine.calibration import find_step_min_rows
from service.engine.precision import bf16_copy, choose_precision
from service.main import read_settings
from tests.service_support import ServerThread
from tests.test_engine import PROMPT, collect, req, with_engine


@pytest.fixture(scope="module")
def model(tiny_artifact: Path) -> LoadedModel:
    return load_model(tiny_artifact)


@pytest.fixture
def mkldnn_restored() -> Iterator[None]:
    before = torch.backends.mkldnn.enabled
    yield
    torch.backends.mkldnn.enabled = before


def test_the_bf16_copy_takes_and_gives_fp32_and_stays_close(model: LoadedModel, mkldnn_restored: None) -> None:
    half = bf16_copy(model)
    assert half.fingerprint == model.fingerprint and half.vocab == model.vocab
    assert {p.dtype for p in half.module.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.module.parameters()} == {torch.float32}  # the original is untouched
    torch.backends.mkldnn.enabled = True
    with torch.inference_mode():
        h, c = half.module.init_state(3)
        tokens = torch.tensor(model.encode("ROM"))
        out = half.module.step(tokens, h, c)
        reference = model.module.step(tokens, *model.module.init_state(3))
        prefill = half.module.forward(tokens.unsqueeze(0), h[:, :1], c[:, :1])
    assert [t.dtype for t in (h, c, *out, *prefill)] == [torch.float32] * 8
    assert [tuple(t.shape) for t in out] == [tuple(t.shape) for t in reference]
    assert torch.allclose(out[0], reference[0], atol=0.1)  # bf16 keeps ~3 significant digits
    assert not torch.equal(out[0], reference[0])  # and it is bf16 math, not the fp32 weights


def test_bf16_seeded_text_does_not_depend_on_its_neighbours(model: LoadedModel, mkldnn_restored: None) -> None:
    half = choose_precision(model, "bf16", 64, mkldnn=False).model
    assert torch.backends.mkldnn.enabled  # bf16 goes through oneDNN
    smallest = find_step_min_rows(half, 64)
    assert smallest is not None  # measured on the bf16 module: some size from which every size agrees
    target = dict(temperature=1.0, seed=41)

    async def alone(engine: Engine) -> tuple[str, int | None, bool | None]:
        text = (await collect(engine, req(half, n=150, **target)))[0]
        return text, engine.step_min_rows, engine.batch_invariant

    async def crowded(engine: Engine) -> str:
        others = [collect(engine, req(half, prompt="KING:", n=20 + 7 * i, temperature=1.0)) for i in range(24)]
        results = await asyncio.gather(collect(engine, req(half, n=150, **target)), *others)
        return results[0][0]

    expected, padded_to, invariant = with_engine(half, alone)
    assert (padded_to, invariant) == (smallest, True)
    assert len(expected) == 150
    assert with_engine(half, crowded) == expected
    fp32_text = with_engine(model, alone)[0]
    assert len(fp32_text) == 150  # the same request in fp32 (its text may differ: other rounding)


def test_fp32_is_the_artifact_itself_and_precision_is_checked(
    model: LoadedModel, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert choose_precision(model, "fp32", 64, mkldnn=False).model is model
    monkeypatch.setenv("CHARGEN_PRECISION", "fp16")
    assert read_settings() is None
    assert capsys.readouterr().err == (
        "chargen: error: invalid settings: CHARGEN_PRECISION: Input should be 'auto', 'fp32' or 'bf16'\n"
    )


def test_the_service_serves_seeded_bf16_text_reproducibly(tiny_artifact: Path, mkldnn_restored: None) -> None:
    body = {"prompt": PROMPT, "max_new_chars": 60, "temperature": 1.0, "seed": 8}
    with ServerThread(model=str(tiny_artifact), precision="bf16") as server, httpx.Client(timeout=60) as http:
        texts = {http.post(f"{server.url}/v1/generate", json=body).json()["text"] for _ in range(3)}
        ready = http.get(f"{server.url}/readyz").json()
    assert len(texts) == 1 and len(texts.pop()) == 60
    assert ready["batch_invariant"] is True

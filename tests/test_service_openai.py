"""The official openai client against /v1/completions and /v1/models, over real HTTP."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.service_support import ServerThread, generate, new_session


@pytest.fixture(scope="module")
def server(tiny_artifact: Path) -> Iterator[ServerThread]:
    with ServerThread(model=str(tiny_artifact)) as running:
        yield running


@pytest.fixture
def client(server: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def test_models_list(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == ["model"]
    assert client.models.retrieve("model").id == "model"


def test_completion_matches_the_native_endpoint(client: openai.OpenAI, server: ServerThread) -> None:
    result = client.completions.create(model="model", prompt="KING:\n", max_tokens=60, temperature=0.8, seed=11)
    assert result.object == "text_completion"
    choice = result.choices[0]
    assert choice.finish_reason == "length" and len(choice.text) == 60
    assert result.usage is not None and result.usage.completion_tokens == 60 and result.usage.prompt_tokens == 6
    with httpx.Client() as http:
        native = generate(http, server.url, prompt="KING:\n", max_new_chars=60, temperature=0.8, seed=11)
    assert native["text"] == choice.text


def test_streaming_with_the_client(client: openai.OpenAI) -> None:
    whole = client.completions.create(model="model", prompt="KING:\n", max_tokens=80, temperature=0, stop=None)
    chunks = list(client.completions.create(model="model", prompt="KING:\n", max_tokens=80, temperature=0, stream=True))
    assert all(c.object == "text_completion" for c in chunks)
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    # text chunks, then the final one (finish_reason, no text); how many text chunks depends on
    # timing (the engine coalesces what one flush interval made), so incremental arrival is shown
    # where it is measured: test_service_api.py::test_stream_is_incremental_and_disconnect_saves_the_sent_text
    assert [c.choices[0].text == "" for c in chunks] == [False] * (len(chunks) - 1) + [True]


def test_stop_and_sessions_through_extra_body(client: openai.OpenAI, server: ServerThread) -> None:
    full = client.completions.create(model="model", prompt="QUEEN:\n", max_tokens=100, temperature=0).choices[0].text
    stop = next(full[i : i + 2] for i in range(5, 80) if full.find(full[i : i + 2]) == i)
    cut = client.completions.create(model="model", prompt="QUEEN:\n", max_tokens=100, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[: full.find(stop)] and cut.choices[0].finish_reason == "stop"
    with httpx.Client() as http:
        sid = new_session(http, server.url, "QUEEN:\n")
    first = client.completions.create(
        model="model", prompt="", max_tokens=40, temperature=0, extra_body={"session_id": sid}
    )
    second = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model="model", prompt="", max_tokens=60, temperature=0, stream=True, extra_body={"session_id": sid}
        )
    )
    assert first.choices[0].text + second == full


def test_errors_come_back_as_openai_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="model", prompt="hi", n=17)
    assert err.value.body["param"] == "n"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="model", prompt="caf\u00e9")
    assert err.value.body["param"] == "prompt" and "\u00e9" in err.value.body["message"]  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4o", prompt="hi")
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="model", prompt="hi", extra_body={"session_id": "x" * 32})
    assert err.value.body["param"] == "session_id"  # type: ignore[index]

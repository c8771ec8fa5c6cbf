"""vLLM's legacy completions with the official openai client, over real HTTP: n, logprobs (plain
and streamed), echo as scoring, penalties and logit_bias, the refusals; /v1/generate's names."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import torch
from openai.types.completion_choice import Logprobs

from tests.conftest import make_corpus_text
from tests.service_support import ServerThread, generate
from training.artifact import Artifact, load_artifact, score_text

PROMPT = "KING:\n"


@pytest.fixture(scope="module")
def server(tiny_artifact: Path) -> Iterator[ServerThread]:
    with ServerThread(model=str(tiny_artifact)) as running:
        yield running


@pytest.fixture(scope="module")
def artifact(tiny_artifact: Path) -> Artifact:
    return load_artifact(str(tiny_artifact))


@pytest.fixture
def client(server: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def model_logprobs(artifact: Artifact, context: str, text: str) -> list[list[float]]:
    """The model's own log-softmax before each character of ``text``, computed here directly."""
    ids = artifact.vocab.encode(context + text)
    h, c = artifact.module.init_state(1)
    with torch.inference_mode():
        logits, _, _ = artifact.module.forward(ids.unsqueeze(0), h, c)
    lp = torch.log_softmax(logits[0].double(), dim=-1)
    return lp[len(context) - 1 : len(context) - 1 + len(text)].tolist()


def test_n_seeded_gives_distinct_reproducible_choices_streamed_or_not(client: openai.OpenAI) -> None:
    ask = dict(model="model", prompt=PROMPT, max_tokens=40, temperature=1.0, seed=5, n=3)
    first = client.completions.create(**ask)  # type: ignore[call-overload]
    again = client.completions.create(**ask)  # type: ignore[call-overload]
    texts = [c.text for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2] and len(set(texts)) == 3
    assert [c.text for c in again.choices] == texts
    assert all(len(t) == 40 and c.finish_reason == "length" for t, c in zip(texts, first.choices, strict=True))
    assert first.usage is not None
    assert (first.usage.prompt_tokens, first.usage.completion_tokens, first.usage.total_tokens) == (6, 120, 126)
    single = client.completions.create(**(ask | {"n": 1}))  # type: ignore[call-overload]
    assert single.choices[0].text == texts[0]
    streamed = ["", "", ""]
    finished: dict[int, str | None] = {}
    for chunk in client.completions.create(**ask, stream=True):  # type: ignore[call-overload]
        (part,) = chunk.choices
        streamed[part.index] += part.text
        if part.finish_reason is not None:
            finished[part.index] = part.finish_reason
    assert streamed == texts and finished == {0: "length", 1: "length", 2: "length"}


def test_logprobs_parse_into_the_clients_types_and_are_the_models_own(
    client: openai.OpenAI, artifact: Artifact
) -> None:
    ask = dict(model="model", prompt=PROMPT, max_tokens=30, temperature=0.7, logprobs=3, seed=2)
    ask["extra_body"] = {"top_k": 5}  # an extension: the client has no top_k
    result = client.completions.create(**ask)  # type: ignore[call-overload]
    choice = result.choices[0]
    lp = choice.logprobs
    assert isinstance(lp, Logprobs)
    assert lp.tokens == list(choice.text) and lp.text_offset == list(range(30))
    expected = model_logprobs(artifact, PROMPT, choice.text)  # before temperature and top_k
    assert lp.token_logprobs is not None and lp.top_logprobs is not None
    for k, ch in enumerate(choice.text):
        row = expected[k]
        assert lp.token_logprobs[k] == pytest.approx(row[artifact.vocab.index[ch]], abs=1e-6)
        best = sorted(range(len(row)), key=row.__getitem__, reverse=True)[:3]
        top = lp.top_logprobs[k]
        assert set(top) == {artifact.vocab.chars[i] for i in best} | {ch}
        for i in best:
            assert top[artifact.vocab.chars[i]] == pytest.approx(row[i], abs=1e-6)
    streamed = list(
        client.completions.create(
            model="model",
            prompt=PROMPT,
            max_tokens=30,
            temperature=0.7,
            logprobs=3,
            seed=2,
            extra_body={"top_k": 5},
            stream=True,
        )  # type: ignore[call-overload]
    )
    pieces = [c.choices[0] for c in streamed if c.choices[0].text]
    assert "".join(p.text for p in pieces) == choice.text
    assert [t for p in pieces for t in p.logprobs.tokens] == lp.tokens  # type: ignore[union-attr]
    assert [o for p in pieces for o in p.logprobs.text_offset] == lp.text_offset  # type: ignore[union-attr]
    assert [x for p in pieces for x in p.logprobs.token_logprobs] == lp.token_logprobs  # type: ignore[union-attr]


def test_echo_with_no_tokens_scores_a_text_as_chargen_eval_does(client: openai.OpenAI, artifact: Artifact) -> None:
    text = make_corpus_text(300, seed=4)  # past the step-fed length: read with `forward`, in chunks
    result = client.completions.create(model="model", prompt=text, max_tokens=0, echo=True, logprobs=1)
    choice = result.choices[0]
    assert choice.text == text and choice.finish_reason == "length"
    assert result.usage is not None and (result.usage.prompt_tokens, result.usage.completion_tokens) == (300, 0)
    lp = choice.logprobs
    assert lp is not None and lp.token_logprobs is not None and lp.top_logprobs is not None
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing predicts the first character
    nats, count = score_text(artifact, text)
    assert count == 299
    assert sum(lp.token_logprobs[1:]) == pytest.approx(-nats * count, abs=1e-4)  # type: ignore[arg-type]
    # streamed: the prompt's chunk first, with the same numbers
    chunks = list(
        client.completions.create(model="model", prompt=text, max_tokens=0, echo=True, logprobs=1, stream=True)
    )
    assert chunks[0].choices[0].text == text
    assert chunks[0].choices[0].logprobs.token_logprobs == lp.token_logprobs  # type: ignore[union-attr]
    assert chunks[-1].choices[0].finish_reason == "length"


def test_penalties_and_logit_bias_change_the_text(client: openai.OpenAI, artifact: Artifact) -> None:
    def text(**extra: object) -> str:
        ask = dict(model="model", prompt=PROMPT, max_tokens=60, temperature=0) | extra
        return client.completions.create(**ask).choices[0].text  # type: ignore[call-overload]

    plain = text()
    top = max(set(plain), key=plain.count)
    banned = text(logit_bias={str(artifact.vocab.index[top]): -100})
    assert top not in banned
    rare = min(artifact.vocab.chars, key=plain.count)
    assert text(logit_bias={str(artifact.vocab.index[rare]): 100}) == rare * 60
    repeated = text(frequency_penalty=2.0)
    assert repeated != plain and max(repeated.count(ch) for ch in set(repeated)) < max(
        plain.count(ch) for ch in set(plain)
    )
    assert text(presence_penalty=2.0) != plain


def test_refusals_name_their_field(client: openai.OpenAI, server: ServerThread) -> None:
    for ask, param, words in (
        (dict(best_of=2), "best_of", "deprecated"),
        (dict(suffix="end"), "suffix", "suffix"),
        (dict(n=17), "n", "CHARGEN_MAX_N"),
        (dict(logit_bias={"1000": 5}), "logit_bias", "/v1/models"),
    ):
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model="model", prompt="hi", **ask)  # type: ignore[call-overload]
        assert err.value.body["param"] == param and words in err.value.body["message"]  # type: ignore[index]
    with httpx.Client() as http:
        sid = http.post(server.url + "/v1/sessions", json={"prompt": PROMPT}).json()["session_id"]
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="model", prompt="", n=2, extra_body={"session_id": sid})
    assert err.value.body["param"] == "n" and "session" in err.value.body["message"]  # type: ignore[index]
    # best_of equal to n selects nothing: accepted
    assert len(client.completions.create(model="model", prompt="hi", n=2, best_of=2, max_tokens=3).choices) == 2


def test_generate_has_the_same_capabilities_under_its_names(client: openai.OpenAI, server: ServerThread) -> None:
    ask = dict(prompt=PROMPT, temperature=1.0, seed=5, n=3, logprobs=2, echo=True, frequency_penalty=0.5)
    openai_side = client.completions.create(
        model="model",
        max_tokens=20,
        **ask,  # type: ignore[call-overload]
    )
    with httpx.Client(timeout=60) as http:
        native = generate(http, server.url, max_new_chars=20, **ask)
        streamed = http.post(server.url + "/v1/generate", json=dict(max_new_chars=20, stream=True, **ask))
    assert [c["text"] for c in native["choices"]] == [c.text for c in openai_side.choices]
    assert native["text"] == native["choices"][0]["text"] and native["text"].startswith(PROMPT)
    assert native["logprobs"] == openai_side.choices[0].logprobs.model_dump()  # type: ignore[union-attr]
    assert native["usage"] == {"prompt_chars": 6, "completion_chars": 60}
    events = [line[6:] for line in streamed.text.splitlines() if line.startswith("data: ")]
    parsed = [json.loads(e) for e in events[:-1]]
    texts = ["", "", ""]
    for e in parsed:
        if "text" in e:
            texts[e["index"]] += e["text"]
    assert texts == [c["text"] for c in native["choices"]]
    assert sorted(e["index"] for e in parsed if "finish_reason" in e) == [0, 1, 2]


def test_vllms_sampling_extras_we_lack_are_refused_and_usage_can_be_streamed(
    client: openai.OpenAI, server: ServerThread
) -> None:
    for name, value in (("min_p", 0.1), ("repetition_penalty", 1.2), ("use_beam_search", True)):
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model="model", prompt="hi", extra_body={name: value})
        assert err.value.body["param"] == name  # type: ignore[index]
    chunks = list(
        client.completions.create(
            model="model", prompt=PROMPT, max_tokens=7, n=2, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (6, 14)
    with httpx.Client() as http:
        vocab = http.get(server.url + "/v1/models").json()["data"][0]["vocab"]
    ch = vocab[7]  # logit_bias's keys are indices into the model's vocab
    forced = client.completions.create(model="model", prompt=PROMPT, max_tokens=5, logit_bias={"7": 100})
    assert forced.choices[0].text == ch * 5


def test_echo_in_a_session_scores_its_first_character_given_the_sessions_text(
    client: openai.OpenAI, server: ServerThread, artifact: Artifact
) -> None:
    with httpx.Client() as http:
        sid = http.post(server.url + "/v1/sessions", json={"prompt": PROMPT}).json()["session_id"]
    scored = client.completions.create(
        model="model", prompt="ROMEO", max_tokens=0, echo=True, logprobs=0, extra_body={"session_id": sid}
    )
    lp = scored.choices[0].logprobs
    assert lp is not None and lp.token_logprobs is not None
    expected = model_logprobs(artifact, PROMPT, "ROMEO")
    got = lp.token_logprobs
    assert got == pytest.approx([row[artifact.vocab.index[ch]] for row, ch in zip(expected, "ROMEO", strict=True)])

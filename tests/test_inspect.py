"""The inspector: the artifact's ``inspect`` method (same numbers as ``forward``, gates and cells from
the paper's equations, scripted == eager) and ``POST /v1/inspect`` and ``/v1/inspect/units`` over
real HTTP, including bad input, sessions read without being changed, and older artifacts."""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from torch import nn

from service.artifact import load_model
from service.routers.inspect import MAX_PATTERN_CHARS, MAX_TEXT_CHARS, MAX_UNITS
from tests.service_support import ServerThread, generate, new_session
from tests.test_model import reference_step, small_model
from training.export import build_meta, script
from training.model import CharLSTM

TEXT = "ROMEO:\nthe night is fair, my lord,\n\nJULIET:\nsweet love, speak,\n"


# ---- the artifact method -------------------------------------------------------------------------


@torch.no_grad()
def test_inspect_logits_and_state_equal_forward() -> None:
    # The artifact's forward and inspect (eager forward trains through training/fast_layer.py).
    model = script(small_model(layers=3, hidden=8, vocab=11))
    tokens = torch.randint(0, 11, (2, 13), generator=torch.Generator().manual_seed(1))
    h, c = torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    logits, h1, c1 = model(tokens, h, c)
    i_logits, gates, cells, i_h, i_c = model.inspect(tokens, h, c)
    assert gates.shape == (3, 2, 13, 3, 8) and cells.shape == (3, 2, 13, 8)
    assert torch.equal(i_logits, logits)  # the same operations in the same order
    assert torch.equal(i_h, h1) and torch.equal(i_c, c1)
    assert torch.equal(cells[:, :, -1], c1)  # the last cell state is the returned one


@torch.no_grad()
def test_inspect_gates_and_cells_follow_the_papers_equations() -> None:
    """Each step's gates and c_t against Graves (2013) eq. 7-11 written out per layer."""
    model = small_model(layers=3, hidden=8, vocab=11)
    tokens = [4, 1, 9, 0, 7]
    h, c = torch.randn(3, 1, 8), torch.randn(3, 1, 8)
    logits, gates, cells, _, _ = model.inspect(torch.tensor([tokens]), h, c)
    hs, cs = h[:, 0], c[:, 0]
    H = model.hidden
    for t, token in enumerate(tokens):
        # gates from the reference: recompute i, f, o with the state before step t
        ref_logits, ref_h, ref_c = reference_step(model, token, hs, cs)
        w_x = model.input_proj.weight.T
        below = None
        for n in range(model.layers):
            pre = w_x[n * 4 * H : (n + 1) * 4 * H, token] + model.bias[n] + model.w_h[n].T @ hs[n]
            if below is not None:
                pre = pre + model.w_below[n - 1].T @ below
            a_i, a_f, _, a_o = pre.split(H)
            w_ci, w_cf, w_co = model.peephole[n]
            i = torch.sigmoid(a_i + w_ci * cs[n])
            f = torch.sigmoid(a_f + w_cf * cs[n])
            o = torch.sigmoid(a_o + w_co * ref_c[n])
            torch.testing.assert_close(gates[n, 0, t], torch.stack([i, f, o]))
            below = ref_h[n]
        torch.testing.assert_close(cells[:, 0, t], ref_c)
        torch.testing.assert_close(logits[0, t], ref_logits)
        hs, cs = ref_h, ref_c


@torch.no_grad()
def test_scripted_inspect_equals_eager_and_ignores_dropout() -> None:
    model = small_model(layers=2, hidden=16, vocab=7)
    model.dropout = 0.5
    scripted = script(model)
    tokens = torch.randint(0, 7, (1, 20), generator=torch.Generator().manual_seed(2))
    h, c = model.init_state(1)
    eager_out = model.inspect(tokens, h, c)
    model.train()  # inspect has no dropout: the same numbers in training mode
    for a, b, d in zip(eager_out, scripted.inspect(tokens, h, c), model.inspect(tokens, h, c), strict=True):
        torch.testing.assert_close(b, a)
        assert torch.equal(d, a)


# ---- the HTTP API --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tiny_artifact: Path) -> Iterator[ServerThread]:
    with ServerThread(model=str(tiny_artifact), state_url="memory://", max_body_bytes=65_536) as running:
        yield running


def inspect(client: httpx.Client, url: str, **body: Any) -> dict[str, Any]:
    response = client.post(url + "/v1/inspect", json=body)
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def test_inspect_reports_surprisal_predictions_and_units(
    server: ServerThread, client: httpx.Client, tiny_artifact: Path
) -> None:
    result = inspect(client, server.url, text=TEXT, layer=1, units=[0, 7])
    assert [c["char"] for c in result["chars"]] == list(TEXT)
    assert (result["layers"], result["hidden"], result["session_id"]) == (2, 32, None)
    for info in result["chars"]:
        assert info["surprisal_bits"] >= 0
        assert len(info["top"]) == 5
        probs = [p["p"] for p in info["top"]]
        assert probs == sorted(probs, reverse=True) and sum(probs) <= 1.0 + 1e-3
    assert len(result["next"]) == 5

    # the numbers are the artifact's: the text read after a newline from the initial state
    model = load_model(tiny_artifact)
    ids = [model.start_id, *model.encode(TEXT)]
    with torch.no_grad():
        h, c = model.module.init_state(1)
        logits, gates, cells, _, _ = model.module.inspect(torch.tensor([ids]), h, c)
    logp = torch.log_softmax(logits[0].double(), -1)
    expected = [-float(logp[t, ids[t + 1]]) / math.log(2) for t in range(len(TEXT))]
    assert [c["surprisal_bits"] for c in result["chars"]] == pytest.approx(expected, abs=1e-3)
    assert result["mean_surprisal_bits"] == pytest.approx(sum(expected) / len(expected), abs=1e-3)
    best = model.vocab[int(logp[0].argmax())]
    assert result["chars"][0]["top"][0]["char"] == best
    assert [u["unit"] for u in result["units"]] == [0, 7]
    unit = result["units"][1]
    assert unit["layer"] == 1
    assert unit["cell"] == pytest.approx(torch.tanh(cells[1, 0, 1:, 7]).tolist(), abs=1e-3)
    for g, name in enumerate(("input", "forget", "output")):
        assert unit[name] == pytest.approx(gates[1, 0, 1:, g, 7].tolist(), abs=1e-3)
        assert all(0 <= v <= 1 for v in unit[name])


def test_inspect_from_a_session_reads_its_state_and_leaves_it_unchanged(
    server: ServerThread, client: httpx.Client
) -> None:
    # with no text at all, generation starts after a newline: the same start as inspect's
    session = new_session(client, server.url)
    generated = generate(client, server.url, session_id=session, max_new_chars=30, temperature=0)["text"]
    before = client.get(f"{server.url}/v1/sessions/{session}").json()
    assert before["chars_consumed"] == 30
    # reading "the night" after the session's text gives the numbers of reading it all from the start
    from_session = inspect(client, server.url, text="the night", session_id=session, units=[3])
    from_start = inspect(client, server.url, text=generated + "the night", units=[3])
    tail = from_start["chars"][-len("the night") :]
    assert [c["surprisal_bits"] for c in from_session["chars"]] == pytest.approx(
        [c["surprisal_bits"] for c in tail], abs=2e-3
    )
    assert from_session["units"][0]["cell"] == pytest.approx(from_start["units"][0]["cell"][-9:], abs=2e-3)
    assert from_session["session_id"] == session
    # the session is unchanged, and goes on exactly where it was
    assert client.get(f"{server.url}/v1/sessions/{session}").json()["chars_consumed"] == 30
    more = generate(client, server.url, session_id=session, max_new_chars=10, temperature=0)["text"]
    assert generated + more == generate(client, server.url, max_new_chars=40, temperature=0)["text"]


def test_units_tracking_a_pattern_are_ranked_by_correlation(server: ServerThread, client: httpx.Client) -> None:
    body = {"text": TEXT, "pattern": "^[A-Z]+:", "top": 6}
    response = client.post(server.url + "/v1/inspect/units", json=body)
    assert response.status_code == 200, response.text
    result = response.json()
    mask = [0] * len(TEXT)
    for start, word in ((0, "ROMEO:"), (TEXT.index("JULIET:"), "JULIET:")):
        mask[start : start + len(word)] = [1] * len(word)
    assert result["mask"] == mask and result["matched_chars"] == 13
    units = result["units"]
    assert len(units) == 6
    strengths = [abs(u["correlation"]) for u in units]
    assert strengths == sorted(strengths, reverse=True)
    # the reported correlation is that of the returned values with the mask
    for unit in units:
        values = torch.tensor(unit["values"], dtype=torch.float64)
        m = torch.tensor(mask, dtype=torch.float64)
        r = float(torch.corrcoef(torch.stack([values, m]))[0, 1])
        assert unit["correlation"] == pytest.approx(r, abs=2e-3)
    # one layer, a gate instead of the cell
    result = client.post(
        server.url + "/v1/inspect/units", json={**body, "layer": 0, "signal": "forget", "top": 2}
    ).json()
    assert {u["layer"] for u in result["units"]} == {0} and len(result["units"]) == 2
    assert all(0 <= v <= 1 for u in result["units"] for v in u["values"])


def test_info_endpoint_and_the_page_are_served(server: ServerThread, client: httpx.Client) -> None:
    info = client.get(server.url + "/v1/inspect").json()
    assert info == {
        "available": True,
        "layers": 2,
        "hidden": 32,
        "max_text_chars": MAX_TEXT_CHARS,
        "max_units": MAX_UNITS,
        "max_pattern_chars": MAX_PATTERN_CHARS,
        "max_top_units": 32,
    }
    page = client.get(server.url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<script src="/static/app.js"' in page.text
    for asset, kind in (("app.js", "javascript"), ("style.css", "text/css")):
        response = client.get(f"{server.url}/static/{asset}")
        assert response.status_code == 200 and kind in response.headers["content-type"]
    # nothing from outside: the page works offline
    assert "http://" not in page.text and "https://" not in page.text


BAD_INSPECT = [
    ({"text": ""}, "text", "empty_text"),
    ({"text": "a" * (MAX_TEXT_CHARS + 1)}, "text", "text_too_long"),
    ({"text": "café"}, "text", "unknown_characters"),
    ({}, "text", None),
    ({"text": 5}, "text", None),
    ({"text": "the", "layer": 2}, "layer", "invalid_layer"),
    ({"text": "the", "layer": -1}, "layer", "invalid_layer"),
    ({"text": "the", "units": [32]}, "units", "invalid_unit"),
    ({"text": "the", "units": [-1]}, "units", "invalid_unit"),
    ({"text": "the", "units": list(range(MAX_UNITS + 1))}, "units", "too_many_units"),
    ({"text": "the", "units": "all"}, "units", None),
    ({"text": "the", "verbose": True}, "verbose", "unknown_field"),
]


@pytest.mark.parametrize(("body", "param", "code"), BAD_INSPECT)
def test_bad_inspect_requests_are_400s_naming_the_field(
    server: ServerThread, client: httpx.Client, body: dict[str, Any], param: str, code: str | None
) -> None:
    response = client.post(server.url + "/v1/inspect", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["message"].startswith(param)
    if code is not None:
        assert error["code"] == code


BAD_UNITS = [
    ({"text": TEXT, "pattern": ""}, "pattern", "empty_pattern"),
    ({"text": TEXT, "pattern": "x" * (MAX_PATTERN_CHARS + 1)}, "pattern", "pattern_too_long"),
    ({"text": TEXT, "pattern": "(unclosed"}, "pattern", "invalid_pattern"),
    ({"text": TEXT, "pattern": "zzz"}, "pattern", "pattern_matches_nothing"),
    ({"text": TEXT, "pattern": "(?s).*"}, "pattern", "pattern_matches_all"),
    ({"text": TEXT, "pattern": "a", "top": 0}, "top", None),
    ({"text": TEXT, "pattern": "a", "top": 33}, "top", None),
    ({"text": TEXT, "pattern": "a", "layer": 5}, "layer", "invalid_layer"),
    ({"text": TEXT, "pattern": "a", "signal": "hidden"}, "signal", None),
    ({"text": "é", "pattern": "a"}, "text", "unknown_characters"),
]


@pytest.mark.parametrize(("body", "param", "code"), BAD_UNITS)
def test_bad_unit_searches_are_400s_naming_the_field(
    server: ServerThread, client: httpx.Client, body: dict[str, Any], param: str, code: str | None
) -> None:
    response = client.post(server.url + "/v1/inspect/units", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["message"].startswith(param)
    if code is not None:
        assert error["code"] == code


def test_a_catastrophic_pattern_times_out_without_stalling_the_service(
    server: ServerThread, client: httpx.Client
) -> None:
    text = "a" * 1000 + ","  # exponential backtracking for this pattern: a 400 after the timeout
    started = time.monotonic()
    response = client.post(server.url + "/v1/inspect/units", json={"text": text, "pattern": "(a|aa)+$"})
    assert response.status_code == 400 and response.json()["error"]["code"] == "pattern_timeout"
    assert time.monotonic() - started < 10
    assert client.get(server.url + "/healthz").status_code == 200


def test_session_errors(server: ServerThread, client: httpx.Client) -> None:
    missing = "A" * 32
    for path, extra in (("/v1/inspect", {}), ("/v1/inspect/units", {"pattern": "t"})):
        response = client.post(server.url + path, json={"text": "the", "session_id": missing, **extra})
        assert response.status_code == 404 and response.json()["error"]["param"] == "session_id"
        response = client.post(server.url + path, json={"text": "the", "session_id": "nope", **extra})
        assert response.status_code == 404 and response.json()["error"]["param"] == "session_id"


class Legacy(nn.Module):
    """The artifact as exported before the inspector: forward, step and init_state only."""

    def __init__(self, model: CharLSTM) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, tokens: torch.Tensor, h: torch.Tensor, c: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.model(tokens, h, c)

    @torch.jit.export
    def step(
        self, tokens: torch.Tensor, h: torch.Tensor, c: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.model.step(tokens, h, c)

    @torch.jit.export
    def init_state(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.init_state(batch)


def test_a_model_without_inspect_still_serves_and_answers_501(tmp_path: Path, client: httpx.Client) -> None:
    vocab = sorted(set(TEXT))
    model = small_model(layers=2, hidden=8, vocab=len(vocab))
    checkpoint = {"best_val_loss": None, "config": {}, "vocab": vocab, "corpus": {"name": "old"}, "step": 0}
    meta = build_meta(model, checkpoint)
    del meta["methods"]  # as written before the inspector
    path = tmp_path / "old.pt"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.jit.save(torch.jit.script(Legacy(model)), str(path), _extra_files={"meta.json": json.dumps(meta)})
    assert not load_model(path).has_inspect
    with ServerThread(model=str(path), state_url="memory://") as old:
        assert generate(client, old.url, prompt="the", max_new_chars=5)["usage"]["completion_chars"] == 5
        assert client.get(old.url + "/v1/inspect").json()["available"] is False
        for route, body in (("/v1/inspect", {"text": "the"}), ("/v1/inspect/units", {"text": "the", "pattern": "t"})):
            response = client.post(old.url + route, json=body)
            assert response.status_code == 501
            error = response.json()["error"]
            assert error["code"] == "inspect_unsupported" and "chargen export" in error["message"]

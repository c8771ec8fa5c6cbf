"""Load test for `chargen serve` (locust).

Two kinds of users, 3 : 1:

- ``SessionUser``, a conversation: create a session with a prompt, stream a continuation with a
  prompt, continue it twice (streamed), delete it;
- ``StatelessUser``: one streamed generation with a prompt and no session.

A streamed request is reported once, when its last event has arrived: its response time is the
whole stream, its length the characters received. A stream that ends with an error event, without
`[DONE]`, or with fewer characters than asked (no stop strings are sent) counts as a failure.

Headless for a fixed time against a running service (docs/benchmarks.md has the full recipe):

    locust -f locustfile.py --headless -u 64 -r 16 -t 60s --host http://127.0.0.1:8000 \
        --csv /tmp/chargen-locust --only-summary
    python benchmarks/locust_summary.py /tmp/chargen-locust

``CHARGEN_LOCUST_CHARS`` sets the characters per streamed request (default 200);
``CHARGEN_LOCUST_PROMPT`` replaces the Shakespeare prompts with one (for models with another vocabulary).
"""

from __future__ import annotations

import json
import os
import random
import time

from locust import HttpUser, between, task

CHARS = int(os.environ.get("CHARGEN_LOCUST_CHARS", "200"))
PROMPTS = (
    [os.environ["CHARGEN_LOCUST_PROMPT"]]
    if os.environ.get("CHARGEN_LOCUST_PROMPT")
    else [
        "ROMEO:\n",
        "JULIET:\nO Romeo, Romeo! ",
        "KING RICHARD III:\nNow is the winter of our discontent\n",
        "First Citizen:\nBefore we proceed any further, hear me speak.\n",
        "HAMLET:\nTo be, or not to be: ",
    ]
)


class ChargenUser(HttpUser):
    abstract = True
    wait_time = between(0.5, 2.0)  # think time between a user's requests

    def stream(self, name: str, body: dict[str, object]) -> None:
        """POST /v1/generate with stream: true, read every event, report the whole stream once."""
        body = {"max_new_chars": CHARS, "temperature": 0.8, "stream": True, **body}
        started = time.perf_counter()
        with self.client.post("/v1/generate", json=body, name=name, stream=True, catch_response=True) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
                return
            chars, done, error = 0, False, None
            for line in response.iter_lines(decode_unicode=True):
                if not line or not line.startswith("data: "):
                    continue
                data = line[len("data: ") :]
                if data == "[DONE]":
                    done = True
                    break
                event = json.loads(data)
                if "error" in event:
                    error = event["error"].get("message", "error event")
                chars += len(event.get("text", ""))
            response.request_meta["response_time"] = (time.perf_counter() - started) * 1000
            response.request_meta["response_length"] = chars
            if error is not None:
                response.failure(f"error event: {error}")
            elif not done:
                response.failure("stream ended without [DONE]")
            elif chars != body["max_new_chars"]:
                response.failure(f"{chars} characters, asked for {body['max_new_chars']}")
            else:
                response.success()


class SessionUser(ChargenUser):
    weight = 3

    @task
    def conversation(self) -> None:
        with self.client.post(
            "/v1/sessions", json={"prompt": random.choice(PROMPTS)}, name="POST /v1/sessions", catch_response=True
        ) as response:
            if response.status_code != 201:
                response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
                return
            session_id = response.json()["session_id"]
        self.stream("stream: session prompt", {"session_id": session_id, "prompt": "\n" + random.choice(PROMPTS)})
        for _ in range(2):
            self.stream("stream: session continue", {"session_id": session_id})
        with self.client.delete(
            f"/v1/sessions/{session_id}", name="DELETE /v1/sessions/{id}", catch_response=True
        ) as response:
            if response.status_code != 204:
                response.failure(f"HTTP {response.status_code}: {response.text[:200]}")


class StatelessUser(ChargenUser):
    weight = 1

    @task
    def one_shot(self) -> None:
        self.stream("stream: stateless", {"prompt": random.choice(PROMPTS)})

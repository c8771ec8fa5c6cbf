"""A TorchServe handler for a chargen artifact, tuned as the issue's comparison was (issue 19).

TorchServe batches requests (batch size 64, 10 ms delay: benchmarks/torchserve_compare.py sets
that up); this handler feeds each request's prompt, then runs the whole decode loop of the batch
(every character of every row, sampled at each row's temperature) as ONE TorchScript call, and
answers each request with ``{"text": ...}``. One torch thread per worker process.

The request body is chargen's own shape: ``{"prompt": ..., "max_new_chars": N, "temperature": T}``.
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any

import torch
from torch import Tensor, nn


class Decoder(nn.Module):
    """`steps` characters for every row: the artifact's step, then a multinomial draw."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: Tensor, h: Tensor, c: Tensor, steps: int, temperature: Tensor) -> Tensor:
        picked: list[Tensor] = []
        for _ in range(steps):
            logits, h, c = self.model.step(tokens, h, c)
            tokens = torch.multinomial(torch.softmax(logits / temperature, dim=1), 1).squeeze(1)
            picked.append(tokens)
        return torch.stack(picked, dim=1)


class Generator:
    """The loaded artifact, its vocabulary and the scripted decode loop."""

    def __init__(self, artifact: str) -> None:
        torch.set_num_threads(1)
        extra = {"meta.json": ""}
        with warnings.catch_warnings():  # torch.jit's deprecation: TorchScript is the artifact's format
            warnings.filterwarnings("ignore", category=DeprecationWarning, message=r".*torch\.jit.*")
            self.model = torch.jit.load(artifact, map_location="cpu", _extra_files=extra)
            self.decoder = torch.jit.script(Decoder(self.model))
        self.vocab: list[str] = json.loads(extra["meta.json"])["vocab"]
        self.ids = {ch: i for i, ch in enumerate(self.vocab)}

    def generate(self, bodies: list[dict[str, Any]]) -> list[dict[str, str]]:
        with torch.inference_mode():
            hs, cs, firsts = [], [], []
            for body in bodies:  # each prompt on its own: all but its last character fed with forward
                ids = [self.ids[ch] for ch in body["prompt"] if ch in self.ids] or [0]
                h, c = self.model.init_state(1)
                if len(ids) > 1:
                    _, h, c = self.model.forward(torch.tensor([ids[:-1]]), h, c)
                hs.append(h)
                cs.append(c)
                firsts.append(ids[-1])
            steps = max(int(body.get("max_new_chars", 200)) for body in bodies)
            temperature = torch.tensor([[float(body.get("temperature", 1.0))] for body in bodies])
            picked = self.decoder(torch.tensor(firsts), torch.cat(hs, 1), torch.cat(cs, 1), steps, temperature)
        rows = picked.tolist()
        return [
            {"text": "".join(self.vocab[i] for i in row[: int(body.get("max_new_chars", 200))])}
            for row, body in zip(rows, bodies, strict=True)
        ]


_generator: Generator | None = None


def handle(data: list[dict[str, Any]] | None, context: Any) -> list[dict[str, str]] | None:
    """TorchServe's entry point: one call per batch; None at start-up (load the model)."""
    global _generator
    if _generator is None:
        model_dir = context.system_properties.get("model_dir")
        _generator = Generator(os.path.join(model_dir, context.manifest["model"]["serializedFile"]))
    if data is None:
        return None
    bodies = []
    for row in data:
        body = row.get("body") or row.get("data")
        bodies.append(json.loads(body) if isinstance(body, (bytes, bytearray, str)) else body)
    return _generator.generate(bodies)

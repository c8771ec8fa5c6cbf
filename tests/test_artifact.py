"""The exported artifact: the contract the service relies on."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import torch

from training.artifact import load_artifact
from training.export import model_from_checkpoint
from training.train import load_checkpoint

META_KEYS = {
    "format",
    "vocab",
    "layers",
    "hidden",
    "peepholes",
    "skip_connections",
    "params",
    "corpus",
    "val_loss_nats",
    "val_bpc",
    "train_steps",
    "created",
    "torch_version",
    "fingerprint",
}


def test_meta_describes_the_model(tiny_artifact: Path, corpus_file: Path) -> None:
    meta = load_artifact(str(tiny_artifact)).meta
    assert meta.keys() >= META_KEYS
    assert meta["format"] == "chargen-lstm/1"
    text = corpus_file.read_text()
    assert meta["vocab"] == sorted(set(text))
    assert (meta["layers"], meta["hidden"], meta["peepholes"]) == (2, 32, True)
    assert meta["corpus"]["chars"] == len(text) and len(meta["corpus"]["sha256"]) == 64
    assert meta["val_bpc"] > 0 and meta["train_steps"] == 60
    assert meta["fingerprint"].startswith("sha256:")


# Runs in a fresh interpreter that imports only torch: the artifact must stand on its own.
STANDALONE = r"""
import json, sys, torch
extra = {"meta.json": ""}
m = torch.jit.load(sys.argv[1], _extra_files=extra)
meta = json.loads(extra["meta.json"])
torch.manual_seed(0)
tokens = torch.randint(0, len(meta["vocab"]), (3, 17))
h, c = m.init_state(3)
logits, h1, c1 = m(tokens, h, c)
hs, cs = h, c
steps = []
for t in range(17):
    lo, hs, cs = m.step(tokens[:, t], hs, cs)
    steps.append(lo)
assert "training" not in sys.modules and "chargen" not in sys.modules
torch.save({"tokens": tokens, "logits": logits, "h": h1, "c": c1, "steps": torch.stack(steps, 1)}, sys.argv[2])
"""


def test_loads_without_chargen_and_equals_the_eager_model(tiny_artifact: Path, tmp_path: Path) -> None:
    out = tmp_path / "outputs.pt"
    subprocess.run([sys.executable, "-c", STANDALONE, str(tiny_artifact), str(out)], check=True, cwd=tmp_path)
    result = torch.load(out, weights_only=True)
    # T single steps equal one T-character forward
    torch.testing.assert_close(result["steps"], result["logits"], rtol=1e-5, atol=1e-5)
    # and the scripted artifact equals the eager model from the checkpoint it was exported from
    eager = model_from_checkpoint(load_checkpoint(tiny_artifact.parent / "best.pt"))
    with torch.no_grad():
        h, c = eager.init_state(3)
        logits, h1, c1 = eager(result["tokens"], h, c)
    torch.testing.assert_close(logits, result["logits"])
    torch.testing.assert_close(h1, result["h"])
    torch.testing.assert_close(c1, result["c"])


def test_fingerprint_identifies_the_weights(tiny_artifact: Path) -> None:
    with zipfile.ZipFile(tiny_artifact) as z:
        name = next(n for n in z.namelist() if n.endswith("extra/meta.json"))
        meta = json.loads(z.read(name))
    assert meta["fingerprint"] == load_artifact(str(tiny_artifact)).meta["fingerprint"]
    from training.export import fingerprint

    model = model_from_checkpoint(load_checkpoint(tiny_artifact.parent / "best.pt"))
    assert fingerprint(model) == meta["fingerprint"]
    with torch.no_grad():
        model.bias[0, 0] += 1e-3
    assert fingerprint(model) != meta["fingerprint"]


def test_the_service_reads_artifacts_without_importing_the_trainer(tiny_artifact: Path, tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from service.artifact import load_model\n"
        "from service.main import create_app\n"
        "from service.settings import Settings\n"
        "model = load_model(sys.argv[1])\n"
        "create_app(Settings(model=sys.argv[1]), model)\n"
        "print(sorted(m for m in sys.modules if m == 'training' or m.startswith('training.')))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(tiny_artifact)], capture_output=True, text=True, check=True, cwd=tmp_path
    )
    assert done.stdout.strip() == "[]"

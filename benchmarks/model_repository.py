"""Figures of the model repository (CHARGEN_MODELS_DIR): publish -> servable, and memory per model.

1. Publish -> servable on every replica: two `chargen serve` processes watch one directory; the
   script publishes a model the way the training job does (copy to a hidden temporary name, then
   one atomic rename) and times, from the rename, until BOTH replicas list the new version as
   ready in /v1/models (each polled every 10 ms). The publishes alternate two 3x256 artifacts (the
   bundled model and a re-initialised one, same vocabulary), so each is a new version of one id.
2. Memory per loaded model: one replica's resident set (VmRSS) before and after a model is
   published and ready (its engine started and calibrated), per model, for the bundled 3x256 and
   a 3x700. The 3x700 is exported untrained (random weights): memory depends on the shapes, not
   on what the weights learned.

    python benchmarks/model_repository.py --publishes 20
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = ROOT / "chargen" / "models" / "shakespeare.pt"
CHARGEN = str(Path(sys.executable).with_name("chargen"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def export_untrained(out: Path, vocab: list[str], layers: int, hidden: int, seed: int) -> Path:
    """A randomly initialised model exported like the trainer does (a distinct fingerprint)."""
    import torch

    from chargen.artifact import jit_deprecation_accepted
    from training.export import build_meta, script
    from training.model import CharLSTM, ModelConfig

    torch.manual_seed(seed)
    model = CharLSTM(ModelConfig(vocab_size=len(vocab), layers=layers, hidden=hidden)).eval()
    checkpoint = {"best_val_loss": None, "config": {}, "vocab": vocab, "corpus": {"name": "untrained"}, "step": 0}
    meta = build_meta(model, checkpoint)
    with jit_deprecation_accepted():
        torch.jit.save(script(model), str(out), _extra_files={"meta.json": json.dumps(meta)})
    return out


def publish(source: Path, directory: Path, name: str) -> float:
    """Copy to a hidden temporary name, then rename: returns the time of the rename."""
    tmp = directory / f".{name}.tmp"
    shutil.copyfile(source, tmp)
    os.sync()
    renamed = time.perf_counter()
    os.replace(tmp, directory / name)
    return renamed


class Replica:
    def __init__(self, directory: Path, threads: int) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {
            **os.environ,
            "CHARGEN_MODELS_DIR": str(directory),
            "CHARGEN_TORCH_THREADS": str(threads),
            "CHARGEN_LOG_LEVEL": "warning",
            "CHARGEN_MAX_MODELS": "64",
        }
        env.pop("CHARGEN_MODEL", None)
        self.proc = subprocess.Popen(
            [CHARGEN, "serve", "--host", "127.0.0.1", "--port", str(self.port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"model_repository: chargen serve on {self.port} did not start")
            time.sleep(0.2)

    def rows(self, client: httpx.Client) -> dict[str, dict[str, Any]]:
        return {row["id"]: row for row in client.get(self.url + "/v1/models").json()["data"]}

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def wait_ready(client: httpx.Client, replicas: list[Replica], model_id: str, fingerprint: str) -> float:
    """Poll every replica until each lists the version ready; returns when the last one did."""
    pending = list(replicas)
    deadline = time.monotonic() + 120
    while pending:
        for replica in list(pending):
            row = replica.rows(client).get(model_id)
            if row is not None and row["status"] == "ready" and row["fingerprint"] == fingerprint:
                pending.remove(replica)
        if pending:
            if time.monotonic() > deadline:
                raise SystemExit(f"model_repository: {model_id} {fingerprint[:19]} never became ready")
            time.sleep(0.01)
    return time.perf_counter()


def publish_to_servable(work: Path, publishes: int, threads: int) -> tuple[list[float], list[int]]:
    from service.artifact import load_model

    directory = work / "publish"
    directory.mkdir()
    bundled = load_model(BUNDLED)
    other = export_untrained(work / "other-3x256.pt", bundled.vocab, bundled.layers, bundled.hidden, seed=1)
    sources = [(other, load_model(other).fingerprint), (BUNDLED, bundled.fingerprint)]
    publish(BUNDLED, directory, "poet.pt")
    replicas = [Replica(directory, threads), Replica(directory, threads)]
    seconds: list[float] = []
    rss: list[int] = []  # replica 1's, before the first publish and after the last (a leak would show)
    try:
        with httpx.Client(timeout=10) as client:
            wait_ready(client, replicas, "poet", bundled.fingerprint)
            time.sleep(1.0)
            rss.append(replicas[0].rss_bytes())
            for i in range(publishes):
                source, fingerprint = sources[i % 2]
                renamed = publish(source, directory, "poet.pt")
                seconds.append(wait_ready(client, replicas, "poet", fingerprint) - renamed)
                time.sleep(0.5)  # let the replaced version drain and stop
            time.sleep(1.0)
            rss.append(replicas[0].rss_bytes())
    finally:
        for replica in replicas:
            replica.stop()
    return seconds, rss


def memory_per_model(work: Path, threads: int, copies: int) -> dict[str, list[int]]:
    from service.artifact import load_model

    directory = work / "memory"
    directory.mkdir()
    bundled = load_model(BUNDLED)
    publish(BUNDLED, directory, "base.pt")
    replica = Replica(directory, threads)
    deltas: dict[str, list[int]] = {"3x256 (bundled)": [], "3x700 (untrained)": []}
    try:
        with httpx.Client(timeout=10) as client:
            for n in range(copies):
                for label, layers, hidden in (("3x256 (bundled)", 3, 256), ("3x700 (untrained)", 3, 700)):
                    source = export_untrained(work / f"m{n}-{hidden}.pt", bundled.vocab, layers, hidden, seed=10 + n)
                    if hidden == 256 and n == 0:
                        source = BUNDLED  # the bundled weights themselves, once
                    model_id = f"m{n}-{hidden}"
                    time.sleep(1.0)
                    before = replica.rss_bytes()
                    publish(source, directory, f"{model_id}.pt")
                    wait_ready(client, [replica], model_id, load_model(source).fingerprint)
                    time.sleep(1.0)  # calibration's garbage freed
                    deltas[label].append(replica.rss_bytes() - before)
    finally:
        replica.stop()
    return deltas


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--publishes", type=int, default=20, help="publishes timed (2 replicas)")
    parser.add_argument("--copies", type=int, default=3, help="models of each size loaded for the memory figure")
    parser.add_argument("--threads", type=int, default=1, help="CHARGEN_TORCH_THREADS of the replicas")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="chargen-bench-repo-") as tmp:
        work = Path(tmp)
        seconds, rss = publish_to_servable(work, args.publishes, args.threads)
        ms = [s * 1000 for s in seconds]
        print(f"publish -> servable on both of 2 replicas, {len(ms)} publishes of a 3x256 model (new version each):")
        print(f"  p50 {percentile(ms, 0.5):.0f} ms, max {max(ms):.0f} ms, min {min(ms):.0f} ms")
        before, after = (r / 2**20 for r in rss)
        print(f"  replica RSS before the first publish {before:.1f} MiB, after the last {after:.1f} MiB")
        deltas = memory_per_model(work, args.threads, args.copies)
        print("RSS delta per loaded model (one replica, engine started and calibrated):")
        for label, values in deltas.items():
            mib = [v / 2**20 for v in values]
            print(f"  {label}: {', '.join(f'{m:.1f}' for m in mib)} MiB (median {sorted(mib)[len(mib) // 2]:.1f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

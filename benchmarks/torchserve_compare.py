"""chargen against a tuned TorchServe on the same model, side by side (issue 19's comparison).

    pip install torchserve torch-model-archiver     # in an environment with torch, and Java 17
    python benchmarks/torchserve_compare.py --rounds 3
    python benchmarks/torchserve_compare.py --torchserve /path/to/venv/bin/torchserve --clients 64

TorchServe is tuned as the issue's table was: dynamic batching (batch size 64, at most 10 ms
delay), two worker processes with one torch thread each, and a handler (benchmarks/torchserve/
handler.py) whose whole decode loop is one TorchScript call. chargen runs `--workers auto` with
its defaults. Both serve the same artifact and run at once (an idle server costs little); each
round measures, per client level, chargen then TorchServe (the order alternates by round): that
many concurrent non-streaming clients, each on its own keep-alive connection sending requests of
``--chars`` characters at temperature 1 one after another for ``--seconds`` (serve_workers.py's
client). Printed: the median over rounds of each figure and chargen / TorchServe per level.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve_throughput import ROOT, Redis, Service, free_port, median, run_clients
from serve_workers import clients_rate

HANDLER = Path(__file__).resolve().parent / "torchserve" / "handler.py"


class TorchServe:
    """TorchServe in the foreground of a subprocess, one model `chargen`, the issue's tuning."""

    def __init__(self, torchserve: Path, model: Path, workers: int, batch_size: int, delay_ms: int) -> None:
        self.torchserve = torchserve
        self.model = model
        self.workers, self.batch_size, self.delay_ms = workers, batch_size, delay_ms
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.dir = Path(tempfile.mkdtemp(prefix="chargen-torchserve-"))

    def __enter__(self) -> TorchServe:
        import httpx

        store = self.dir / "store"
        store.mkdir()
        archiver = self.torchserve.with_name("torch-model-archiver")
        subprocess.run(
            [str(archiver), "--model-name", "chargen", "--version", "1.0", "--serialized-file", str(self.model),
             "--handler", str(HANDLER), "--export-path", str(store)],
            check=True,
        )  # fmt: skip
        models = {"chargen": {"1.0": {"defaultVersion": True, "marName": "chargen.mar", "minWorkers": self.workers,
                                      "maxWorkers": self.workers, "batchSize": self.batch_size,
                                      "maxBatchDelay": self.delay_ms, "responseTimeout": 120}}}  # fmt: skip
        config = self.dir / "config.properties"
        config.write_text(
            f"inference_address=http://127.0.0.1:{self.port}\n"
            f"management_address=http://127.0.0.1:{free_port()}\n"
            f"metrics_address=http://127.0.0.1:{free_port()}\n"
            f"model_store={store}\nload_models=chargen.mar\nmodels={json.dumps(models)}\n"
            "disable_token_authorization=true\nenable_envvars_config=false\n"
        )
        env = {**os.environ, "OMP_NUM_THREADS": "1", "LOG_LOCATION": str(self.dir / "logs")}
        self.log = open(self.dir / "torchserve.log", "wb")  # closed in __exit__
        self.proc = subprocess.Popen(
            [str(self.torchserve), "--start", "--foreground", "--ncs", "--model-store", str(store),
             "--ts-config", str(config), "--disable-token-auth"],
            cwd=self.dir, env=env, stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + 180
        body = {"prompt": "ROMEO:\n", "max_new_chars": 5}
        while True:  # ready when a prediction comes back
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = (self.dir / "torchserve.log").read_text(errors="replace")[-3000:]
                self.__exit__()  # its Java front end and workers would outlive this script otherwise
                raise SystemExit(f"torchserve_compare: TorchServe did not start; the end of its log:\n{tail}")
            try:
                if httpx.post(self.url + "/predictions/chargen", json=body, timeout=5).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)

    def __exit__(self, *exc: object) -> None:
        subprocess.run([str(self.torchserve), "--stop"], capture_output=True, timeout=60)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "chargen" / "models" / "shakespeare.pt")
    parser.add_argument("--torchserve", type=Path, default=shutil.which("torchserve"), help="its executable")
    parser.add_argument("--clients", default="1,8,64", help="concurrent clients, comma-separated")
    parser.add_argument("--chars", type=int, default=200, help="characters per request")
    parser.add_argument("--seconds", type=float, default=6.0, help="measured time per level and server")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", default="auto", help="chargen's CHARGEN_WORKERS")
    parser.add_argument("--ts-workers", type=int, default=2, help="TorchServe worker processes")
    args = parser.parse_args(argv)
    if args.torchserve is None or not Path(args.torchserve).exists():
        parser.error("no torchserve executable: pip install torchserve torch-model-archiver, or pass --torchserve")
    if not Path(args.torchserve).with_name("torch-model-archiver").exists():
        parser.error(f"no torch-model-archiver beside {args.torchserve}: pip install torch-model-archiver there")
    levels = [int(x) for x in args.clients.split(",")]
    ours: dict[int, list[float]] = {n: [] for n in levels}
    theirs: dict[int, list[float]] = {n: [] for n in levels}
    print(f"model {args.model}, {args.chars} chars per request, {len(os.sched_getaffinity(0))} cores", flush=True)
    env = {"OMP_NUM_THREADS": "1"}
    with (
        Redis() as redis,
        Service(args.model, {"CHARGEN_WORKERS": args.workers, "CHARGEN_STATE_URL": redis.url, **env}) as chargen,
        TorchServe(Path(args.torchserve), args.model, args.ts_workers, batch_size=64, delay_ms=10) as torchserve,
    ):
        for n in levels:  # warm-up, unmeasured
            run_clients(clients_rate(chargen.url, n, args.chars, 1.0))
            run_clients(clients_rate(torchserve.url, n, args.chars, 1.0, "/predictions/chargen"))
        for r in range(args.rounds):
            for n in levels:
                sides = [(ours, chargen.url, "/v1/generate"), (theirs, torchserve.url, "/predictions/chargen")]
                for figures, url, path in sides if r % 2 == 0 else sides[::-1]:
                    figures[n].append(run_clients(clients_rate(url, n, args.chars, args.seconds, path)))
            shown = ", ".join(f"{n}: {ours[n][-1]:,.0f} vs {theirs[n][-1]:,.0f}" for n in levels)
            print(f"round {r + 1}: chars/s chargen vs TorchServe, by clients: {shown}", flush=True)
    print(f"\nmedian of {args.rounds} rounds, {args.chars} characters per request")
    print(f"{'clients':>7} {'chargen chars/s':>16} {'TorchServe chars/s':>19} {'ratio':>6}")
    for n in levels:
        a, b = median(ours[n]), median(theirs[n])
        print(f"{n:7d} {a:16,.0f} {b:19,.0f} {a / b:6.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

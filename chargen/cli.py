"""The `chargen` command: the trainer's train, export, sample and eval (training/cli.py) and the
service's serve (service/main.py), in one entry point that belongs to neither half.

Each half is imported only by this module, and the service only when `serve` runs. Every user
error ends as one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

EXIT_USAGE = 2


class UsageError(Exception):
    """A problem with what the user asked for; printed as one line, exit code 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        fail(f"{self.prog}: {message} (see --help)")


def fail(message: str) -> NoReturn:
    print(f"chargen: error: {message}", file=sys.stderr)
    raise SystemExit(EXIT_USAGE)


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from service.main import run
    except ImportError as err:
        raise UsageError(f"the service is not available in this install ({err})") from None
    return run(host=args.host, port=args.port, model=args.model, workers=args.workers)


def build_parser() -> Parser:
    from training.cli import add_commands

    parser = Parser(prog="chargen", description="Character-level Graves LSTM: train, export, sample, serve.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    add_commands(sub)
    p = sub.add_parser("serve", help="run the HTTP service")
    p.add_argument("--host", default=None)
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--model", default=None, help="artifact to serve (default: the bundled model)")
    p.add_argument(
        "--workers",
        default=None,
        help="worker processes sharing the port, or auto: one per core (default: CHARGEN_WORKERS, else 1)",
    )
    p.set_defaults(run=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    from chargen.artifact import ArtifactError
    from training.cli import user_errors

    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except (UsageError, ArtifactError, *user_errors()) as err:
        fail(str(err))
    except BrokenPipeError:  # `chargen sample ... | head`
        return 0
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # through the imported module, whose UsageError the commands raise
    from chargen.cli import main as chargen_main

    raise SystemExit(chargen_main())

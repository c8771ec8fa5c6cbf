"""The trainer's commands of `chargen`: train, export, sample, eval (chargen/cli.py is the command).

Every user error (bad corpus, bad config, not an artifact, unknown characters) ends as one line on
stderr and exit code 2, with nothing overwritten.
"""

from __future__ import annotations

import argparse
import importlib.util
import signal
import sys
from dataclasses import fields
from pathlib import Path

from chargen.cli import UsageError

EXIT_PREEMPTED = 143  # 128 + SIGTERM: the job was stopped, its checkpoint is resumable


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def add_train_parser(subparsers: argparse._SubParsersAction) -> None:
    from training.config import TrainConfig, field_comments

    p = subparsers.add_parser("train", help="train a model; exports OUT/model.pt at the end")
    p.add_argument("--config", help="TOML file of TrainConfig fields (CLI flags override it)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out if it has a checkpoint")
    defaults, meanings = TrainConfig(), field_comments()
    for f in fields(TrainConfig):
        default = getattr(defaults, f.name)
        p.add_argument(
            f"--{f.name.replace('_', '-')}",
            dest=f.name,
            type=type(default),
            default=None,
            help=f"{meanings[f.name]} (default: {default!r})".replace("%", "%%"),
        )
    p.set_defaults(run=cmd_train)


TRAIN_EXTRA = ("matplotlib", "tqdm")  # pyproject's `train` extra: the loss plot, the progress bar


def check_train_extra() -> None:
    """Before any work: a service-only install (`pip install chargen`, the api image) has no
    plotting library, and would otherwise fail at the first evaluation."""
    missing = []
    for name in TRAIN_EXTRA:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # ValueError: present in sys.modules as None
            found = False
        if not found:
            missing.append(name)
    if missing:
        raise UsageError(f"train needs the train extra ({', '.join(missing)} missing): pip install 'chargen[train]'")


def cmd_train(args: argparse.Namespace) -> int:
    from training.config import TrainConfig, load_config
    from training.distributed import teardown
    from training.export import export
    from training.train import RunFiles, train

    check_train_extra()
    overrides = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name) is not None}
    config = load_config(args.config, overrides)
    files = RunFiles(Path(config.out))
    if args.resume and not files.last.exists():
        print(f"chargen: no checkpoint in {files.out}; starting a new run", file=sys.stderr)

    # SIGTERM (preemption, `docker stop`): finish the current step, checkpoint, exit resumable.
    terminated = False

    def on_sigterm(signum: int, frame: object) -> None:
        nonlocal terminated
        terminated = True

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    finished = False
    try:
        result = train(config, resume=args.resume, should_stop=lambda step: terminated)
        finished = True
    finally:
        signal.signal(signal.SIGTERM, previous)
        teardown(finished)
    if result.interrupted:
        return EXIT_PREEMPTED
    if not result.is_main:  # under torchrun, rank 0 alone exports
        return 0
    # named by this run's config: a resume may rename it, and its best checkpoint may be older
    meta = export(result.checkpoint, files.model, config.name or files.out.resolve().name)
    print(
        f"exported {files.model} (model {meta['name']!r}): val {meta['val_loss_nats']:.4f} nats/char, "
        f"{meta['val_bpc']:.4f} bits/char after {meta['train_steps']} steps",
        file=sys.stderr,
    )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from training.config import check_model_name
    from training.export import export

    if args.name is not None:
        check_model_name(args.name)
    if not Path(args.checkpoint).is_file():
        raise UsageError(f"checkpoint not found: {args.checkpoint}")
    meta = export(args.checkpoint, args.output, args.name)
    fingerprint = meta["fingerprint"][:19]
    print(f"wrote {args.output}: model {meta['name']!r}, {meta['params']:,} params, fingerprint {fingerprint}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from training.artifact import generate, load_artifact

    if args.temperature < 0:
        raise UsageError(f"--temperature must be >= 0, got {args.temperature}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UsageError(f"--top-p must be in (0, 1], got {args.top_p}")
    artifact = load_artifact(args.model)
    unknown = artifact.vocab.unknown(args.prompt)
    if unknown:
        shown = ", ".join(repr(ch) for ch in unknown[:10])
        raise UsageError(f"--prompt has characters the model does not know: {shown}")
    out = sys.stdout
    out.write(args.prompt)
    out.flush()
    for ch in generate(artifact, args.prompt, args.length, args.temperature, args.top_k, args.top_p, args.seed):
        out.write(ch)
        out.flush()  # stream: each character appears as it is sampled
    out.write("\n")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from training.artifact import load_artifact, score_text
    from training.data import TRAIN_FRACTION, load_corpus
    from training.train import LN2

    artifact = load_artifact(args.model)
    corpus = load_corpus(args.corpus)
    text = corpus.text
    if corpus.named:  # a named corpus is scored on its validation split, as in training
        text = text[int(len(text) * TRAIN_FRACTION) :]
    nats, count = score_text(artifact, text)
    part = "validation split of " if corpus.named else ""
    print(f"{part}{corpus.name}: {count:,} chars, {nats:.4f} nats/char, {nats / LN2:.4f} bits/char")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """train, export, sample and eval, each with its handler as ``run``."""
    add_train_parser(sub)

    p = sub.add_parser("export", help="write a TorchScript artifact from a checkpoint")
    p.add_argument("checkpoint")
    p.add_argument("-o", "--output", required=True, help="the artifact to write")
    p.add_argument("--name", help="the model's name, its id in the service (default: the run's name or directory)")
    p.set_defaults(run=cmd_export)

    p = sub.add_parser("sample", help="stream sampled text from an artifact")
    p.add_argument("model")
    p.add_argument("--prompt", default="")
    p.add_argument("--length", type=positive_int, default=500)
    p.add_argument("--temperature", type=float, default=1.0, help="0 is greedy")
    p.add_argument("--top-k", type=positive_int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.set_defaults(run=cmd_sample)

    p = sub.add_parser("eval", help="loss in nats and bits/char of an artifact on a text")
    p.add_argument("model")
    p.add_argument("--corpus", required=True, help="a UTF-8 file, or tinyshakespeare (its validation split)")
    p.set_defaults(run=cmd_eval)


def user_errors() -> tuple[type[Exception], ...]:
    """What the trainer's commands raise for a user's mistake (one line on stderr, exit 2)."""
    from chargen.artifact import ArtifactError
    from training.config import ConfigError
    from training.data import CorpusError

    return (ArtifactError, ConfigError, CorpusError)


if __name__ == "__main__":  # `python -m training.cli ...` (as torchrun command lines use it) is the chargen command
    from chargen.cli import main

    raise SystemExit(main())

"""bf16 against fp32: what the service's CHARGEN_PRECISION=bf16 costs in quality and gains in speed.

Quality: nats per character on the validation text (the last 10 % of the corpus, as the trainer
splits it), read as ``--streams`` contiguous rows with the state carried from chunk to chunk, by
the artifact in fp32 and by the service's bf16 copy (service/engine/precision.py: bf16 weights,
fp32 tensors in and out). Speed: the artifact's ``step`` at several batch sizes in both precisions
(one torch thread, as the engine runs; bf16 with oneDNN on, fp32 with it off, as the service sets
them), alternated round by round, medians of ``--rounds``.

    python benchmarks/precision_quality.py                      # /work/shared/data/tinyshakespeare.txt
    python benchmarks/precision_quality.py --corpus my.txt --model runs/x/model.pt
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from service.artifact import LoadedModel, load_model  # noqa: E402
from service.engine.precision import bf16_copy, cpu_has_bf16_units, steps_per_s  # noqa: E402

TRAIN_FRACTION = 0.9  # the trainer's split (training/data.py): the last 10 % is validation


def nats_per_char(model: LoadedModel, ids: torch.Tensor, streams: int, chunk: int) -> float:
    rows = len(ids) // streams
    text = ids[: rows * streams].view(streams, rows)
    total, count = 0.0, 0
    with torch.inference_mode():
        h, c = model.module.init_state(streams)
        for start in range(0, rows - 1, chunk):
            inputs = text[:, start : min(start + chunk, rows - 1)]
            targets = text[:, start + 1 : start + 1 + inputs.shape[1]]
            logits, h, c = model.module.forward(inputs, h, c)
            flat = logits.reshape(-1, logits.shape[-1])
            total += float(torch.nn.functional.cross_entropy(flat, targets.reshape(-1), reduction="sum"))
            count += targets.numel()
    return total / count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "chargen" / "models" / "shakespeare.pt")
    parser.add_argument("--corpus", type=Path, default=Path("/work/shared/data/tinyshakespeare.txt"))
    parser.add_argument("--streams", type=int, default=64, help="contiguous rows the validation text is cut into")
    parser.add_argument("--chunk", type=int, default=256, help="characters per forward call")
    parser.add_argument("--sizes", default="1,16,64,128", help="batch sizes of the step timing")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model = load_model(args.model)
    half = bf16_copy(model)
    text = args.corpus.read_text(encoding="utf-8")
    valid = text[int(len(text) * TRAIN_FRACTION) :]
    unknown = model.unknown_chars(valid)
    if unknown:
        raise SystemExit(f"precision_quality: characters outside the model's vocabulary: {unknown[:10]}")
    ids = torch.tensor(model.encode(valid))
    print(f"model {args.model}, validation text {len(valid)} chars, bf16 units: {cpu_has_bf16_units()}")
    torch.backends.mkldnn.enabled = False
    fp32 = nats_per_char(model, ids, args.streams, args.chunk)
    torch.backends.mkldnn.enabled = True
    bf16 = nats_per_char(half, ids, args.streams, args.chunk)
    print(
        f"nats/char: fp32 {fp32:.4f}, bf16 {bf16:.4f}, bf16 - fp32 {bf16 - fp32:+.4f} "
        f"({(bf16 - fp32) / math.log(2):+.4f} bits/char)"
    )
    sizes = [int(x) for x in args.sizes.split(",")]
    rates: dict[int, dict[str, list[float]]] = {n: {"fp32": [], "bf16": []} for n in sizes}
    for _ in range(args.rounds):
        for n in sizes:
            torch.backends.mkldnn.enabled = False
            rates[n]["fp32"].append(steps_per_s(model.module, n, 0.3))
            torch.backends.mkldnn.enabled = True
            rates[n]["bf16"].append(steps_per_s(half.module, n, 0.3))
    print(f"\nstep, chars/s, medians of {args.rounds} rounds (one torch thread)")
    print(f"{'rows':>5} {'fp32':>9} {'bf16':>9} {'bf16/fp32':>10}")
    for n in sizes:
        a, b = (sorted(rates[n][k])[len(rates[n][k]) // 2] for k in ("fp32", "bf16"))
        print(f"{n:>5} {a:>9.0f} {b:>9.0f} {b / a:>10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Summarise a headless locust run from its CSV: requests/s, failures and p50/p95/p99 per request name.

    locust -f locustfile.py --headless -u 64 -r 16 -t 60s --host http://127.0.0.1:8000 \
        --csv /tmp/chargen-locust --only-summary
    python benchmarks/locust_summary.py /tmp/chargen-locust      # reads /tmp/chargen-locust_stats.csv

Exits with status 1 when any request failed (or none was made), so a script can check a run.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path


def read_stats(prefix: str) -> list[dict[str, str]]:
    path = Path(prefix + "_stats.csv")
    if not path.exists():
        raise SystemExit(f"locust_summary: no {path} (run locust with --csv {prefix})")
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def number(row: dict[str, str], key: str) -> float:
    value = row.get(key, "") or "0"
    return float(value) if value != "N/A" else float("nan")


def summarise(rows: list[dict[str, str]]) -> tuple[str, int, int]:
    """The table, total requests and total failures."""
    header = f"{'request':<34} {'count':>7} {'fail':>5} {'req/s':>7} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8}"
    lines = [header, "-" * len(header)]
    total = failures = 0
    for row in rows:
        name = row["Name"] if row["Name"] != "Aggregated" else "all requests"
        if row["Type"] and row["Name"] != "Aggregated":
            name = f"{row['Type']} {name}" if not name.startswith(row["Type"]) else name
        count, failed = int(number(row, "Request Count")), int(number(row, "Failure Count"))
        if row["Name"] == "Aggregated":
            total, failures = count, failed
            lines.append("-" * len(header))
        lines.append(
            f"{name[:34]:<34} {count:>7} {failed:>5} {number(row, 'Requests/s'):>7.2f} "
            f"{number(row, '50%'):>8.0f} {number(row, '95%'):>8.0f} {number(row, '99%'):>8.0f}"
        )
    return "\n".join(lines), total, failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prefix", help="the --csv prefix given to locust")
    args = parser.parse_args(argv)
    table, total, failures = summarise(read_stats(args.prefix))
    print(table)
    print(f"\n{total} requests, {failures} failures")
    failures_csv = Path(args.prefix + "_failures.csv")
    if failures and failures_csv.exists():
        print(failures_csv.read_text().strip())
    return 0 if total and not failures else 1


if __name__ == "__main__":
    sys.exit(main())

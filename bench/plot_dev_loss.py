"""Dev-set curves of several training runs in one PNG, from their `metrics.jsonl` or logs.

    python -m u2moe.bench.plot_dev_loss --out dev_loss.png small_dense=exp/small_dense small_moe=exp/small_moe
    python -m u2moe.bench.plot_dev_loss --metric wer --out dev_wer.png ...

Each run is LABEL=PATH, PATH an experiment directory, its metrics.jsonl, or the trainer's log
(a `.log` file: its "dev step N utts U name value ..." lines, for a run whose metrics.jsonl was not
kept). A resumed run logs some steps twice; the last record of a step wins. Needs matplotlib (`pip install -e .[plot]`).
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Iterator

# The trainer's evaluation line (trainer/progress.py: dev_line), after the logger's prefix.
DEV_LINE = re.compile(r"\bdev step (\d+) utts \d+ (.*)$")


def _dev_records(path: Path) -> Iterator[tuple[int, dict[str, float]]]:
    """(step, metrics) of each dev evaluation in a metrics.jsonl or a trainer log, in file order."""
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if path.suffix == ".log":
            match = DEV_LINE.search(line)
            if match:
                fields = match.group(2).split()
                yield int(match.group(1)), {k: float(v) for k, v in zip(fields[::2], fields[1::2])}
            continue
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as err:
            raise SystemExit(f"{path}:{number}: not JSON ({err})") from None
        if record.get("split") == "dev":
            yield int(record["step"]), record


def dev_curve(path: str | Path, metric: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `metric` in the dev records of a metrics.jsonl or log, in step order."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    by_step: dict[int, float] = {}
    for step, record in _dev_records(path):
        if metric in record:
            by_step[step] = float(record[metric])
    if not by_step:
        raise SystemExit(f"{path}: no dev records with '{metric}'")
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", metavar="LABEL=PATH")
    parser.add_argument("--metric", default="loss", help="a dev metric: loss, loss_ctc, loss_att, cer, wer")
    parser.add_argument("--out", required=True, help="PNG file")
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("needs matplotlib: pip install -e .[plot]") from None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in args.runs:
        label, sep, path = run.partition("=")
        if not sep:
            raise SystemExit(f"{run}: expected LABEL=PATH")
        steps, values = dev_curve(path, args.metric)
        ax.plot(steps, values, marker="o", markersize=3, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"dev {args.metric}")
    ax.set_title(args.title or f"dev {args.metric}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

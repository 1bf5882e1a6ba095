"""The checkpoints of lowest dev loss (WeNet's --val_best), from the dev evaluations the trainer
records in metrics.jsonl."""
from __future__ import annotations

import json
import math
from pathlib import Path

from ..configs.loading import ConfigError
from .checkpoint import TAG_RE
from .progress import METRICS_FILE


def dev_losses(exp_dir: Path) -> dict[int, float]:
    """Dev loss by step. A resumed run evaluates a step again: the last evaluation counts."""
    path = exp_dir / METRICS_FILE
    losses: dict[int, float] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if record.get("split") == "dev" and "loss" in record:
                losses[int(record["step"])] = float(record["loss"])
    return losses


def best_tags(tags: list[str], losses: dict[int, float], count: int, where: Path) -> list[str]:
    """The `count` tags whose step has the lowest dev loss (the newer on a tie), oldest first.

    A checkpoint without an evaluation at its step (the last of a run stopped between
    evaluations, say) or with a non-finite loss cannot be ranked.
    """
    steps = {tag: int(TAG_RE.match(tag).group(1)) for tag in tags}
    ranked = [t for t in tags if math.isfinite(losses.get(steps[t], math.nan))]
    if len(ranked) < count:
        raise ConfigError(f"--average {count} --val-best: only {len(ranked)} of the {len(tags)} checkpoints in "
                          f"{where} have a dev loss at their step in {METRICS_FILE} (evaluate at every "
                          "checkpoint: train.eval_interval dividing train.save_interval)")
    best = sorted(ranked, key=lambda t: (losses[steps[t]], -steps[t]))[:count]
    return sorted(best)

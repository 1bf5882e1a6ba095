"""`u2moe train --max-minutes`: a wall-time budget that stops every rank after the same step,
with a checkpoint (the demo bounds its training this way)."""
from __future__ import annotations

import json

import pytest

from trainer_helpers import prepare_corpus, run, train_command


@pytest.mark.slow
def test_max_minutes_stops_two_ranks_with_a_checkpoint(tmp_path):
    data = prepare_corpus(tmp_path / "data", train_utts=48, dev_utts=4)
    exp = tmp_path / "exp"
    # 100 epochs would take minutes; 0.05 min (3 s) of training stops after a few steps.
    cmd = train_command(data, exp, nproc=2, extra=["train.expert_parallel_size=2", "train.max_epochs=100"])
    log = tmp_path / "train.log"
    run(cmd + ["--max-minutes", "0.05"], timeout=300, log=log)
    text = log.read_text()
    assert "--max-minutes 0.05 reached" in text
    steps = [json.loads(line)["step"] for line in (exp / "metrics.jsonl").read_text().splitlines()]
    last = max(steps)
    assert 0 < last < 100 * 4  # stopped long before max_epochs
    tags = sorted(p.name for p in (exp / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert tags and int(tags[-1].split("_")[1]) >= last

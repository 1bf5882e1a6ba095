"""Commands that can run for minutes show a progress bar on stderr (stdout keeps their results)."""
from __future__ import annotations

import json
import re

import pytest

from test_data_support import make_kaldi_dir, run_prep


def _finished_bar(err: str, desc: str, total: int, unit: str) -> bool:
    # The rate reads "12.3shard/s", or "2.16s/step" where a step takes over a second.
    return re.search(rf"{desc}: 100%\|.*\| {total}/{total} \[.*(?:{unit}/s|s/{unit})\]", err) is not None


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_prep_shards_and_cmvn_count_shards(tmp_path, capsys, jobs):
    data_dir, _ = make_kaldi_dir(tmp_path / "corpus", count=5)
    shards = tmp_path / "shards"
    assert run_prep(["prep", "shards", "--data-dir", str(data_dir), "--out", str(shards), "--utts-per-shard", "2",
                     "--jobs", jobs]) == 0
    assert run_prep(["prep", "cmvn", "--shards", str(shards / "shards.list"), "--out", str(tmp_path / "cmvn.json"),
                     "--jobs", jobs]) == 0
    captured = capsys.readouterr()
    # 5 utterances, 2 a shard: 3 shards.
    assert _finished_bar(captured.err, "prep shards", 3, "shard"), captured.err
    assert _finished_bar(captured.err, "prep cmvn", 3, "shard"), captured.err
    assert "prep" not in captured.out


def test_bench_memory_counts_the_model_build_and_its_measurements(tmp_path, capsys):
    from u2moe.__main__ import main

    with pytest.raises(SystemExit) as done:
        main(["bench", "memory", "--config", "tiny_dense", "--gpus", "1", "--ep", "1"])
    assert done.value.code == 0
    captured = capsys.readouterr()
    # The build and 2 x 3 measurements (one and two utterances at three lengths).
    assert _finished_bar(captured.err, "bench memory", 7, "step"), captured.err
    assert json.loads(captured.out)["config"] == "tiny_dense"  # stdout: the plan alone

"""`u2moe demo --tiny-test`: every stage of the demo on a CI-sized corpus and model.

The full demo (about 10 minutes on 2 CPU cores) is not run here; this checks that each stage
runs and leaves its outputs, that the summary prints, and that a second run reuses everything.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from u2moe.demo.command import MODES, expert_parallel_size
from u2moe.demo.corpus import CorpusSpec, plan, read_sentences, split_sentences


def _espeak_or_skip() -> None:
    if shutil.which("espeak-ng"):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("espeak-ng is not installed (and we cannot install it)")


def test_split_holds_out_sentences_with_known_words():
    spec = CorpusSpec()
    splits = split_sentences(read_sentences(), spec)
    assert len(splits["dev"]) == spec.dev_sentences and len(splits["test"]) == spec.test_sentences
    train_words = {w for s in splits["train"] for w in s.split()}
    for held in ("dev", "test"):
        assert not set(splits[held]) & set(splits["train"])
        assert all(w in train_words for s in splits[held] for w in s.split())
    utts = plan(spec)
    assert len(utts["train"]) == spec.train_voices * len(splits["train"])
    assert len({u["speaker"] for u in utts["train"]}) > 50
    assert plan(spec) == utts  # deterministic


def test_a_step_count_below_one_is_refused_before_anything_is_written(tmp_path):
    work = tmp_path / "work"
    out = subprocess.run([sys.executable, "-m", "u2moe", "demo", "--max-steps", "0", "--work-dir", str(work)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "--max-steps must be >= 1, got 0" in out.stderr
    assert not work.exists()


def test_expert_parallel_size():
    assert [expert_parallel_size(n) for n in (1, 2, 3, 4, 6, 8, 16)] == [1, 2, 1, 4, 2, 8, 8]


@pytest.mark.slow
def test_tiny_demo_runs_every_stage_and_reuses_them(tmp_path):
    _espeak_or_skip()
    work = tmp_path / "work"
    cmd = [sys.executable, "-m", "u2moe", "demo", "--tiny-test", "--work-dir", str(work)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    for n, stage in enumerate(("corpus", "prep", "train", "export", "decode"), 1):
        assert f"=== [{n}/5] {stage}" in first.stdout
    assert "=== summary" in first.stdout
    for mode in MODES:
        assert f"| {mode} |" in first.stdout
        assert (work / "exp" / "test" / f"{mode}.txt").is_file()
    for split in ("train", "dev", "test"):
        assert (work / "corpus" / split / "wav.scp").is_file()
        assert (work / "data" / "shards" / split / "shards.list").is_file()
    assert (work / "exp" / "model.pt").is_file()
    summary = json.loads((work / "summary.json").read_text())
    assert summary["train"]["steps"] == 4
    assert set(MODES) <= set(summary["test"])
    assert all(summary["test"][m]["rtf"] > 0 for m in MODES)

    second = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-4000:]
    assert "corpus up to date" in second.stdout
    assert "already trained" in second.stdout
    assert "=== summary" in second.stdout

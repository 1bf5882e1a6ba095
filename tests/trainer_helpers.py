"""Shared set-up for the trainer tests: a small prepared corpus and multi-process launches."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from spawn_helpers import free_port
from test_data_support import make_kaldi_dir, run_prep

# A model small enough for several 2-process CPU runs per test, with every structural piece.
TINY = ["model.encoder.output_size=64", "model.encoder.attention_heads=2", "model.encoder.num_blocks=2",
        "model.encoder.ffn.hidden_units=128", "model.decoder.attention_heads=2",
        "model.decoder.ffn.hidden_units=128", "train.num_workers=1", "train.log_interval=1",
        "data.batch.max_frames_in_batch=1000", "data.filter.max_frames=1000", "optim.warmup_steps=20"]


def prepare_corpus(root: Path, train_utts: int = 48, dev_utts: int = 8, utts_per_shard: int = 12) -> dict:
    """Kaldi dirs -> shards, char units, CMVN; returns the trainer's path arguments."""
    train_dir, _ = make_kaldi_dir(root / "corpus", split="train", count=train_utts)
    dev_dir, _ = make_kaldi_dir(root / "corpus", split="dev", count=dev_utts)
    for name, data_dir, per in (("train", train_dir, utts_per_shard), ("dev", dev_dir, max(dev_utts // 2, 1))):
        assert run_prep(["prep", "shards", "--data-dir", str(data_dir), "--out", str(root / name),
                         "--utts-per-shard", str(per)]) == 0
    assert run_prep(["prep", "units", "--text", str(train_dir / "text"), "--out", str(root / "units"),
                     "--type", "char"]) == 0
    assert run_prep(["prep", "cmvn", "--shards", str(root / "train" / "shards.list"),
                     "--out", str(root / "cmvn.json")]) == 0
    vocab = sum(1 for line in (root / "units" / "units.txt").read_text().splitlines() if line.strip())
    return {"train": root / "train" / "shards.list", "dev": root / "dev" / "shards.list",
            "units": root / "units", "cmvn": root / "cmvn.json", "vocab": vocab}


def train_command(data: dict, exp_dir: Path, *, nproc: int, ds_config: str = "zero2_fp32",
                  preset: str = "tiny_moe", extra: list[str] = ()) -> list[str]:
    repo = Path(__file__).resolve().parents[1]
    sets = TINY + [f"model.vocab_size={data['vocab']}", *extra]
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                 "--master_port", str(free_port())] if nproc > 1 else [sys.executable])
    cmd = launcher + ["-m", "u2moe", "train", "--config", preset,
                      "--ds-config", str(repo / "ds_configs" / f"{ds_config}.json"),
                      "--train-shards", str(data["train"]), "--dev-shards", str(data["dev"]),
                      "--units", str(data["units"]), "--cmvn", str(data["cmvn"]), "--exp-dir", str(exp_dir)]
    for item in sets:
        cmd += ["--set", item]
    return cmd


def child_env() -> dict[str, str]:
    """A launched run's environment: one thread per process, and a free port (a one-process run
    would otherwise take the default 29500, which runs of concurrent test sessions share)."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port())}


def run(cmd: list[str], timeout: float, log: Path) -> subprocess.CompletedProcess:
    with log.open("w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout, env=child_env())
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{log.read_text()[-4000:]}"
    return proc


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=child_env())


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_all(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and every process below it (torchrun puts ranks in sessions of their own)."""
    victims = [proc.pid, *_descendants(proc.pid)]
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def wait_for(predicate, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended (rc {proc.returncode}) before the condition held")
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.05)


def train_losses(exp_dir: Path) -> dict[int, dict]:
    """The last logged training record of each step (a resumed run logs some steps twice)."""
    records = {}
    for line in (exp_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["split"] == "train":
            records[rec["step"]] = rec
    return records

"""The recipes (recipes/*/run.sh) on fake corpora laid out exactly like the real ones.

AISHELL-1: data_aishell/wav/{train,dev,test}/SPEAKER/BAC009SxxxxWxxxx.wav and
transcript/aishell_transcript_v0.8.txt (space-separated words). LibriSpeech:
LibriSpeech/PART/SPEAKER/CHAPTER/SPEAKER-CHAPTER-UTT.flac with SPEAKER-CHAPTER.trans.txt. Stages
0-3 (Kaldi dirs, shards, units, CMVN) run for real; the train stage is checked as a command line
(--dry-run true) with the 8 x 24 GB defaults, and run for real on the CPU for five steps with a
tiny model (slow), followed by export (the shipped average) and decode.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from test_data_support import read_kaldi_table

REPO = Path(__file__).resolve().parents[1]
TINY = ("--set model.encoder.output_size=64 --set model.encoder.attention_heads=2 "
        "--set model.encoder.num_blocks=2 --set model.encoder.ffn.hidden_units=128 "
        "--set model.decoder.attention_heads=2 --set model.decoder.ffn.hidden_units=128 "
        "--set train.num_workers=0 --set train.log_interval=1 --set optim.warmup_steps=5 "
        "--set data.batch.max_frames_in_batch=1000 --set data.filter.max_frames=1000 --max-steps 2")
HANZI = "而对楼市成交抑制作用最大的限购也成为了各地政府调控手段"
WORDS = ["THE", "CAT", "SAT", "ON", "A", "MAT", "DOG", "RAN", "HOME", "IT'S", "LATE"]


def _audio(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    wave = 0.2 * np.sin(2 * np.pi * rng.uniform(150, 400) * t) + rng.normal(0, 0.01, t.shape)
    return (wave * 32767).astype(np.int16)


def fake_aishell(root: Path) -> Path:
    """data_aishell with 2 speakers per split, 3 utterances each, one wav without transcript."""
    base = root / "data_aishell"
    lines = []
    rng = np.random.default_rng(0)
    for s, split in enumerate(("train", "dev", "test")):
        for spk in range(2):
            speaker = f"S{100 * s + spk + 2:04d}"
            folder = base / "wav" / split / speaker
            folder.mkdir(parents=True)
            for u in range(3):
                key = f"BAC009{speaker}W{u + 121:04d}"
                sf.write(folder / f"{key}.wav", _audio(0.8 + 0.2 * u, hash(key) % 1000), 16000, subtype="PCM_16")
                chars = [HANZI[i] for i in rng.integers(0, len(HANZI), 6)]
                lines.append(f"{key} {''.join(chars[:2])} {''.join(chars[2:5])} {chars[5]}")
        sf.write(base / "wav" / split / speaker / f"BAC009{speaker}W9999.wav", _audio(0.5, 1), 16000)
    (base / "transcript").mkdir()
    (base / "transcript" / "aishell_transcript_v0.8.txt").write_text("\n".join(sorted(lines)) + "\n",
                                                                      encoding="utf-8")
    return base


def fake_librispeech(root: Path) -> Path:
    """LibriSpeech with train-clean-100, dev-clean, test-clean, test-other: 2 speakers x 1 chapter x 3."""
    base = root / "LibriSpeech"
    rng = np.random.default_rng(1)
    for p, part in enumerate(("train-clean-100", "dev-clean", "test-clean", "test-other")):
        for spk in range(2):
            speaker, chapter = str(100 * (p + 1) + spk), str(5000 + p)
            folder = base / part / speaker / chapter
            folder.mkdir(parents=True)
            trans = []
            for u in range(3):
                key = f"{speaker}-{chapter}-{u:04d}"
                sf.write(folder / f"{key}.flac", _audio(0.8 + 0.2 * u, p * 10 + u), 16000, format="FLAC")
                trans.append(f"{key} {' '.join(rng.choice(WORDS, 4))}")
            (folder / f"{speaker}-{chapter}.trans.txt").write_text("\n".join(trans) + "\n")
    return base


def run_recipe(name: str, args: list[str], cwd: Path, timeout: float = 300) -> str:
    cmd = ["bash", str(REPO / "recipes" / name / "run.sh"), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "U2MOE": str(Path(sys.executable).parent / "u2moe")}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def _prepared(data: Path, sets: list[str]) -> None:
    for s in sets:
        assert (data / "shards" / s / "shards.list").is_file(), s
    assert (data / "units" / "units.txt").is_file()
    assert (data / "cmvn.json").is_file()


def _train_line(out: str) -> str:
    lines = [line for line in out.splitlines() if "launch/train.sh" in line]
    assert len(lines) == 1, out
    return lines[0]


def test_aishell_prep_stages_and_train_command(tmp_path):
    root = fake_aishell(tmp_path)
    data = tmp_path / "data"
    out = run_recipe("aishell", ["--aishell-root", str(root), "--data", str(data), "--exp", str(tmp_path / "exp"),
                                 "--stage", "0", "--stop-stage", "3", "--nj", "2"], tmp_path)
    for split in ("train", "dev", "test"):
        texts = read_kaldi_table(data / split / "text")
        assert len(texts) == 6  # the wav without transcript is left out
        assert all(" " not in t for t in texts.values())  # word spaces removed
        wavs = read_kaldi_table(data / split / "wav.scp")
        assert all(Path(p).is_absolute() and Path(p).is_file() for p in wavs.values())
        assert set(read_kaldi_table(data / split / "utt2spk").values()) <= {k[6:11] for k in texts}
    _prepared(data, ["train", "dev", "test"])
    units = (data / "units" / "units.txt").read_text(encoding="utf-8").split()
    assert set(HANZI) & set(units)
    assert "launch/train.sh" not in out
    # Stage 4 with the defaults: the 8 x 24 GB set-up.
    out = run_recipe("aishell", ["--data", str(data), "--exp", str(tmp_path / "exp"), "--stage", "4",
                                 "--stop-stage", "6", "--dry-run", "true"], tmp_path)
    line = _train_line(out)
    for part in ("--config moe_1b", "ds_configs/zero2_bf16.json", "train.expert_parallel_size=8",
                 str(data / "shards" / "train" / "shards.list")):
        assert part in line, (part, line)
    assert "export" in out and "--average 5" in out and "decode" in out


@pytest.mark.parametrize("recipe", ["aishell", "librispeech", "synth_en"])
def test_default_average_fits_the_checkpoints_every_preset_keeps(recipe, tmp_path):
    """Stage 5 as shipped averages no more checkpoints than training keeps, whatever the preset."""
    from u2moe.configs.experiment import load_config, preset_names

    out = run_recipe(recipe, ["--data", str(tmp_path / "data"), "--exp", str(tmp_path / "exp"), "--stage", "5",
                              "--stop-stage", "5", "--dry-run", "true"], tmp_path)
    average = int(re.search(r" export .*--average (\d+)", out).group(1))
    for preset in preset_names():
        assert average <= load_config(preset).train.keep_checkpoints, preset


def test_librispeech_prep_stages(tmp_path):
    root = fake_librispeech(tmp_path)
    data = tmp_path / "data"
    run_recipe("librispeech", ["--librispeech-root", str(root), "--data", str(data), "--stage", "0",
                               "--stop-stage", "3", "--train-parts", "train-clean-100", "--dev-parts", "dev-clean",
                               "--vocab-size", "40", "--nj", "2"], tmp_path)
    assert len(read_kaldi_table(data / "train" / "text")) == 6
    assert read_kaldi_table(data / "test_other" / "text")
    text = read_kaldi_table(data / "dev" / "text")
    assert all(set(t) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZ' ") for t in text.values())
    _prepared(data, ["train", "dev", "test_clean", "test_other"])
    assert (data / "units" / "spm.model").is_file()
    out = run_recipe("librispeech", ["--data", str(data), "--stage", "4", "--stop-stage", "4",
                                     "--dry-run", "true"], tmp_path)
    line = _train_line(out)
    assert "--config moe_1b" in line and "zero2_bf16.json" in line and "train.expert_parallel_size=8" in line


def test_parse_options(tmp_path):
    out = subprocess.run(["bash", str(REPO / "recipes" / "aishell" / "run.sh"), "--help"],
                         capture_output=True, text=True)
    assert out.returncode == 0 and "--stop-stage 6" in out.stderr and "--aishell-root" in out.stderr
    out = subprocess.run(["bash", str(REPO / "recipes" / "aishell" / "run.sh"), "--no-such-option", "1"],
                         capture_output=True, text=True)
    assert out.returncode == 1 and "unknown option --no-such-option" in out.stderr


def test_synth_en_prep_stages(tmp_path):
    from test_data_support import make_kaldi_dir

    corpus = tmp_path / "synth-en"
    for split, count in (("train", 12), ("dev", 4), ("test", 4)):
        make_kaldi_dir(corpus, split=split, count=count)
    data = tmp_path / "data"
    run_recipe("synth_en", ["--corpus", str(corpus), "--data", str(data), "--stage", "0", "--stop-stage", "3",
                            "--vocab-size", "60", "--nj", "2"], tmp_path)
    _prepared(data, ["train", "dev", "test"])


@pytest.mark.slow
def test_librispeech_train_export_decode_on_cpu(tmp_path):
    """Stages 0-6 for real: 2 CPU processes, expert parallelism 2, a tiny model, 2 steps."""
    root = fake_librispeech(tmp_path)
    data, exp = tmp_path / "data", tmp_path / "exp"
    out = run_recipe("librispeech", [
        "--librispeech-root", str(root), "--data", str(data), "--exp", str(exp), "--train-parts",
        "train-clean-100", "--dev-parts", "dev-clean", "--test-parts", "test-clean", "--vocab-size", "40",
        "--nj", "2", "--utts-per-shard", "3", "--config", "tiny_moe", "--ds-config", str(REPO / "ds_configs" / "zero2_fp32.json"),
        "--gpus", "2", "--expert-parallel-size", "2", "--train-opts",
        f"{TINY} --set train.save_interval=1 --max-steps 5"], tmp_path)
    # The steps really ran (each rank needs a shard of its own: 6 utterances, 3 per shard).
    assert re.search(r"epoch \d+ step 5/5 eta \S+ loss", out), out[-3000:]
    # The shipped average_num, over the checkpoints of steps 1-5.
    assert "--average 5" in out and (exp / "avg_5.pt").is_file()
    for mode in ("ctc_greedy", "ctc_prefix_beam", "attention", "attention_rescoring"):
        assert len((exp / "decode_test_clean" / f"{mode}.txt").read_text().splitlines()) == 6
    assert "WER" in out

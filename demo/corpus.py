"""The demo's speech corpus: shipped sentences spoken by espeak-ng, written as Kaldi dirs.

Deterministic: the split of the sentences, the voice, rate, pitch, silences and noise of every
utterance come from fixed seeds, and espeak-ng renders the same text identically, so two runs
(and two machines with the same espeak-ng) make the same corpus.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

SENTENCES = Path(__file__).resolve().parent / "sentences.txt"
SAMPLE_RATE = 16000
# espeak-ng accents and voice variants: each (accent, variant) is one "speaker".
ACCENTS = ["en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-us-nyc", "en-gb-x-gbclan"]
VARIANTS = ["m1", "m2", "m3", "m4", "m5", "m7", "f1", "f2", "f3", "f4", "f5"]
SEED = 20240607


class CorpusError(RuntimeError):
    pass


@dataclass
class CorpusSpec:
    """What to generate; its JSON is the corpus fingerprint (a changed spec regenerates)."""

    train_sentences: int = 0  # 0: every sentence not held out
    dev_sentences: int = 40
    test_sentences: int = 60
    train_voices: int = 3  # renderings of each training sentence (different speakers)
    version: int = 1

    def fingerprint(self) -> str:
        text = json.dumps(asdict(self), sort_keys=True) + SENTENCES.read_text(encoding="utf-8")
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_sentences(path: Path = SENTENCES) -> list[str]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def split_sentences(sentences: list[str], spec: CorpusSpec) -> dict[str, list[str]]:
    """Held-out dev/test sentences whose every word also occurs in a training sentence."""
    order = sorted(set(sentences))
    random.Random(SEED).shuffle(order)
    counts = Counter(w for s in order for w in s.split())
    held: dict[str, list[str]] = {"dev": [], "test": []}
    train: list[str] = []
    for sentence in order:
        words = sentence.split()
        target = "test" if len(held["test"]) < spec.test_sentences else (
            "dev" if len(held["dev"]) < spec.dev_sentences else None)
        # Hold a sentence out only if each of its words stays in at least one training sentence.
        if target and all(counts[w] > 1 for w in words):
            held[target].append(sentence)
            counts.subtract(words)
        else:
            train.append(sentence)
    if spec.train_sentences:
        train = train[:spec.train_sentences]
    if len(held["test"]) < spec.test_sentences or len(held["dev"]) < spec.dev_sentences or not train:
        raise CorpusError(f"{SENTENCES}: too few sentences for {spec}")
    return {"train": train, **held}


def plan(spec: CorpusSpec) -> dict[str, list[dict]]:
    """Every utterance to render: key, text, speaker, espeak-ng voice/rate/pitch, silences, noise."""
    splits = split_sentences(read_sentences(), spec)
    rng = random.Random(SEED + 1)
    speakers = [(a, v) for a in ACCENTS for v in VARIANTS]
    out: dict[str, list[dict]] = {}
    for split, sentences in splits.items():
        voices = spec.train_voices if split == "train" else 1
        utts = []
        for i, text in enumerate(sentences):
            for k, (accent, variant) in enumerate(rng.sample(speakers, voices)):
                spk = f"{accent}+{variant}"
                utts.append({"key": f"{spk.replace('+', '_')}-{split}_{i:04d}_{k}", "text": text,
                             "speaker": spk.replace("+", "_"), "voice": spk,
                             "rate": rng.randint(140, 190), "pitch": rng.randint(30, 70),
                             "lead": round(rng.uniform(0.05, 0.3), 3), "trail": round(rng.uniform(0.05, 0.3), 3),
                             "snr_db": round(rng.uniform(20, 40), 1), "seed": rng.randrange(2 ** 31)})
        out[split] = sorted(utts, key=lambda u: u["key"])
    return out


def espeak_binary() -> str:
    return shutil.which("espeak-ng") or ""


def ensure_espeak(log=print) -> str:
    """The espeak-ng path; installs the Debian package when missing and we are root."""
    found = espeak_binary()
    if found:
        return found
    if os.name == "posix" and os.geteuid() == 0 and shutil.which("apt-get"):
        log("espeak-ng not found: installing it (apt-get install espeak-ng)")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "espeak-ng"]):
            proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            if proc.returncode:
                raise CorpusError(f"{' '.join(cmd)} failed: {proc.stderr.strip()[-500:]}")
        found = espeak_binary()
        if found:
            return found
    raise CorpusError("espeak-ng is needed to generate the demo corpus: install it "
                      "(Debian/Ubuntu: sudo apt-get install espeak-ng; macOS: brew install espeak-ng) "
                      "and run the demo again")


def render(utt: dict, out_path: Path, espeak: str) -> float:
    """Speak one utterance, resample to 16 kHz, add silences and noise, write 16-bit FLAC.
    Returns the duration in seconds."""
    import soundfile as sf
    import torch
    import torchaudio.functional as AF

    torch.set_num_threads(1)
    with tempfile.NamedTemporaryFile(suffix=".wav") as tmp:
        proc = subprocess.run([espeak, "-v", utt["voice"], "-s", str(utt["rate"]), "-p", str(utt["pitch"]),
                               "-w", tmp.name, utt["text"].lower()], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
        if proc.returncode:
            raise CorpusError(f"espeak-ng failed on {utt['key']}: {proc.stderr.strip()}")
        wave, rate = sf.read(tmp.name, dtype="float32")
    if wave.ndim > 1:
        wave = wave[:, 0]
    # Trim espeak's own leading/trailing silence, then add ours.
    loud = np.flatnonzero(np.abs(wave) > 1e-3)
    if loud.size:
        wave = wave[loud[0]:loud[-1] + 1]
    wave = AF.resample(torch.from_numpy(wave.copy()), rate, SAMPLE_RATE).numpy()
    rng = np.random.default_rng(utt["seed"])
    peak = float(np.abs(wave).max()) or 1.0
    wave = wave * (10 ** (rng.uniform(-12, -3) / 20) / peak)
    lead, trail = (np.zeros(int(s * SAMPLE_RATE), dtype=np.float32) for s in (utt["lead"], utt["trail"]))
    wave = np.concatenate([lead, wave, trail])
    power = float(np.mean(wave ** 2)) or 1e-8
    noise = rng.normal(0.0, np.sqrt(power / 10 ** (utt["snr_db"] / 10)), wave.shape)
    wave = np.clip(wave + noise, -1.0, 1.0)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    sf.write(buf, (wave * 32767).astype(np.int16), SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    out_path.write_bytes(buf.getvalue())
    return len(wave) / SAMPLE_RATE


def _render_job(job: tuple[dict, str, str]) -> tuple[str, float]:
    utt, path, espeak = job
    return utt["key"], render(utt, Path(path), espeak)


def generate(root: Path, spec: CorpusSpec, jobs: int = 2, log=print) -> dict[str, Path]:
    """Kaldi dirs ROOT/{train,dev,test} (wav.scp with relative audio paths, text, utt2spk,
    utt2dur) and ROOT/audio/<split>/<key>.flac. Skipped when ROOT/.done.json matches `spec`."""
    from multiprocessing import get_context

    from tqdm import tqdm

    marker = root / ".done.json"
    dirs = {s: root / s for s in ("train", "dev", "test")}
    fingerprint = spec.fingerprint()
    if marker.is_file():
        done = json.loads(marker.read_text())
        if done.get("fingerprint") == fingerprint and all((d / "text").is_file() for d in dirs.values()):
            log(f"corpus up to date: {root} ({done['summary']})")
            return dirs
    espeak = ensure_espeak(log)
    utts = plan(spec)
    todo = []
    for split, items in utts.items():
        for utt in items:
            todo.append((utt, str(root / "audio" / split / f"{utt['key']}.flac"), espeak))
    marker.unlink(missing_ok=True)
    durations: dict[str, float] = {}
    with get_context("spawn").Pool(max(jobs, 1)) as pool:
        for key, dur in tqdm(pool.imap_unordered(_render_job, todo, chunksize=8), total=len(todo),
                             desc="espeak-ng", unit="utt", file=sys.stdout, mininterval=1.0):
            durations[key] = dur
    summary = []
    for split, items in utts.items():
        d = dirs[split]
        d.mkdir(parents=True, exist_ok=True)
        tables = {"wav.scp": lambda u: f"audio/{split}/{u['key']}.flac", "text": lambda u: u["text"],
                  "utt2spk": lambda u: u["speaker"], "utt2dur": lambda u: f"{durations[u['key']]:.3f}"}
        for name, value in tables.items():
            (d / name).write_text("".join(f"{u['key']} {value(u)}\n" for u in items), encoding="utf-8")
        with (d / "synth_params.jsonl").open("w") as f:
            for u in items:
                f.write(json.dumps(u) + "\n")
        hours = sum(durations[u["key"]] for u in items) / 3600
        summary.append(f"{split} {len(items)} utts {hours:.2f} h")
    marker.write_text(json.dumps({"fingerprint": fingerprint, "spec": asdict(spec),
                                  "summary": ", ".join(summary)}, indent=1) + "\n")
    log(f"corpus: {root} ({', '.join(summary)})")
    return dirs

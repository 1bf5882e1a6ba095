"""Throughput of the input pipeline on the shared synth-en corpus (a script, not a test).

Measures shards -> padded batches per data-loader worker process, for the CPU feature path
(workers decode + fbank + SpecAugment) and the device feature path (workers decode; the
FeatureExtractor runs on CUDA when available, else on this CPU in the main process), and a
single-process profile of the per-utterance stages (tar reading, decoding, fbank, SpecAugment).

    OMP_NUM_THREADS=1 .venv/bin/python -m u2moe.bench.data_loader --utts 2000 --workers 1                      # Opus as stored
    OMP_NUM_THREADS=1 .venv/bin/python -m u2moe.bench.data_loader --utts 2000 --workers 1 --audio-format flac  # re-encoded copy

The load average (os.getloadavg) is recorded before and after each measurement: the figures are
only comparable at similar load.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
import torchaudio

from ..data_prep import DataConfig, FeatureExtractor, Tokenizer, audio, build_dataloader
from ..data_prep.features import WAVE_SCALE, compute_fbank
from ..data_prep.shard_reader import read_shard
from ..data_prep.shard_writer import write_shards
from ..data_prep.sharding import read_shard_list
from ..data_prep.specaug import spec_augment
from ..data_prep.stats import DataStats
from ..data_prep.units import train_units


def default_corpus() -> Path:
    shared = os.environ.get("U2MOE_SHARED") or Path(__file__).resolve().parents[1].parent / "shared"
    return Path(shared) / "corpora" / "synth-en"


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def prepare(corpus: Path, split: str, utts: int, work: Path, audio_format: str = "keep") -> tuple[Path, Tokenizer]:
    """First `utts` utterances of the split as shards of 100 (the original Opus bytes, or
    re-encoded to `audio_format`), and a character tokenizer."""
    data_dir = work / split
    data_dir.mkdir(parents=True, exist_ok=True)
    for name in ("wav.scp", "text", "utt2spk"):
        lines = (corpus / split / name).read_text().splitlines()[:utts]
        if name == "wav.scp":  # absolute paths: the subset lives outside the corpus root
            lines = [f"{k} {corpus / p}" for k, p in (line.split(maxsplit=1) for line in lines)]
        (data_dir / name).write_text("\n".join(lines) + "\n")
    shards = work / f"shards-{audio_format}"
    write_shards(data_dir, shards, utts_per_shard=100, jobs=2, audio_format=audio_format)
    train_units(data_dir / "text", work / "units", "char")
    return shards / "shards.list", Tokenizer.load(work / "units")


def run_loader(shards: Path, tok: Tokenizer, cfg: DataConfig, workers: int,
               extractor: FeatureExtractor | None, device: str) -> dict:
    loader = build_dataloader(shards, tok, cfg, train=True, num_workers=workers)
    load_before = load()
    start = time.perf_counter()
    frames = 0
    for batch in loader:
        if extractor is not None:
            feats, lengths = extractor(batch["wavs"].to(device), batch["wav_lengths"].to(device))
            frames += int(lengths.sum())
        else:
            frames += int(batch["feats_lengths"].sum())
    if device == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    stats = loader.epoch_stats
    return {"utts": stats.utterances, "audio_s": round(stats.audio_seconds, 1), "wall_s": round(wall, 2),
            "utts_per_s_per_worker": round(stats.utterances / wall / max(workers, 1), 1),
            "x_realtime_per_worker": round(stats.audio_seconds / wall / max(workers, 1), 1),
            "frames": frames, "skipped": stats.skipped, "load_before": load_before, "load_after": load()}


def profile_stages(shards: Path, cfg: DataConfig, limit: int) -> dict:
    """Single-thread per-utterance cost of each stage, as seconds of audio per second of work."""
    torch.set_num_threads(1)  # as in a data-loader worker
    load_before = load()
    t0 = time.perf_counter()
    raws = [raw for url in read_shard_list(shards) for raw in read_shard(url, DataStats())]
    read_s = time.perf_counter() - t0  # tar reading, all shards
    read_audio_s = sum(json.loads(raw.members["json"])["duration"] for raw in raws)
    raws = raws[:limit]
    ext = next(e for e in audio.AUDIO_EXTENSIONS if e in raws[0].members)
    audio_s = decode_s = fbank_s = kaldi_s = specaug_s = 0.0
    gen = torch.Generator().manual_seed(0)
    for raw in raws:
        t0 = time.perf_counter()
        samples, rate, _ = audio.decode(raw.members[ext])
        wave = torch.from_numpy(samples[:, 0])
        t1 = time.perf_counter()
        feats = compute_fbank(wave, cfg.fbank, rate, cfg.fbank.dither, gen)
        t2 = time.perf_counter()
        spec_augment(feats[None], torch.tensor([feats.shape[0]]), cfg.spec_aug, gen)
        t3 = time.perf_counter()
        # torchaudio's kaldi.fbank (the tests' reference for ours), timed beside it for comparison.
        torchaudio.compliance.kaldi.fbank(wave[None] * WAVE_SCALE, num_mel_bins=cfg.fbank.num_mel_bins,
                                          dither=cfg.fbank.dither, energy_floor=0.0, sample_frequency=rate)
        kaldi_s += time.perf_counter() - t3
        audio_s += len(wave) / rate
        decode_s, fbank_s, specaug_s = decode_s + t1 - t0, fbank_s + t2 - t1, specaug_s + t3 - t2
    total = decode_s + fbank_s + specaug_s
    return {"utts": len(raws), "audio_s": round(audio_s, 1), "format": ext,
            f"{ext}_decode_x_rt": round(audio_s / decode_s), "fbank_x_rt": round(audio_s / fbank_s),
            "kaldi_fbank_x_rt": round(audio_s / kaldi_s), "specaug_x_rt": round(audio_s / specaug_s),
            "all_stages_x_rt": round(audio_s / total),
            "share_decode": round(decode_s / total, 2), "share_fbank": round(fbank_s / total, 2),
            "share_specaug": round(specaug_s / total, 2), "tar_read_x_rt": round(read_audio_s / read_s),
            "load_before": load_before, "load_after": load()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=default_corpus())
    parser.add_argument("--split", default="train")
    parser.add_argument("--utts", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2, help="passes per path; the best is reported")
    parser.add_argument("--work-dir", type=Path, default=None, help="keep shards here (default: a temp dir)")
    parser.add_argument("--audio-format", choices=("keep", "flac", "wav"), default="keep",
                        help="shard audio: keep = the corpus's Opus bytes; flac/wav = a re-encoded copy")
    parser.add_argument("--profile-utts", type=int, default=500)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = args.work_dir or Path(tmp)
        shards, tok = prepare(args.corpus, args.split, args.utts, work, args.audio_format)
        cfg = DataConfig()  # training defaults: dither 0.1, SpecAugment on, static batches of 16
        device = "cuda" if torch.cuda.is_available() else "cpu"
        results = {"machine": f"{os.cpu_count()} CPU cores, feature device for the GPU path: {device}",
                   "workers": args.workers, "config": "DataConfig() training defaults",
                   "audio_format": args.audio_format,
                   "shard_mb": round(sum(Path(p).stat().st_size for p in read_shard_list(shards)) / 1e6, 1)}
        results["cpu_path"] = max((run_loader(shards, tok, cfg, args.workers, None, "cpu")
                                   for _ in range(args.repeats)), key=lambda r: r["x_realtime_per_worker"])
        dev_cfg = DataConfig.from_dict({"device_features": True})
        extractor = FeatureExtractor(dev_cfg).to(device).train()
        results["device_path"] = max((run_loader(shards, tok, dev_cfg, args.workers, extractor, device)
                                      for _ in range(args.repeats)), key=lambda r: r["x_realtime_per_worker"])
        results["stage_profile_1_thread"] = profile_stages(shards, cfg, limit=args.profile_utts)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

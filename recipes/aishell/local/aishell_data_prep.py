#!/usr/bin/env python3
"""AISHELL-1 -> Kaldi dirs OUT/{train,dev,test} (wav.scp, text, utt2spk).

    aishell_data_prep.py DATA_AISHELL OUT

DATA_AISHELL is the corpus as distributed (openslr 33): wav/{train,dev,test}/SPEAKER/UTT.wav
and transcript/aishell_transcript_v0.8.txt (`UTT word word ...`). Speaker tarballs still packed
as wav/SPEAKER.tar.gz are extracted first. The transcript's word spaces are removed (units are
characters); utterances without a transcript are left out and counted.
"""
from __future__ import annotations

import sys
import tarfile
from pathlib import Path

SPLITS = ("train", "dev", "test")


def main(root: Path, out: Path) -> None:
    wav_root = root / "wav"
    transcript = root / "transcript" / "aishell_transcript_v0.8.txt"
    if not transcript.is_file() or not wav_root.is_dir():
        sys.exit(f"{root}: expected wav/ and {transcript.relative_to(root)} (the data_aishell directory)")
    for packed in sorted(wav_root.glob("*.tar.gz")):  # as downloaded: one tarball per speaker
        with tarfile.open(packed) as tar:
            tar.extractall(wav_root, filter="data")
        packed.unlink()
    texts = {}
    for line in transcript.read_text(encoding="utf-8").splitlines():
        key, _, words = line.strip().partition(" ")
        if key and words.strip():
            texts[key] = "".join(words.split())
    for split in SPLITS:
        wavs = sorted((wav_root / split).glob("*/*.wav"))
        if not wavs:
            sys.exit(f"{wav_root / split}: no SPEAKER/*.wav files")
        rows = [(w.stem, w.resolve(), w.parent.name) for w in wavs if w.stem in texts]
        d = out / split
        d.mkdir(parents=True, exist_ok=True)
        (d / "wav.scp").write_text("".join(f"{k} {p}\n" for k, p, _ in rows), encoding="utf-8")
        (d / "text").write_text("".join(f"{k} {texts[k]}\n" for k, _, _ in rows), encoding="utf-8")
        (d / "utt2spk").write_text("".join(f"{k} {s}\n" for k, _, s in rows), encoding="utf-8")
        print(f"{split}: {len(rows)} utterances, {len({s for _, _, s in rows})} speakers, "
              f"{len(wavs) - len(rows)} without transcript")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__.strip().splitlines()[2].strip())
    main(Path(sys.argv[1]), Path(sys.argv[2]))

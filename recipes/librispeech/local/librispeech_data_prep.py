#!/usr/bin/env python3
"""LibriSpeech parts -> one Kaldi dir (wav.scp, text, utt2spk).

    librispeech_data_prep.py OUT LIBRISPEECH_ROOT PART [PART ...]

LIBRISPEECH_ROOT holds the parts as distributed (openslr 12), e.g. train-clean-100, dev-clean:
PART/SPEAKER/CHAPTER/SPEAKER-CHAPTER-UTT.flac with PART/SPEAKER/CHAPTER/SPEAKER-CHAPTER.trans.txt
(`SPEAKER-CHAPTER-UTT TRANSCRIPT` lines, upper case). Several parts are merged into OUT (e.g. the
960 h training set). wav.scp holds absolute paths; the FLAC bytes go into the shards unchanged.
"""
from __future__ import annotations

import sys
from pathlib import Path


def main(out: Path, root: Path, parts: list[str]) -> None:
    rows: dict[str, tuple[Path, str, str]] = {}
    for part in parts:
        base = root / part
        trans_files = sorted(base.glob("*/*/*.trans.txt"))
        if not trans_files:
            sys.exit(f"{base}: no SPEAKER/CHAPTER/*.trans.txt (is {root} the LibriSpeech directory?)")
        missing = 0
        for trans in trans_files:
            for line in trans.read_text(encoding="utf-8").splitlines():
                key, _, text = line.strip().partition(" ")
                if not key:
                    continue
                audio = trans.parent / f"{key}.flac"
                if not audio.is_file():
                    missing += 1
                    continue
                rows[key] = (audio.resolve(), " ".join(text.split()), key.split("-")[0])
        print(f"{part}: {len(trans_files)} chapters, {missing} transcripts without audio")
    out.mkdir(parents=True, exist_ok=True)
    keys = sorted(rows)
    (out / "wav.scp").write_text("".join(f"{k} {rows[k][0]}\n" for k in keys), encoding="utf-8")
    (out / "text").write_text("".join(f"{k} {rows[k][1]}\n" for k in keys), encoding="utf-8")
    (out / "utt2spk").write_text("".join(f"{k} {rows[k][2]}\n" for k in keys), encoding="utf-8")
    print(f"{out}: {len(keys)} utterances from {', '.join(parts)}")


if __name__ == "__main__":
    if len(sys.argv) < 4:
        sys.exit(__doc__.strip().splitlines()[2].strip())
    main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:])

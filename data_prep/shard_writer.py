"""`u2moe prep shards`: a Kaldi data directory -> webdataset tar shards + shards.list.

Each utterance becomes tar members sharing its key: `KEY.<ext>` (the original encoded bytes when
the audio is a whole file -- Opus stays Opus, WAV stays WAV; a `segments` cut is stored as FLAC),
`KEY.txt` (the transcript, UTF-8) and `KEY.json` (duration, sample rate, speaker, and the segment
for cuts). Readers need only the audio and .txt members, so WeNet's `make_shard_list.py` shards
(KEY.wav + KEY.txt) read the same way.
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import audio
from .done_marker import PreparedOutput, fingerprint
from .kaldi_dir import Utterance, read_kaldi_dir

logger = logging.getLogger(__name__)

SHARD_LIST = "shards.list"
_MAX_EXAMPLES = 5  # kept in the done-marker
_MAX_LOGGED = 20


@dataclass
class ShardResult:
    path: Path
    utterances: int = 0
    seconds: float = 0.0
    problems: list[tuple[str, str, str]] = field(default_factory=list)  # (key, kind, detail)


class _RecordingCache:
    """The last decoded recording: segments of one recording are consecutive in sorted order."""

    def __init__(self) -> None:
        self._source: str | None = None
        self._decoded: tuple[np.ndarray, int] | None = None

    def get(self, source: str) -> tuple[np.ndarray, int]:
        if source != self._source:
            data = audio.read_source(source)
            info = audio.probe(data)
            # Decode to an integer type wide enough to keep the cut bit-exact in FLAC.
            wide = info.subtype in ("PCM_24", "PCM_32", "FLOAT", "DOUBLE")
            samples, rate, _ = audio.decode(data, dtype="int32" if wide else "int16")
            self._source, self._decoded = source, (samples, rate)
        return self._decoded


def _encode(utt: Utterance, cache: _RecordingCache) -> tuple[str, bytes, dict[str, Any]]:
    """(extension, audio bytes, json metadata) for one utterance; raises audio.AudioError."""
    if utt.segment is None:
        data = audio.read_source(utt.source)
        info = audio.probe(data)
        if info.frames <= 0:
            raise audio.AudioError("no samples")
        ext, rate, frames = audio.extension_for(info), info.samplerate, info.frames
        meta: dict[str, Any] = {}
    else:
        samples, rate = cache.get(utt.source)
        seg = utt.segment
        start = round(seg.start * rate)
        end = len(samples) if seg.end < 0 else min(round(seg.end * rate), len(samples))
        if not 0 <= start < end:
            raise audio.AudioError(f"segment {seg.start}-{seg.end} s is empty or outside the "
                                   f"{len(samples) / rate:.2f} s recording")
        data, ext, frames = audio.encode_flac(samples[start:end], rate), "flac", end - start
        meta = {"recording": seg.recording, "start": seg.start, "end": seg.end}
    meta.update(duration=round(frames / rate, 4), sample_rate=rate)
    if utt.speaker is not None:
        meta["speaker"] = utt.speaker
    return ext, data, meta


def write_shard(path: Path, utterances: list[Utterance]) -> ShardResult:
    """Write one tar shard (atomically, via a .tmp file); unreadable audio is skipped and listed."""
    import webdataset as wds

    result = ShardResult(path)
    cache = _RecordingCache()
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f, wds.TarWriter(f, encoder=False, mtime=0, format="PAX_FORMAT") as tar:
        for utt in utterances:
            try:
                ext, data, meta = _encode(utt, cache)
            except audio.AudioError as err:
                result.problems.append((utt.key, "bad_audio", f"{utt.source}: {err}"))
                continue
            tar.write({"__key__": utt.key, ext: data, "txt": utt.text.encode("utf-8"),
                       "json": json.dumps(meta, ensure_ascii=False).encode("utf-8")})
            result.utterances += 1
            result.seconds += meta["duration"]
    if result.utterances:
        tmp.replace(path)
    else:
        tmp.unlink()
    return result


def write_shards(data_dir: str | Path, out: str | Path, utts_per_shard: int = 1000, jobs: int = 1,
                 overwrite: bool = False) -> dict[str, Any]:
    """Shard a Kaldi data directory; returns (and logs) the summary. Idempotent, see done_marker."""
    if utts_per_shard < 1 or jobs < 1:
        raise ValueError("utts_per_shard and jobs must be >= 1")
    data_dir, out = Path(data_dir), Path(out).resolve()
    kaldi = read_kaldi_dir(data_dir)
    fp = fingerprint({"command": "shards", "utts_per_shard": utts_per_shard}, content_files=kaldi.files)
    target = PreparedOutput(out, owned=("shard-*.tar", "shard-*.tar.tmp", SHARD_LIST))
    done = target.make_room(fp, overwrite)
    if done is not None:
        logger.info("%s is up to date (%s utterances); nothing to do", out, done.get("utterances"))
        return done

    chunks = [kaldi.utterances[i:i + utts_per_shard] for i in range(0, len(kaldi.utterances), utts_per_shard)]
    paths = [out / f"shard-{i:06d}.tar" for i in range(len(chunks))]
    if jobs == 1 or len(chunks) <= 1:
        results = [write_shard(p, c) for p, c in zip(paths, chunks)]
    else:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            results = list(pool.map(write_shard, paths, chunks))

    written = [r.path for r in results if r.utterances]
    (out / SHARD_LIST).write_text("".join(f"{p}\n" for p in written))
    problems = [(k, kind, "") for k, kind in kaldi.problems] + [p for r in results for p in r.problems]
    summary = {
        "utterances": sum(r.utterances for r in results),
        "hours": round(sum(r.seconds for r in results) / 3600, 4),
        "shards": len(written),
        "skipped": dict(Counter(kind for _, kind, _ in problems)),
        "skipped_examples": [list(p) for p in problems[:_MAX_EXAMPLES]],
    }
    target.mark_done(fp, written + [out / SHARD_LIST], summary)
    logger.info("wrote %d utterances (%.3f h) in %d shards to %s; skipped %d %s",
                summary["utterances"], summary["hours"], summary["shards"], out, len(problems),
                summary["skipped"] or "")
    for key, kind, detail in problems[:_MAX_LOGGED]:
        logger.warning("skipped %s: %s %s", key, kind, detail)
    if len(problems) > _MAX_LOGGED:
        logger.warning("... and %d more skipped (counts by kind above)", len(problems) - _MAX_LOGGED)
    return summary

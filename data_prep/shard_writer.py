"""`u2moe prep shards`: a Kaldi data directory -> webdataset tar shards + shards.list.

Each utterance becomes tar members sharing its key: `KEY.<ext>` (the original encoded bytes when
the audio is a whole file -- Opus stays Opus, WAV stays WAV; a `segments` cut is stored as FLAC),
`KEY.txt` (the transcript, UTF-8) and `KEY.json` (duration, sample rate, speaker, and the segment
for cuts). Readers need only the audio and .txt members, so WeNet's `make_shard_list.py` shards
(KEY.wav + KEY.txt) read the same way.

`audio_format="flac"|"wav"` re-encodes every utterance not already in that format (losslessly
from the decoded samples: 16 bit, or 24 bit for wider sources; lossy sources such as Opus are
stored as their decoding rounded to 16 bit). That trades disk for CPU in training: FLAC decodes
faster than Opus, WAV faster still (docs/results.md, "Data loader throughput").
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
from .progress_bar import progress_bar

logger = logging.getLogger(__name__)

SHARD_LIST = "shards.list"
AUDIO_FORMATS = ("keep", "flac", "wav")
_MAX_EXAMPLES = 5  # kept in the done-marker
_MAX_LOGGED = 20


@dataclass
class ShardResult:
    path: Path
    utterances: int = 0
    seconds: float = 0.0
    problems: list[tuple[str, str, str]] = field(default_factory=list)  # (key, kind, detail)
    reencoded: Counter = field(default_factory=Counter)  # source extension -> utterances re-encoded
    audio_bytes: int = 0


class _RecordingCache:
    """The last decoded recording: segments of one recording are consecutive in sorted order."""

    def __init__(self) -> None:
        self._source: str | None = None
        self._decoded: tuple[np.ndarray, int] | None = None

    def get(self, source: str) -> tuple[np.ndarray, int]:
        if source != self._source:
            data = audio.read_source(source)
            self._source, self._decoded = source, _decode_int(data, audio.probe(data))
        return self._decoded


_WIDE = ("PCM_24", "PCM_32", "FLOAT", "DOUBLE")
_LOSSY = ("OPUS", "VORBIS", "MPEG_LAYER_I", "MPEG_LAYER_II", "MPEG_LAYER_III")


def _decode_int(data: bytes, info) -> tuple[np.ndarray, int]:
    """Samples in an integer type wide enough to store them bit-exactly in FLAC/WAV.

    Lossy codecs decode to floats; those are rounded to 16 bit on the reader's scale (x 32768),
    so a reader's float samples of the stored audio are the original decoding within half a step.
    """
    if info.subtype in _LOSSY:
        samples, rate, _ = audio.decode(data, dtype="float32")
        return np.clip(np.rint(samples * 32768.0), -32768, 32767).astype(np.int16), rate
    samples, rate, _ = audio.decode(data, dtype="int32" if info.subtype in _WIDE else "int16")
    return samples, rate


def _encode_as(samples: np.ndarray, rate: int, fmt: str) -> bytes:
    return audio.encode_flac(samples, rate) if fmt == "flac" else audio.encode_wav(samples, rate)


def _encode(utt: Utterance, cache: _RecordingCache, audio_format: str = "keep"
            ) -> tuple[str, bytes, dict[str, Any], str | None]:
    """(extension, audio bytes, json metadata, source extension if re-encoded) for one
    utterance; raises audio.AudioError."""
    reencoded = None
    if utt.segment is None:
        data = audio.read_source(utt.source)
        info = audio.probe(data)
        if info.frames <= 0:
            raise audio.AudioError("no samples")
        ext, rate, frames = audio.extension_for(info), info.samplerate, info.frames
        if audio_format != "keep" and ext != audio_format:
            samples, rate = _decode_int(data, info)
            data, reencoded, ext, frames = _encode_as(samples, rate, audio_format), ext, audio_format, len(samples)
        meta: dict[str, Any] = {}
    else:
        samples, rate = cache.get(utt.source)
        seg = utt.segment
        start = round(seg.start * rate)
        end = len(samples) if seg.end < 0 else min(round(seg.end * rate), len(samples))
        if not 0 <= start < end:
            raise audio.AudioError(f"segment {seg.start}-{seg.end} s is empty or outside the "
                                   f"{len(samples) / rate:.2f} s recording")
        ext = "wav" if audio_format == "wav" else "flac"
        data, frames = _encode_as(samples[start:end], rate, ext), end - start
        meta = {"recording": seg.recording, "start": seg.start, "end": seg.end}
    meta.update(duration=round(frames / rate, 4), sample_rate=rate)
    if utt.speaker is not None:
        meta["speaker"] = utt.speaker
    return ext, data, meta, reencoded


def write_shard(path: Path, utterances: list[Utterance], audio_format: str = "keep") -> ShardResult:
    """Write one tar shard (atomically, via a .tmp file); unreadable audio is skipped and listed."""
    import webdataset as wds

    result = ShardResult(path)
    cache = _RecordingCache()
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f, wds.TarWriter(f, encoder=False, mtime=0, format="PAX_FORMAT") as tar:
        for utt in utterances:
            try:
                ext, data, meta, reencoded = _encode(utt, cache, audio_format)
            except audio.AudioError as err:
                kind = err.kind if isinstance(err, audio.AudioTruncated) else "bad_audio"
                result.problems.append((utt.key, kind, f"{utt.source}: {err}"))
                continue
            tar.write({"__key__": utt.key, ext: data, "txt": utt.text.encode("utf-8"),
                       "json": json.dumps(meta, ensure_ascii=False).encode("utf-8")})
            result.utterances += 1
            result.seconds += meta["duration"]
            result.audio_bytes += len(data)
            if reencoded is not None:
                result.reencoded[reencoded] += 1
    if result.utterances:
        tmp.replace(path)
    else:
        tmp.unlink()
    return result


def write_shards(data_dir: str | Path, out: str | Path, utts_per_shard: int = 1000, jobs: int = 1,
                 overwrite: bool = False, audio_format: str = "keep") -> dict[str, Any]:
    """Shard a Kaldi data directory; returns (and logs) the summary. Idempotent, see done_marker.

    audio_format: "keep" stores whole files' original bytes; "flac"/"wav" re-encode whatever is
    not already in that format (segment cuts are FLAC unless "wav").
    """
    if utts_per_shard < 1 or jobs < 1:
        raise ValueError("utts_per_shard and jobs must be >= 1")
    if audio_format not in AUDIO_FORMATS:
        raise ValueError(f"audio_format must be one of {AUDIO_FORMATS}, not {audio_format!r}")
    data_dir, out = Path(data_dir), Path(out).resolve()
    kaldi = read_kaldi_dir(data_dir)
    options: dict[str, Any] = {"command": "shards", "utts_per_shard": utts_per_shard}
    if audio_format != "keep":  # "keep" fingerprints as before this option existed
        options["audio_format"] = audio_format
    fp = fingerprint(options, content_files=kaldi.files)
    target = PreparedOutput(out, owned=("shard-*.tar", "shard-*.tar.tmp", SHARD_LIST))
    done = target.make_room(fp, overwrite)
    if done is not None:
        logger.info("%s is up to date (%s utterances); nothing to do", out, done.get("utterances"))
        return done

    chunks = [kaldi.utterances[i:i + utts_per_shard] for i in range(0, len(kaldi.utterances), utts_per_shard)]
    paths = [out / f"shard-{i:06d}.tar" for i in range(len(chunks))]
    formats = [audio_format] * len(chunks)
    if jobs == 1 or len(chunks) <= 1:
        results = list(progress_bar(map(write_shard, paths, chunks, formats), "prep shards", len(chunks), "shard"))
    else:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            results = list(progress_bar(pool.map(write_shard, paths, chunks, formats), "prep shards",
                                        len(chunks), "shard"))

    written = [r.path for r in results if r.utterances]
    (out / SHARD_LIST).write_text("".join(f"{p}\n" for p in written))
    problems = [(k, kind, "") for k, kind in kaldi.problems] + [p for r in results for p in r.problems]
    summary = {
        "utterances": sum(r.utterances for r in results),
        "hours": round(sum(r.seconds for r in results) / 3600, 4),
        "shards": len(written),
        "audio_format": audio_format,
        "audio_mb": round(sum(r.audio_bytes for r in results) / 1e6, 2),
        # Source extension -> utterances re-encoded into audio_format (none with "keep").
        "reencoded": dict(sum((r.reencoded for r in results), Counter())),
        "skipped": dict(Counter(kind for _, kind, _ in problems)),
        "skipped_examples": [list(p) for p in problems[:_MAX_EXAMPLES]],
    }
    target.mark_done(fp, written + [out / SHARD_LIST], summary)
    logger.info("wrote %d utterances (%.3f h) in %d shards to %s; audio %s, %.1f MB%s; skipped %d %s",
                summary["utterances"], summary["hours"], summary["shards"], out, audio_format,
                summary["audio_mb"], "".join(f", {n} re-encoded from {ext}" for ext, n in summary["reencoded"].items()),
                len(problems), summary["skipped"] or "")
    for key, kind, detail in problems[:_MAX_LOGGED]:
        logger.warning("skipped %s: %s %s", key, kind, detail)
    if len(problems) > _MAX_LOGGED:
        logger.warning("... and %d more skipped (counts by kind above)", len(problems) - _MAX_LOGGED)
    return summary

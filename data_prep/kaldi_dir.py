"""Reading a Kaldi data directory: wav.scp, text, and optionally segments and utt2spk.

Relative paths in wav.scp are tried against the data directory first, then against its parent:
corpora such as synth-en keep `<split>/wav.scp` with paths relative to the corpus root
(`audio/<split>/<utt>.opus`), while others keep them relative to the data directory itself.
Entries ending in '|' are shell pipes whose stdout is the audio; as in Kaldi they run in the current
working directory.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import DataPrepError


@dataclass(frozen=True)
class Segment:
    recording: str
    start: float  # seconds
    end: float  # seconds; -1 means to the end of the recording, as in Kaldi


@dataclass(frozen=True)
class Utterance:
    key: str
    source: str  # an absolute path, or a shell command ending in '|'
    text: str
    speaker: str | None = None
    segment: Segment | None = None


@dataclass
class KaldiDir:
    utterances: list[Utterance]
    # (key, kind) for entries that cannot become an utterance, e.g. audio without transcript.
    problems: list[tuple[str, str]]
    files: list[Path]  # the list files read, for fingerprinting


def _is_plain_name(key: str) -> bool:
    """Keys become tar member names (and files wherever a shard is unpacked): a path separator or
    a parent reference would let one escape the directory it is unpacked into."""
    return "/" not in key and "\\" not in key and key not in (".", "..")


def _read_table(path: Path, min_fields: int, max_split: int = -1) -> dict[str, list[str]]:
    """key -> remaining fields; duplicate keys, keys that are not plain names and short lines are
    errors naming file:line."""
    table: dict[str, list[str]] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            fields = line.split(maxsplit=max_split) if max_split > 0 else line.split()
            if len(fields) < min_fields:
                raise DataPrepError(f"{path}:{lineno}: expected at least {min_fields} fields, got {line!r}")
            if not _is_plain_name(fields[0]):
                raise DataPrepError(f"{path}:{lineno}: key {fields[0]!r} holds a path separator or parent "
                                    "reference; keys become tar member names")
            if fields[0] in table:
                raise DataPrepError(f"{path}:{lineno}: duplicate key {fields[0]!r}")
            table[fields[0]] = fields[1:]
    return table


def resolve_source(data_dir: Path, entry: str) -> str:
    """An absolute path for a wav.scp entry (see the module docstring), pipes unchanged."""
    if entry.endswith("|"):
        return entry
    path = Path(entry)
    if path.is_absolute():
        return str(path)
    for base in (data_dir, data_dir.parent):
        if (base / path).exists():
            return str((base / path).resolve())
    # Neither exists: keep the data-dir reading so the error message shows a plausible path.
    return str((data_dir / path).resolve())


def read_kaldi_dir(data_dir: str | Path, require_text: bool = True) -> KaldiDir:
    """All utterances of a Kaldi data directory, sorted by key, plus what could not be paired.

    require_text=False (decoding, where a transcript is only a reference to score against): the
    `text` file may be missing or cover only some utterances; the others get an empty text."""
    data_dir = Path(data_dir)
    wav_scp, text_file = data_dir / "wav.scp", data_dir / "text"
    for required in (wav_scp, text_file) if require_text else (wav_scp,):
        if not required.is_file():
            raise DataPrepError(f"{data_dir}: missing {required.name}")
    wavs = {k: v[0] for k, v in _read_table(wav_scp, 2, max_split=1).items()}
    texts: dict[str, str] = {}
    files = [wav_scp]
    if text_file.is_file():
        texts = {k: v[0] if v else "" for k, v in _read_table(text_file, 1, max_split=1).items()}
        files.append(text_file)
    speakers: dict[str, str] = {}
    if (data_dir / "utt2spk").is_file():
        files.append(data_dir / "utt2spk")
        speakers = {k: v[0] for k, v in _read_table(data_dir / "utt2spk", 2).items()}
    segments: dict[str, Segment] | None = None
    if (data_dir / "segments").is_file():
        files.append(data_dir / "segments")
        segments = {}
        for key, fields in _read_table(data_dir / "segments", 4).items():
            try:
                segments[key] = Segment(fields[0], float(fields[1]), float(fields[2]))
            except ValueError:
                raise DataPrepError(f"{data_dir / 'segments'}: bad times for {key!r}: {fields}") from None

    problems: list[tuple[str, str]] = []
    utterances: list[Utterance] = []
    if segments is None:
        audio_keys = wavs
    else:
        audio_keys = segments
        for key, seg in segments.items():
            if seg.recording not in wavs:
                problems.append((key, "recording_not_in_wav_scp"))
    for key in sorted(audio_keys):
        seg = segments[key] if segments is not None else None
        if seg is not None and seg.recording not in wavs:
            continue
        text = texts.get(key, "").strip()
        if require_text and not text:
            problems.append((key, "no_transcript" if key not in texts else "empty_transcript"))
            continue
        source = resolve_source(data_dir, wavs[seg.recording if seg else key])
        utterances.append(Utterance(key, source, text, speakers.get(key), seg))
    for key in sorted(set(texts) - set(audio_keys)):
        problems.append((key, "transcript_without_audio"))
    return KaldiDir(utterances, problems, files)

"""`u2moe transcribe`: audio files, folders or a list on stdin in; text (or JSON with word times) out.

Files are sorted by duration (read from their headers) and decoded in batches of similar length;
results are printed in input order as soon as every earlier file is done. A file that cannot be
read or decoded costs one line on stderr; the others are still transcribed and the exit status
is 1 at the end.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from ..data_prep.progress_bar import progress_bar
from .audio_input import AudioError, duration_of, expand_paths
from .decoding.search import MODES
from .result import Result
from .transcriber import Transcriber, load

# Piece of audio the live view feeds at a time: what an audio callback typically delivers.
STREAM_PIECE_SECONDS = 0.1
# Chunk size of --stream when --chunk-size asks for full context, which a live stream cannot have.
DEFAULT_STREAM_CHUNK = 16


def register_transcribe(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("transcribe", help="transcribe audio files: `path<TAB>text` lines, or JSON with word times")
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="audio files (wav, flac, ogg, opus, mp3, ...; any rate, any channels), folders "
                        "(searched recursively) or - for a list of paths on stdin")
    p.add_argument("--model", required=True, help="model.pt written by `u2moe export`")
    p.add_argument("--format", choices=("text", "json"), default="text",
                   help="text: `path<TAB>text`; json: one object a line with per-word start/end times")
    p.add_argument("--mode", choices=MODES, default="attention_rescoring")
    p.add_argument("--chunk-size", type=int, default=-1, help="> 0: decode chunk by chunk as streaming "
                   f"does, this many encoder frames a chunk; -1: full context (--stream: {DEFAULT_STREAM_CHUNK})")
    p.add_argument("--left-chunks", type=int, default=-1, help="left chunks kept when streaming (-1: all)")
    p.add_argument("--stream", action="store_true", help="feed each file in 100 ms pieces as a live stream "
                   "and print the partial text each time it grows, then the final result")
    p.add_argument("--beam", type=int, default=10)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--batch-size", type=int, default=16, help="files decoded together (of similar duration)")
    p.set_defaults(handler=run_transcribe)


def run_transcribe(args: argparse.Namespace) -> int:
    try:
        asr = load(args.model, device=args.device, dtype=args.dtype, mode=args.mode, chunk_size=args.chunk_size,
                   left_chunks=args.left_chunks, beam=args.beam, batch_size=args.batch_size)
    except ValueError as err:  # the model file, --device or --batch-size: the user's to fix
        _report(f"error: {err}")
        return 2
    paths, problems = expand_paths(args.paths, sys.stdin)
    for problem in problems:
        _report(problem)
    write = _json_line if args.format == "json" else _text_line
    if args.stream:
        chunk = args.chunk_size if args.chunk_size > 0 else DEFAULT_STREAM_CHUNK
        failed = sum(not _stream_file(asr, path, chunk, args.left_chunks, args.format, write) for path in paths)
    else:
        failed = _transcribe_files(asr, paths, write)
    return 1 if failed or problems else 0


def _report(message: str) -> None:
    # tqdm.write keeps a progress bar on the same stream intact.
    tqdm.write(f"u2moe transcribe: {message}", file=sys.stderr)


def _text_line(path: Path, result: Result) -> None:
    print(f"{path}\t{result.text}", flush=True)


def _json_line(path: Path, result: Result) -> None:
    print(json.dumps({"path": str(path), **result.to_dict()}, ensure_ascii=False), flush=True)


def _transcribe_files(asr: Transcriber, paths: list[Path], write: Callable[[Path, Result], None]) -> int:
    """Transcribe and print every file; returns how many failed."""
    done: dict[int, Result | None] = {}  # None: failed, reported
    durations: dict[int, float] = {}
    for i, path in enumerate(paths):
        try:
            durations[i] = duration_of(path)
        except AudioError as err:
            _report(f"{path}: {err}")
            done[i] = None
    order = sorted(durations, key=durations.__getitem__)
    bar = progress_bar(None, "transcribe", total=len(paths), unit="file") if len(paths) > 1 else None
    printed = 0
    for start in range(0, len(order), asr.batch_size):
        batch, waves = [], []
        for i in order[start:start + asr.batch_size]:
            try:
                waves.append(asr.waveform(paths[i]))
                batch.append(i)
            except AudioError as err:
                _report(f"{paths[i]}: {err}")
                done[i] = None
        done.update(zip(batch, asr.transcribe_waveforms(waves)))
        while printed in done:
            if done[printed] is not None:
                write(paths[printed], done[printed])
            printed += 1
        if bar is not None:
            bar.n = len(done)
            bar.refresh()
    if bar is not None:
        bar.close()
    return sum(r is None for r in done.values())


def _stream_file(asr: Transcriber, path: Path, chunk_size: int, left_chunks: int, fmt: str,
                 write: Callable[[Path, Result], None]) -> bool:
    """Feed one file to a live stream, printing each grown partial text; False if unreadable."""
    try:
        wave = asr.waveform(path)
    except AudioError as err:
        _report(f"{path}: {err}")
        return False
    stream = asr.stream(chunk_size, left_chunks)
    shown = ""
    for piece in wave.split(int(STREAM_PIECE_SECONDS * asr.sample_rate)):
        partial = stream.accept(piece)
        if partial != shown:
            shown = partial
            print(json.dumps({"path": str(path), "partial": partial}, ensure_ascii=False) if fmt == "json"
                  else f"{path}\tpartial\t{partial}", flush=True)
    write(path, stream.finish())
    return True

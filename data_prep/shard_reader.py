"""Streaming a webdataset tar shard as utterance groups, surviving damage.

Members are grouped by key as webdataset does for consecutive members, except that the key is
everything before the *last* dot (WeNet's convention), so utterance ids may contain dots. The
stream is opened with webdataset's gopen, so local paths, `pipe:cmd` and http(s) URLs all work.
Nothing here raises on bad data: an unopenable shard or a corrupt/truncated tar is recorded in
DataStats with the shard and key, and the epoch goes on with the next shard.
"""
from __future__ import annotations

import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field

from .sharding import ShardPart
from .stats import DataStats

# What a damaged stream can throw while tarfile reads it (gzip/bz2 members included).
_STREAM_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error, ValueError)


@dataclass
class RawUtterance:
    shard: str
    key: str
    members: dict[str, bytes] = field(default_factory=dict)  # extension -> bytes


def read_shard(url: str, stats: DataStats) -> Iterator[RawUtterance]:
    """Yield the shard's member groups in order; damage ends the shard and is recorded."""
    import webdataset as wds

    try:
        stream = wds.gopen(url, "rb")
    except Exception as err:  # noqa: BLE001 - any scheme handler may fail in its own way
        stats.record("shard_unreadable", url, None, f"{type(err).__name__}: {err}")
        return
    current: RawUtterance | None = None
    damaged = False
    try:
        try:
            tar = tarfile.open(fileobj=stream, mode="r|*")
        except _STREAM_ERRORS as err:
            damaged = True
            stats.record("shard_unreadable", url, None, f"not a tar archive ({err})")
            return
        for member in tar:
            if not member.isreg():
                continue
            key, dot, ext = member.name.rpartition(".")
            if not dot:
                key, ext = member.name, ""
            if current is None or key != current.key:
                if current is not None:
                    yield current
                current = RawUtterance(url, key)
            current.members[ext] = tar.extractfile(member).read()
        if current is not None:
            yield current
    except _STREAM_ERRORS as err:
        # The group in progress may lack members that were lost; drop it with the rest.
        damaged = True
        stats.record("tar_corrupt", url, current.key if current else None, f"{type(err).__name__}: {err}")
    finally:
        try:
            stream.close()
        except OSError as err:
            # A failed `pipe:` command reports its exit status here; count the shard once.
            if not damaged:
                stats.record("shard_unreadable", url, None, f"on close: {err}")


def read_shard_part(piece: ShardPart, stats: DataStats) -> Iterator[RawUtterance]:
    """The member groups of a shard's part. Every rank sharing a shard reads all of it, so damage
    to the shard itself is counted by the reader of part 0 only."""
    shard_stats = stats if piece.part == 0 else DataStats()
    for i, raw in enumerate(read_shard(piece.url, shard_stats)):
        if i % piece.parts == piece.part:
            yield raw

"""The step watchdog: a stalled or dead rank ends every rank within a bounded time.

Ranks train in lock-step, so when one stops (SIGSTOP, a hung device or file system, a lost node)
the others wait in their next collective, silently, until the process group's timeout. Here each
rank's watchdog thread writes a heartbeat file every few seconds: a beat counter (which stops
when the whole process stops or dies) and how long its training has made no progress. When its
own rank has made no progress for `timeout` seconds, it names the rank that stopped -- one whose
heartbeat no longer changes, else the one idle the longest (hung while its threads live) -- in
one line, and ends its process; the launcher (torchrun, deepspeed, srun) then ends the others.

Files in the run directory (which every rank writes its checkpoints to anyway), not the
process group's store: rank 0 serves that store and may be the rank that stopped. Only
durations cross processes, measured on each process's own monotonic clock, so clock skew between
hosts does not matter.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from types import TracebackType

logger = logging.getLogger("u2moe.train")

# The exit status of a process the watchdog ends (distinct from a user error's 2).
EXIT_STATUS = 3
_BEATS_PER_TIMEOUT = 5
_MAX_INTERVAL = 5.0  # seconds between heartbeats


class StepWatchdog:
    """Context manager around training; `beat(step)` marks progress (a step, an evaluation batch)."""

    def __init__(self, directory: Path, rank: int, world_size: int, timeout: float,
                 end_process: Callable[[int], None] = os._exit):
        self.directory, self.rank, self.world_size, self.timeout = directory, rank, world_size, timeout
        self.interval = min(timeout / _BEATS_PER_TIMEOUT, _MAX_INTERVAL)
        self._end_process = end_process
        self._progress = time.monotonic()
        self._step = 0
        self._beats = 0
        # Per peer: (its last beat counter, our monotonic time when that counter last changed).
        self._seen: dict[int, tuple[int | None, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="u2moe-step-watchdog", daemon=True)

    def beat(self, step: int) -> None:
        """Training made progress (called from the training thread; two assignments)."""
        self._step = step
        self._progress = time.monotonic()

    def __enter__(self) -> StepWatchdog:
        self.directory.mkdir(parents=True, exist_ok=True)
        now = time.monotonic()
        self._progress = now
        self._seen = {r: (None, now) for r in range(self.world_size) if r != self.rank}
        self._write(now)
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()

    def _path(self, rank: int) -> Path:
        return self.directory / f"rank{rank}.json"

    def _record(self, now: float) -> dict:
        return {"beats": self._beats, "step": self._step, "idle": now - self._progress,
                "pid": os.getpid(), "host": socket.gethostname()}

    def _write(self, now: float) -> None:
        self._beats += 1
        tmp = self._path(self.rank).with_suffix(".tmp")
        tmp.write_text(json.dumps(self._record(now)))
        os.replace(tmp, self._path(self.rank))

    def _read(self, rank: int) -> dict | None:
        try:
            return json.loads(self._path(rank).read_text())
        except (OSError, ValueError):  # not written yet
            return None

    def _observe(self, now: float) -> dict[int, dict | None]:
        peers = {r: self._read(r) for r in self._seen}
        for r, record in peers.items():
            beats = record["beats"] if record else None
            if beats != self._seen[r][0]:
                self._seen[r] = (beats, now)
        return peers

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            now = time.monotonic()
            self._write(now)
            peers = self._observe(now)
            if now - self._progress > self.timeout:
                self._fire(now, peers)
                return

    def _fire(self, now: float, peers: dict[int, dict | None]) -> None:
        idle = now - self._progress
        # A live peer beats every interval: one silent for half the timeout has stopped or died.
        stopped = sorted(r for r, (_, changed) in self._seen.items() if now - changed > self.timeout / 2)
        if stopped:
            culprit = ", ".join(f"rank {r} ({_where(peers[r])}, no heartbeat for {now - self._seen[r][1]:.0f} s)"
                                for r in stopped)
            what = "stopped or died"
        else:
            # A peer's idle time as of its last heartbeat, plus the time since that heartbeat.
            records = {r: {**p, "idle": p["idle"] + now - self._seen[r][1]} for r, p in peers.items() if p}
            records[self.rank] = self._record(now)
            r = max(records, key=lambda r: records[r]["idle"])
            culprit = f"rank {r} ({_where(records[r])}, no progress for {records[r]['idle']:.0f} s)"
            what = "is hung"
        logger.error("watchdog: rank %d made no training progress for %.0f s after step %d "
                     "(train.watchdog_seconds=%g): %s %s; ending this process", self.rank, idle, self._step,
                     self.timeout, culprit, what)
        for handler in logging.getLogger().handlers:
            handler.flush()
        self._end_process(EXIT_STATUS)


def _where(record: dict | None) -> str:
    if record is None:
        return "never wrote a heartbeat"
    return f"pid {record['pid']} on {record['host']}, last at step {record['step']}"


def process_group_timeout(watchdog_seconds: float) -> timedelta:
    """The process group's own timeout on a collective: a backstop past the watchdog's, which
    names the stopped rank and so should end the processes first."""
    return timedelta(seconds=2 * watchdog_seconds + 60)

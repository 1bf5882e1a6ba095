"""Rank 0's log lines, also in the run directory's train.log (appended to on resume).

The lines logged before the start-up checks pass are held in memory and written only once they
have passed, so that a refused start leaves the run directory as it was.
"""
from __future__ import annotations

import logging
from pathlib import Path

LOG_FILE = "train.log"


class RunLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.held: list[logging.LogRecord] = []
        self.file: logging.FileHandler | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.file is None:
            self.held.append(record)
        else:
            self.file.emit(record)

    def open(self, run_dir: Path) -> None:
        """Write the held lines to run_dir/train.log, and every later line as it comes."""
        self.file = logging.FileHandler(run_dir / LOG_FILE, encoding="utf-8")
        self.file.setFormatter(self.formatter)
        for record in self.held:
            self.file.emit(record)
        self.held.clear()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        super().close()

"""Progress bars of the commands that run for minutes, on stderr: stdout keeps only a command's
results (JSON, WER lines) for scripts to read."""
from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

from tqdm import tqdm


def progress_bar(iterable: Iterable[Any] | None, desc: str, total: int | None = None, unit: str = "it") -> tqdm:
    """tqdm over `iterable` (None: advanced by hand with update()); at most one refresh a second,
    so that a log file that stderr goes to stays small."""
    return tqdm(iterable, desc=desc, total=total, unit=unit, file=sys.stderr, mininterval=1.0, dynamic_ncols=True)

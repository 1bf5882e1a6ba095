"""Idempotent preparation: a done-marker records what a finished run was made from.

Each `u2moe prep` command fingerprints its inputs (content hash of the small list/text files,
size and mtime of large ones such as shards) together with its options. On success it writes a
marker holding the fingerprint, the outputs with their sizes, and the run's summary. A later run
with the same fingerprint whose outputs are all still there returns at once; anything else in a
non-empty output is refused unless --overwrite is given, which first removes what this command
owns (never other files). The marker is written last, so an interrupted run never looks finished.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import DataPrepError

logger = logging.getLogger(__name__)


def fingerprint(options: dict[str, Any], content_files: list[Path] = (), stat_files: list[Path] = ()) -> str:
    """sha256 over the options, the content of small files and the size/mtime of large ones."""
    h = hashlib.sha256(json.dumps(options, sort_keys=True, default=str).encode())
    for path in content_files:
        h.update(str(Path(path).resolve()).encode())
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    for path in stat_files:
        st = Path(path).stat()
        h.update(f"{Path(path).resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


@dataclass(frozen=True)
class PreparedOutput:
    """An output directory (marker inside it) or a single output file (marker beside it)."""

    path: Path
    owned: tuple[str, ...]  # glob patterns, relative to the directory, of what the command writes
    is_dir: bool = True

    @property
    def marker(self) -> Path:
        return self.path / ".done.json" if self.is_dir else self.path.with_name(self.path.name + ".done.json")

    def _owned_files(self) -> list[Path]:
        if not self.is_dir:
            return [p for p in (self.path, self.marker) if p.exists()]
        return [p for pattern in self.owned + (self.marker.name,) for p in sorted(self.path.glob(pattern))]

    def finished(self, fp: str) -> dict[str, Any] | None:
        """The recorded summary if a finished run from the same fingerprint is intact, else None."""
        try:
            marker = json.loads(self.marker.read_text())
        except (OSError, ValueError):
            return None
        if marker.get("fingerprint") != fp:
            return None
        for name, size in marker.get("outputs", {}).items():
            path = self.path / name if self.is_dir else self.path.parent / name
            if not path.is_file() or path.stat().st_size != size:
                return None
        return marker.get("summary", {})

    def make_room(self, fp: str, overwrite: bool) -> dict[str, Any] | None:
        """Return the old summary when already finished; else clear the way or refuse."""
        done = self.finished(fp)
        if done is not None:
            return done
        occupied = (self.path.is_dir() and any(self.path.iterdir())) if self.is_dir else self.path.exists()
        if occupied and not overwrite:
            why = "was made from other inputs or options" if self.marker.exists() else "is not empty"
            raise DataPrepError(f"{self.path} {why}; pass --overwrite to replace it")
        for path in self._owned_files():
            path.unlink()
        (self.path if self.is_dir else self.path.parent).mkdir(parents=True, exist_ok=True)
        return None

    def mark_done(self, fp: str, outputs: list[Path], summary: dict[str, Any]) -> None:
        base = self.path if self.is_dir else self.path.parent
        record = {
            "fingerprint": fp,
            "outputs": {str(p.relative_to(base)): p.stat().st_size for p in outputs},
            "summary": summary,
        }
        tmp = self.marker.with_name(self.marker.name + ".tmp")
        tmp.write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n")
        tmp.replace(self.marker)

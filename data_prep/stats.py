"""Accounting of bad or adjusted input: what was skipped or fixed, where, and how often.

Training must never stop on one bad utterance, but silently dropping data hides real problems.
Every stage records here instead; the worker ships its counts to the main process through the
batch stream (see pipeline.py), where they are merged into one per-epoch summary.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

# Skipped: the utterance (or the rest of a shard) is lost.
SKIP_KINDS = (
    "shard_unreadable",      # the shard cannot be opened at all, or is not a tar archive
    "tar_corrupt",           # truncated or corrupt tar: the member in progress and the rest of the shard
    "missing_audio",         # a group of tar members without an audio member
    "missing_transcript",    # ... without a .txt member
    "empty_transcript",
    "bad_transcript",        # not UTF-8
    "audio_undecodable",
    "audio_truncated",       # shorter than its container declares, or its decoder failed part way
    "too_short",             # length / token filters from FilterConfig
    "too_long",
    "too_few_tokens",
    "too_many_tokens",
)
# Handled: the utterance is kept after a fix.
HANDLED_KINDS = (
    "unknown_units",         # transcript units outside the table, mapped to <unk>
    "resampled",             # sample rate differed from the configured one
    "multichannel",          # first channel kept, as Kaldi does
)
# How many (shard, key, detail) examples are kept per kind; the counts are always exact.
MAX_EXAMPLES = 5
# Skips that are routine data selection rather than data damage are logged at DEBUG only.
_ROUTINE = {"too_short", "too_long", "too_few_tokens", "too_many_tokens"}


@dataclass
class DataStats:
    """Counts of delivered, skipped and adjusted utterances; mergeable across workers and ranks."""

    utterances: int = 0
    audio_seconds: float = 0.0
    batches: int = 0
    unknown_unit_count: int = 0  # total units mapped to <unk> (utterances are counted under unknown_units)
    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[tuple[str, str, str]]] = field(default_factory=dict)

    def record(self, kind: str, shard: str, key: str | None, detail: str = "") -> None:
        """Count one skipped or handled case and log it with its shard and key."""
        if kind not in SKIP_KINDS and kind not in HANDLED_KINDS:
            raise ValueError(f"unknown data stats kind {kind!r}")
        self.counts[kind] += 1
        where = f"{shard} [{key}]" if key else shard
        level = logging.DEBUG if kind in _ROUTINE or kind in HANDLED_KINDS else logging.WARNING
        action = "handled" if kind in HANDLED_KINDS else "skipped"
        logger.log(level, "%s %s: %s%s", action, kind, where, f": {detail}" if detail else "")
        kept = self.examples.setdefault(kind, [])
        if len(kept) < MAX_EXAMPLES:
            kept.append((shard, key or "", detail))

    @property
    def skipped(self) -> int:
        return sum(n for kind, n in self.counts.items() if kind in SKIP_KINDS)

    def merge(self, other: "DataStats") -> None:
        self.utterances += other.utterances
        self.audio_seconds += other.audio_seconds
        self.batches += other.batches
        self.unknown_unit_count += other.unknown_unit_count
        self.counts.update(other.counts)
        for kind, items in other.examples.items():
            kept = self.examples.setdefault(kind, [])
            kept.extend(items[: MAX_EXAMPLES - len(kept)])

    def take(self) -> "DataStats":
        """Return the counts so far and start afresh (a worker ships deltas, never totals)."""
        delta = DataStats(self.utterances, self.audio_seconds, self.batches, self.unknown_unit_count,
                          self.counts, self.examples)
        self.__init__()
        return delta

    def to_dict(self) -> dict[str, Any]:
        """Plain types only, for torch.distributed.all_gather_object or a JSON log."""
        return {
            "utterances": self.utterances,
            "audio_seconds": self.audio_seconds,
            "batches": self.batches,
            "unknown_unit_count": self.unknown_unit_count,
            "counts": dict(self.counts),
            "examples": {k: [list(e) for e in v] for k, v in self.examples.items()},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DataStats":
        return cls(d["utterances"], d["audio_seconds"], d["batches"], d["unknown_unit_count"],
                   Counter(d["counts"]), {k: [tuple(e) for e in v] for k, v in d["examples"].items()})

    def summary(self, title: str = "data") -> str:
        """Multi-line human summary: totals, then each kind with its count and examples."""
        # Statistics passes (cmvn) read utterances without batching them.
        batches = f" in {self.batches} batches" if self.batches else ""
        lines = [f"{title}: {self.utterances} utterances ({self.audio_seconds / 3600:.3f} h)"
                 f"{batches}; skipped {self.skipped}"]
        for kind in SKIP_KINDS + HANDLED_KINDS:
            if self.counts.get(kind):
                extra = f" ({self.unknown_unit_count} units)" if kind == "unknown_units" else ""
                action = "handled" if kind in HANDLED_KINDS else "skipped"
                lines.append(f"  {action} {kind}: {self.counts[kind]}{extra}")
                for shard, key, detail in self.examples.get(kind, []):
                    lines.append(f"    e.g. {shard} [{key}] {detail}".rstrip())
        return "\n".join(lines)

"""Error rates of hypotheses against references, with jiwer (rapidfuzz-backed edit distances).

CER counts every character, spaces included, as jiwer does; WER splits on whitespace.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class ErrorRate:
    rate: float
    substitutions: int
    deletions: int
    insertions: int
    reference_length: int


@dataclass
class Score:
    utterances: int
    cer: ErrorRate
    wer: ErrorRate

    def to_dict(self) -> dict:
        return asdict(self)

    def line(self, mode: str) -> str:
        def part(name: str, e: ErrorRate) -> str:
            return (f"{name} {100 * e.rate:.2f}% (S {e.substitutions} D {e.deletions} I {e.insertions} "
                    f"/ N {e.reference_length})")

        return f"{mode}: {part('CER', self.cer)}  {part('WER', self.wer)}  utts {self.utterances}"


def score(references: list[str], hypotheses: list[str]) -> Score:
    """Corpus-level CER and WER; references must be non-empty."""
    import jiwer

    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    if not references:
        zero = ErrorRate(0.0, 0, 0, 0, 0)
        return Score(0, zero, zero)
    chars = jiwer.process_characters(references, hypotheses)
    words = jiwer.process_words(references, hypotheses)

    def rate(out, value: float) -> ErrorRate:
        n = out.hits + out.substitutions + out.deletions
        return ErrorRate(value, out.substitutions, out.deletions, out.insertions, n)

    return Score(len(references), rate(chars, chars.cer), rate(words, words.wer))

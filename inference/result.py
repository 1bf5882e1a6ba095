"""What transcribing one recording gives: its text, its words with times, and the mode used."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..data_prep.tokenizer import Tokenizer
from .word_times import Word, ctc_alignment, word_times


@dataclass(frozen=True)
class Result:
    text: str
    # Empty when the CTC cannot align the hypothesis (more units than encoder frames allow).
    words: list[Word]
    mode: str
    duration: float  # seconds of audio

    def to_dict(self) -> dict:
        """JSON-ready, with times rounded to milliseconds."""
        out = asdict(self)
        out["words"] = [{"word": w.word, "start": round(w.start, 3), "end": round(w.end, 3)} for w in self.words]
        out["duration"] = round(self.duration, 3)
        return out


class ResultMaker:
    """Unit ids and the CTC posteriors they were decoded from -> Result."""

    def __init__(self, units: list[str], frame_seconds: float):
        self.units = units
        self.tokenizer = Tokenizer("char", units)  # units are fixed; decoding only joins them
        self.frame_seconds = frame_seconds

    def __call__(self, ids: list[int], log_probs: torch.Tensor, duration: float, mode: str) -> Result:
        """log_probs [T, V]: the utterance's valid encoder frames."""
        tok = self.tokenizer
        ids = [i for i in ids if i not in (tok.blank_id, tok.sos_eos_id)]
        spans = ctc_alignment(log_probs, ids, tok.blank_id)
        words = [] if spans is None else word_times(self.units, ids, spans, self.frame_seconds, duration)
        return Result(tok.decode(ids), words, mode, duration)

"""Word start and end times from the CTC alignment of a hypothesis.

Any hypothesis (whichever mode produced it) is force-aligned to the CTC posteriors with the
Viterbi path over the blank-interleaved unit sequence, the standard CTC topology: each unit gets
the encoder frames its path emits it on. A word spans its units, from the first frame of its
first unit to the end of the last frame of its last unit; words are split where a unit holds the
word-boundary mark, as the tokenizer's decoding joins them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data_prep.tokenizer import SPACE


@dataclass(frozen=True)
class Word:
    word: str
    start: float  # seconds from the start of the audio
    end: float


def ctc_alignment(log_probs: torch.Tensor, ids: list[int], blank: int) -> list[tuple[int, int]] | None:
    """log_probs [T, V] -> (first, last) frame of each unit of `ids` on the best CTC path; None
    when no path exists (more units, counting the blanks repeats need, than frames)."""
    if not ids:
        return []
    log_probs = log_probs.float().cpu()
    frames, states = log_probs.size(0), 2 * len(ids) + 1
    ext = torch.full((states,), blank, dtype=torch.long)
    ext[1::2] = torch.tensor(ids)
    emit = log_probs[:, ext]  # [T, S]
    # A unit may follow the unit before it without a blank in between unless they are equal.
    can_skip = torch.zeros(states, dtype=torch.bool)
    can_skip[2:] = (ext[2:] != blank) & (ext[2:] != ext[:-2])
    neg = torch.tensor([float("-inf")])
    score = torch.full((states,), float("-inf"))
    score[:2] = emit[0, :2]
    back = torch.zeros(frames, states, dtype=torch.long)  # 0: stay, 1: from s-1, 2: from s-2
    for t in range(1, frames):
        from_prev = torch.cat([neg, score[:-1]])
        from_skip = torch.cat([neg, neg, score[:-2]]).masked_fill(~can_skip, float("-inf"))
        score, back[t] = torch.stack([score, from_prev, from_skip]).max(dim=0)
        score = score + emit[t]
    state = states - 1 if states == 1 or score[-1] >= score[-2] else states - 2
    if score[state] == float("-inf"):
        return None
    spans: list[list[int]] = [[-1, -1] for _ in ids]
    for t in range(frames - 1, -1, -1):
        if state % 2:
            span = spans[state // 2]
            span[0] = t
            span[1] = t if span[1] < 0 else span[1]
        state -= int(back[t, state])
    return [(first, last) for first, last in spans]


def word_times(units: list[str], ids: list[int], spans: list[tuple[int, int]], frame_seconds: float,
               duration: float) -> list[Word]:
    """Words of the hypothesis `ids` with times from its unit spans (ctc_alignment); ends are
    clipped to the audio's duration."""
    words: list[Word] = []
    chars: list[str] = []
    first = last = 0

    def close() -> None:
        if chars:
            words.append(Word("".join(chars), first * frame_seconds, min((last + 1) * frame_seconds, duration)))
            chars.clear()

    for unit, (start, end) in zip(ids, spans):
        for char in units[unit]:
            if char == SPACE:
                close()
                continue
            if not chars:
                first = start
            chars.append(char)
            last = end
    close()
    return words

"""CTC prefix beam search, resumable frame by frame so that streaming can feed it chunk by chunk.

Each prefix keeps two log probabilities: paths ending in blank (pb) and in its last unit (pnb);
a repeated unit extends the prefix only after a blank. Per frame only the `beam` most likely
units are expanded, and the `beam` best prefixes survive (WeNet's algorithm).
"""
from __future__ import annotations

import heapq
import math

import torch

_NEG_INF = -float("inf")


def _logaddexp(a: float, b: float) -> float:
    """log(exp(a) + exp(b)) on Python floats: the search calls it about 2 * beam^2 times a frame,
    so it is written for two arguments, without building a sequence."""
    if a < b:
        a, b = b, a
    if b == _NEG_INF:
        return a
    return a + math.log1p(math.exp(b - a))


class CtcPrefixBeamSearch:
    def __init__(self, beam: int, blank_id: int = 0):
        if beam < 1:
            raise ValueError(f"beam must be >= 1, got {beam}")
        self.beam = beam
        self.blank_id = blank_id
        self.reset()

    def reset(self) -> None:
        self.prefixes: dict[tuple[int, ...], tuple[float, float]] = {(): (0.0, _NEG_INF)}

    def step(self, log_probs: torch.Tensor) -> None:
        """Consume frames log_probs [T, V] (one utterance)."""
        if log_probs.size(0) == 0:
            return
        self.step_top_units(*_top_units(log_probs, self.beam))

    def step_top_units(self, top_lp: list[list[float]], top_ids: list[list[int]]) -> None:
        """Consume frames given as each frame's `beam` best units (log probability, id), best first."""
        for lps, ids in zip(top_lp, top_ids):
            self._frame(lps, ids)

    def _frame(self, lps: list[float], ids: list[int]) -> None:
        # Candidates are the beam's own prefixes (reached through blank, a repeat, or extension
        # of their parent when it is in the beam too) and new prefixes: one beam prefix plus one
        # unit. A new prefix has exactly one path into it, so its score is known at once; it is
        # only built as a tuple if it survives. Ties keep the order in which candidates are first
        # reached (units outer, beam prefixes inner), as a stable sort of one dict of all would.
        beam = list(self.prefixes.items())
        index = {prefix: i for i, (prefix, _) in enumerate(beam)}
        child: dict[tuple[int, int], int] = {}  # (parent's index, unit) -> the child's index
        for j, (prefix, _) in enumerate(beam):
            parent = index.get(prefix[:-1]) if prefix else None
            if parent is not None:
                child[(parent, prefix[-1])] = j
        totals = [_logaddexp(pb, pnb) for _, (pb, pnb) in beam]
        kept: dict[int, list[float]] = {}  # beam index -> [pb, pnb, first reached]
        fresh: list[tuple[float, int, int, int]] = []  # (score, first reached, parent index, unit)
        order = 0

        def reach(j: int, which: int, logp: float) -> None:
            nonlocal order
            s = kept.get(j)
            if s is None:
                kept[j] = s = [_NEG_INF, _NEG_INF, order]
                order += 1
            s[which] = _logaddexp(s[which], logp)

        for unit, lp in zip(ids, lps):
            for i, (prefix, (pb, pnb)) in enumerate(beam):
                if unit == self.blank_id:
                    reach(i, 0, totals[i] + lp)
                    continue
                if prefix and unit == prefix[-1]:
                    reach(i, 1, pnb + lp)  # the repeat collapses onto the same prefix
                    logp = pb + lp  # a blank in between makes it a new unit
                else:
                    logp = totals[i] + lp
                j = child.get((i, unit))
                if j is not None:
                    reach(j, 1, logp)
                else:
                    fresh.append((logp, order, i, unit))
                    order += 1
        candidates = [(_logaddexp(pb, pnb), first, j, -1) for j, (pb, pnb, first) in kept.items()]
        candidates += fresh
        # A repeat after a prefix that has no blank-ending path gives an impossible prefix.
        best = heapq.nsmallest(self.beam, ((-score, first, i, unit) for score, first, i, unit in candidates
                                           if score > _NEG_INF))
        self.prefixes = {}
        for neg_score, _, i, unit in best:
            if unit < 0:
                pb, pnb, _ = kept[i]
                self.prefixes[beam[i][0]] = (pb, pnb)
            else:
                self.prefixes[beam[i][0] + (unit,)] = (_NEG_INF, -neg_score)

    def nbest(self) -> list[tuple[list[int], float]]:
        """(unit ids, CTC log probability) of the surviving prefixes, best first."""
        scored = [(list(p), _logaddexp(pb, pnb)) for p, (pb, pnb) in self.prefixes.items()]
        return sorted(scored, key=lambda h: h[1], reverse=True)


def ctc_prefix_beam_search(log_probs: torch.Tensor, lengths: torch.Tensor, beam: int,
                           blank_id: int = 0) -> list[list[tuple[list[int], float]]]:
    """log_probs [B, T, V], lengths [B] -> each utterance's n-best (ids, CTC score), best first."""
    # One top-k and one copy to the host for the whole batch (on a GPU: one sync, not one each).
    top_lp, top_ids = _top_units(log_probs, beam)
    results = []
    for lps, ids, n in zip(top_lp, top_ids, lengths.tolist()):
        search = CtcPrefixBeamSearch(beam, blank_id)
        search.step_top_units(lps[:n], ids[:n])
        results.append(search.nbest())
    return results


def _top_units(log_probs: torch.Tensor, beam: int) -> tuple[list, list]:
    """The `beam` most likely units of each frame of log_probs [..., V], as host lists."""
    top_lp, top_ids = log_probs.float().topk(min(beam, log_probs.size(-1)), dim=-1)
    return top_lp.cpu().tolist(), top_ids.cpu().tolist()

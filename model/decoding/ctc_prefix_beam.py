"""CTC prefix beam search, resumable frame by frame so that streaming can feed it chunk by chunk.

Each prefix keeps two log probabilities: paths ending in blank (pb) and in its last unit (pnb);
a repeated unit extends the prefix only after a blank. Per frame only the `beam` most likely
units are expanded, and the `beam` best prefixes survive (WeNet's algorithm).
"""
from __future__ import annotations

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
        top_lp, top_ids = log_probs.float().topk(min(self.beam, log_probs.size(1)), dim=-1)
        for lps, ids in zip(top_lp.cpu().tolist(), top_ids.cpu().tolist()):
            self._frame(lps, ids)

    def _frame(self, lps: list[float], ids: list[int]) -> None:
        nxt: dict[tuple[int, ...], list[float]] = {}

        def add(prefix: tuple[int, ...], which: int, logp: float) -> None:
            s = nxt.get(prefix)
            if s is None:
                nxt[prefix] = [logp, _NEG_INF] if which == 0 else [_NEG_INF, logp]
            else:
                s[which] = _logaddexp(s[which], logp)

        # Each prefix's total (blank- plus unit-ending paths), once per frame, not once per unit.
        prefixes = [(prefix, pb, pnb, _logaddexp(pb, pnb)) for prefix, (pb, pnb) in self.prefixes.items()]
        for unit, lp in zip(ids, lps):
            for prefix, pb, pnb, total in prefixes:
                if unit == self.blank_id:
                    add(prefix, 0, total + lp)
                elif prefix and unit == prefix[-1]:
                    add(prefix, 1, pnb + lp)  # the repeat collapses onto the same prefix
                    add(prefix + (unit,), 1, pb + lp)  # a blank in between makes it a new unit
                else:
                    add(prefix + (unit,), 1, total + lp)
        scored = [(_logaddexp(pb, pnb), prefix, (pb, pnb)) for prefix, (pb, pnb) in nxt.items()]
        # A repeat after a prefix that has no blank-ending path creates an impossible prefix.
        scored = sorted((s for s in scored if s[0] > _NEG_INF), key=lambda s: s[0], reverse=True)
        self.prefixes = {prefix: probs for _, prefix, probs in scored[:self.beam]}

    def nbest(self) -> list[tuple[list[int], float]]:
        """(unit ids, CTC log probability) of the surviving prefixes, best first."""
        scored = [(list(p), _logaddexp(pb, pnb)) for p, (pb, pnb) in self.prefixes.items()]
        return sorted(scored, key=lambda h: h[1], reverse=True)


def ctc_prefix_beam_search(log_probs: torch.Tensor, lengths: torch.Tensor, beam: int,
                           blank_id: int = 0) -> list[list[tuple[list[int], float]]]:
    """log_probs [B, T, V], lengths [B] -> each utterance's n-best (ids, CTC score), best first."""
    results = []
    for lp, n in zip(log_probs, lengths.tolist()):
        search = CtcPrefixBeamSearch(beam, blank_id)
        search.step(lp[:n])
        results.append(search.nbest())
    return results

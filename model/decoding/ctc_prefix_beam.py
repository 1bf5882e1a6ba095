"""CTC prefix beam search, resumable frame by frame so that streaming can feed it chunk by chunk.

Each prefix keeps two log probabilities: paths ending in blank (pb) and in its last unit (pnb);
a repeated unit extends the prefix only after a blank. Per frame only the `beam` most likely
units are expanded, and the `beam` best prefixes survive (WeNet's algorithm).
"""
from __future__ import annotations

import math

import torch

_NEG_INF = -float("inf")


def _logaddexp(*xs: float) -> float:
    top = max(xs)
    if top == _NEG_INF:
        return _NEG_INF
    return top + math.log(sum(math.exp(x - top) for x in xs))


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

        def slot(prefix: tuple[int, ...]) -> list[float]:
            return nxt.setdefault(prefix, [_NEG_INF, _NEG_INF])

        for unit, lp in zip(ids, lps):
            for prefix, (pb, pnb) in self.prefixes.items():
                if unit == self.blank_id:
                    s = slot(prefix)
                    s[0] = _logaddexp(s[0], pb + lp, pnb + lp)
                elif prefix and unit == prefix[-1]:
                    s = slot(prefix)  # the repeat collapses onto the same prefix
                    s[1] = _logaddexp(s[1], pnb + lp)
                    s = slot(prefix + (unit,))  # a blank in between makes it a new unit
                    s[1] = _logaddexp(s[1], pb + lp)
                else:
                    s = slot(prefix + (unit,))
                    s[1] = _logaddexp(s[1], pb + lp, pnb + lp)
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

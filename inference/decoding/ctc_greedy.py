"""CTC greedy search: best unit per frame, repeats merged, blanks dropped."""
from __future__ import annotations

import torch


def ctc_greedy_search(log_probs: torch.Tensor, lengths: torch.Tensor, blank_id: int = 0) -> list[list[int]]:
    """log_probs [B, T, V], lengths [B] -> unit ids per utterance."""
    best = log_probs.argmax(dim=-1)  # [B, T]
    # Merge on the device, then move only the kept ids to the host.
    previous = torch.cat([best.new_full((best.size(0), 1), -1), best[:, :-1]], dim=1)
    frames = torch.arange(best.size(1), device=best.device).unsqueeze(0)
    keep = (best != previous) & (best != blank_id) & (frames < lengths.unsqueeze(1))
    ids, rows = best[keep].tolist(), keep.nonzero()[:, 0].tolist()
    hyps: list[list[int]] = [[] for _ in range(best.size(0))]
    for row, unit in zip(rows, ids):
        hyps[row].append(unit)
    return hyps

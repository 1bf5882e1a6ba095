"""Attention beam search with the left-to-right decoder, batched over utterances and beams.

Each step re-runs the decoder over the whole prefix (the decoder keeps no self-attention cache):
cost grows with the square of the output length, which is acceptable for this mode, a reference
rather than the deployed path (CTC prefix beam + attention rescoring is).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from u2moe.model.asr_model import U2Model


def attention_beam_search(model: U2Model, memory: torch.Tensor, valid: torch.Tensor, beam: int,
                          max_len: int | None = None) -> list[list[int]]:
    """memory [B, T, D], valid [B, T] -> best unit ids per utterance (<sos>/<eos> removed).

    A hypothesis ends at <eos> or at its utterance's encoder length (capped by max_len), as in
    WeNet, so an utterance decodes the same alone or in a padded batch.
    """
    b, device = memory.size(0), memory.device
    sos = eos = model.sos
    limits = valid.sum(dim=1)
    if max_len is not None:
        limits = limits.clamp(max=max_len)
    limits = limits.repeat_interleave(beam)
    mem = memory.repeat_interleave(beam, dim=0)
    mem_valid = valid.repeat_interleave(beam, dim=0)
    hyps = torch.full((b * beam, 1), sos, dtype=torch.long, device=device)
    # Only the first beam of each utterance is live at the start, so the beams do not duplicate.
    scores = torch.zeros(b, beam, device=device)
    scores[:, 1:] = -float("inf")
    scores = scores.view(-1)
    ended = torch.zeros(b * beam, dtype=torch.bool, device=device)
    for step in range(1, int(limits.max()) + 2):
        ended = ended | (limits < step)
        if bool(ended.all()):
            break
        lens = torch.full((b * beam,), step, device=device)
        logits, _ = model.decoder(mem, mem_valid, hyps, lens)
        logp = F.log_softmax(logits[:, -1].float(), dim=-1)
        # A finished hypothesis keeps its score by extending with <eos> at no cost.
        finished = torch.full_like(logp, -float("inf"))
        finished[:, eos] = 0.0
        logp = torch.where(ended.unsqueeze(1), finished, logp)
        vocab = logp.size(1)
        cand = (scores.unsqueeze(1) + logp).view(b, beam * vocab)
        top_scores, top_idx = cand.topk(beam, dim=1)
        parent = (top_idx // vocab + torch.arange(b, device=device).unsqueeze(1) * beam).view(-1)
        token = (top_idx % vocab).view(-1)
        hyps = torch.cat([hyps.index_select(0, parent), token.unsqueeze(1)], dim=1)
        scores = top_scores.view(-1)
        ended = ended.index_select(0, parent) | (token == eos)
    best = scores.view(b, beam).argmax(dim=1) + torch.arange(b, device=device) * beam
    results = []
    for row in hyps.index_select(0, best).tolist():
        body = row[1:]
        results.append(body[:body.index(eos)] if eos in body else body)
    return results

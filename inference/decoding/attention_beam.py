"""Attention beam search with the left-to-right decoder, batched over utterances and beams.

Incremental: each step runs only the newest position through the decoder, with the earlier
positions' self-attention keys and values cached per layer (reordered with the beams) and the
encoder output's cross-attention keys and values projected once (`TransformerDecoder.forward_step`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...model.asr_model import U2Model


def attention_beam_search(model: U2Model, memory: torch.Tensor, valid: torch.Tensor, beam: int,
                          max_len: int | None = None) -> list[list[int]]:
    """memory [B, T, D], valid [B, T] -> best unit ids per utterance (<sos>/<eos> removed).

    A hypothesis ends at <eos> or at its utterance's encoder length (capped by max_len), as in
    WeNet, so an utterance decodes the same alone or in a padded batch. Hypotheses are ranked by
    their log-probability per unit (<eos> counted), not their sum as in WeNet: an ended
    hypothesis competes with the live ones for the beam at the score it ended with, so by the
    sum a short one outranks every longer one that has paid for more units, and a wider beam
    finds more such early endings (an undertrained decoder's output then loses its tail). Among
    live hypotheses, all of one length, the ranking is the sum's.
    """
    b, device = memory.size(0), memory.device
    sos = eos = model.sos
    limits = valid.sum(dim=1)
    if max_len is not None:
        limits = limits.clamp(max=max_len)
    limits = limits.repeat_interleave(beam)
    mem_valid = valid.repeat_interleave(beam, dim=0)
    decoder = model.decoder.left_decoder
    # Beams of one utterance share its memory: project it per utterance, then repeat.
    memory_kv = [kv.repeat_interleave(beam, dim=0) for kv in decoder.project_memory(memory)]
    caches: list[torch.Tensor | None] = [None] * len(memory_kv)
    hyps = torch.full((b * beam, 1), sos, dtype=torch.long, device=device)
    # Only the first beam of each utterance is live at the start, so the beams do not duplicate.
    scores = torch.zeros(b, beam, device=device)
    scores[:, 1:] = -float("inf")
    scores = scores.view(-1)
    ended = torch.zeros(b * beam, dtype=torch.bool, device=device)
    lengths = torch.zeros(b * beam, device=device)  # units of each hypothesis, <eos> included
    for step in range(1, int(limits.max()) + 2):
        ended = ended | (limits < step)
        if bool(ended.all()):
            break
        logits, caches = decoder.forward_step(hyps[:, -1], step - 1, caches, memory_kv, mem_valid)
        logp = F.log_softmax(logits.float(), dim=-1)
        # A finished hypothesis keeps its score by extending with <eos> at no cost.
        finished = torch.full_like(logp, -float("inf"))
        finished[:, eos] = 0.0
        logp = torch.where(ended.unsqueeze(1), finished, logp)
        vocab = logp.size(1)
        new_lengths = torch.where(ended, lengths, torch.full_like(lengths, step))
        cand = scores.unsqueeze(1) + logp
        per_unit = (cand / new_lengths.unsqueeze(1)).view(b, beam * vocab)
        top_idx = per_unit.topk(beam, dim=1).indices
        parent = (top_idx // vocab + torch.arange(b, device=device).unsqueeze(1) * beam).view(-1)
        token = (top_idx % vocab).view(-1)
        hyps = torch.cat([hyps.index_select(0, parent), token.unsqueeze(1)], dim=1)
        caches = [cache.index_select(0, parent) for cache in caches]
        scores = cand.view(b, beam * vocab).gather(1, top_idx).view(-1)
        lengths = new_lengths.index_select(0, parent)
        ended = ended.index_select(0, parent) | (token == eos)
    best = (scores / lengths.clamp(min=1)).view(b, beam).argmax(dim=1) + torch.arange(b, device=device) * beam
    results = []
    for row in hyps.index_select(0, best).tolist():
        body = row[1:]
        results.append(body[:body.index(eos)] if eos in body else body)
    return results

"""U2++ attention rescoring: both decoders score every CTC n-best hypothesis in one batch.

score = (1 - reverse_weight) * log P_l2r(y <eos>) + reverse_weight * log P_r2l(rev(y) <eos>)
        + ctc_weight * log P_ctc(y)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from ...model.asr_model import U2Model
from ...model.decoder import TransformerDecoder


def _sequence_scores(logits: torch.Tensor, ys_out: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Summed log probability of each row's ys_out[:lengths] under logits [N, L, V]."""
    logp = F.log_softmax(logits.float(), dim=-1).gather(2, ys_out.clamp(min=0).unsqueeze(2)).squeeze(2)
    keep = torch.arange(ys_out.size(1), device=ys_out.device).unsqueeze(0) < lengths.unsqueeze(1)
    return (logp * keep).sum(dim=1)


def decoder_scores(model: U2Model, memory: torch.Tensor, valid: torch.Tensor, owner: torch.Tensor,
                   hyps: list[list[int]], reverse_weight: float) -> torch.Tensor:
    """Attention score of each hypothesis; owner[i] is the batch row of hyps[i]."""
    device = memory.device
    sos = eos = model.sos
    lengths = torch.tensor([len(h) + 1 for h in hyps], device=device)
    body = [torch.tensor(h, dtype=torch.long) for h in hyps]

    def inputs_outputs(seqs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        ys_in = pad_sequence([F.pad(s, (1, 0), value=sos) for s in seqs], batch_first=True, padding_value=eos)
        ys_out = pad_sequence([F.pad(s, (0, 1), value=eos) for s in seqs], batch_first=True, padding_value=-1)
        return ys_in.to(device), ys_out.to(device)

    ys_in, ys_out = inputs_outputs(body)
    use_right = reverse_weight > 0 and model.decoder.right_decoder is not None
    r_ys_in = r_ys_out = None
    if use_right:
        r_ys_in, r_ys_out = inputs_outputs([s.flip(0) for s in body])
    mem_valid = valid.index_select(0, owner)

    def logits(decoder: TransformerDecoder, tokens_in: torch.Tensor) -> torch.Tensor:
        # Each utterance's memory is projected once, then its keys and values copied to each of
        # its hypotheses: projecting a copy per hypothesis would repeat the largest products of
        # the decoders' work n-best times.
        memory_kv = [kv.index_select(0, owner) for kv in decoder.project_memory(memory)]
        return decoder(None, mem_valid, tokens_in, lengths, memory_kv)

    score = _sequence_scores(logits(model.decoder.left_decoder, ys_in), ys_out, lengths)
    if use_right:
        right = _sequence_scores(logits(model.decoder.right_decoder, r_ys_in), r_ys_out, lengths)
        score = (1 - reverse_weight) * score + reverse_weight * right
    return score


def attention_rescoring(model: U2Model, memory: torch.Tensor, valid: torch.Tensor,
                        nbests: list[list[tuple[list[int], float]]], ctc_weight: float,
                        reverse_weight: float) -> list[list[int]]:
    """Best hypothesis of each utterance's CTC n-best (ids, CTC score) after rescoring."""
    owner = torch.tensor([b for b, nbest in enumerate(nbests) for _ in nbest], device=memory.device)
    hyps = [h for nbest in nbests for h, _ in nbest]
    ctc = torch.tensor([s for nbest in nbests for _, s in nbest], device=memory.device)
    total = (decoder_scores(model, memory, valid, owner, hyps, reverse_weight) + ctc_weight * ctc).tolist()
    best: list[list[int]] = []
    start = 0
    for nbest in nbests:
        scores = total[start:start + len(nbest)]
        best.append(hyps[start + max(range(len(nbest)), key=scores.__getitem__)] if nbest else [])
        start += len(nbest)
    return best

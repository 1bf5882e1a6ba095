"""Decoding modes against direct computations, batch invariance, scoring, model file, CLI."""
import itertools
import json
import math
import subprocess
import sys

import pytest
import soundfile as sf
import torch
import torch.nn.functional as F

from decoding_helpers import chirp, tiny_model, units_for
from u2moe.configs.experiment import load_config
from u2moe.inference.model_file import load_model_file, save_model_file
from u2moe.inference.decoding.attention_beam import attention_beam_search
from u2moe.inference.decoding.ctc_greedy import ctc_greedy_search
from u2moe.inference.decoding.ctc_prefix_beam import CtcPrefixBeamSearch, ctc_prefix_beam_search
from u2moe.inference.decoding.rescoring import attention_rescoring, decoder_scores
from u2moe.inference.decoding.scoring import score
from u2moe.inference.decoding.search import MODES, DecodeOptions, decode_batch


def _collapse(path, blank=0):
    out, prev = [], None
    for u in path:
        if u != prev and u != blank:
            out.append(u)
        prev = u
    return tuple(out)


def test_ctc_greedy_matches_per_frame_argmax_and_collapse():
    g = torch.Generator().manual_seed(0)
    log_probs = torch.randn(3, 12, 5, generator=g).log_softmax(-1)
    lengths = torch.tensor([12, 7, 1])
    got = ctc_greedy_search(log_probs, lengths)
    for b in range(3):
        path = log_probs[b, :lengths[b]].argmax(-1).tolist()
        assert tuple(got[b]) == _collapse(path)


def test_prefix_beam_without_pruning_gives_exact_prefix_probabilities():
    """With a beam wider than every set of prefixes, each score is the total probability of all
    alignments that collapse to the prefix: brute force over all V^T paths."""
    g = torch.Generator().manual_seed(1)
    t, v = 5, 3
    log_probs = torch.randn(t, v, generator=g).log_softmax(-1)
    totals: dict = {}
    for path in itertools.product(range(v), repeat=t):
        p = sum(log_probs[i, u].item() for i, u in enumerate(path))
        key = _collapse(path)
        totals[key] = totals.get(key, 0.0) + math.exp(p)
    search = CtcPrefixBeamSearch(beam=1000)
    search.step(log_probs)
    nbest = search.nbest()
    assert len(nbest) == len(totals)
    for hyp, s in nbest:
        assert math.exp(s) == pytest.approx(totals[tuple(hyp)], rel=1e-5)
    assert tuple(nbest[0][0]) == max(totals, key=totals.get)


def test_prefix_beam_is_resumable_and_batched():
    g = torch.Generator().manual_seed(2)
    log_probs = torch.randn(2, 30, 7, generator=g).log_softmax(-1)
    lengths = torch.tensor([30, 21])
    batched = ctc_prefix_beam_search(log_probs, lengths, beam=4)
    for b in range(2):
        search = CtcPrefixBeamSearch(beam=4)
        frames = log_probs[b, :lengths[b]]
        for start, end in [(0, 3), (3, 13), (13, 14), (14, 30)]:
            search.step(frames[start:end])
        assert search.nbest() == batched[b]


def _plain_prefix_beam(log_probs, beam, blank):
    """The textbook prefix beam search, one dict of candidates per frame, numpy's logaddexp."""
    import numpy as np

    prefixes = {(): (0.0, -math.inf)}
    for row in log_probs:
        lps, ids = row.topk(min(beam, row.numel()))
        nxt = {}
        for unit, lp in zip(ids.tolist(), lps.tolist()):
            for prefix, (pb, pnb) in prefixes.items():
                total = np.logaddexp(pb, pnb)
                if unit == blank:
                    s = nxt.setdefault(prefix, [-math.inf, -math.inf])
                    s[0] = np.logaddexp(s[0], total + lp)
                    continue
                if prefix and unit == prefix[-1]:
                    s = nxt.setdefault(prefix, [-math.inf, -math.inf])
                    s[1] = np.logaddexp(s[1], pnb + lp)
                    s = nxt.setdefault(prefix + (unit,), [-math.inf, -math.inf])
                    s[1] = np.logaddexp(s[1], pb + lp)
                else:
                    s = nxt.setdefault(prefix + (unit,), [-math.inf, -math.inf])
                    s[1] = np.logaddexp(s[1], total + lp)
        scored = sorted(((np.logaddexp(*v), k, v) for k, v in nxt.items() if np.logaddexp(*v) > -math.inf),
                        key=lambda x: x[0], reverse=True)
        prefixes = {k: tuple(v) for _, k, v in scored[:beam]}
    return sorted(((list(k), float(np.logaddexp(*v))) for k, v in prefixes.items()), key=lambda h: -h[1])


@pytest.mark.parametrize("beam,blank,peaky", [(1, 0, True), (4, 0, False), (10, 0, True), (10, 3, False), (16, 0, True)])
def test_prefix_beam_equals_the_textbook_search(beam, blank, peaky):
    g = torch.Generator().manual_seed(beam + blank)
    logits = torch.randn(60, 12, generator=g)
    if peaky:  # a trained model's shape: mostly blank, now and then one clear unit
        spike = torch.where(torch.rand(60, generator=g) < 0.6, blank, torch.randint(0, 12, (60,), generator=g))
        logits[torch.arange(60), spike] += 6.0
    log_probs = logits.log_softmax(-1)
    search = CtcPrefixBeamSearch(beam, blank)
    search.step(log_probs)
    got, expected = search.nbest(), _plain_prefix_beam(log_probs, beam, blank)
    assert [h for h, _ in got] == [h for h, _ in expected]
    assert [s for _, s in got] == pytest.approx([s for _, s in expected], abs=1e-9)


def _direct_sequence_logp(decoder, memory, tokens, sos):
    """log P(tokens <eos>) with the decoder run on this one sequence, no padding."""
    ys_in = torch.tensor([[sos] + tokens])
    logits = decoder(memory, torch.ones(1, memory.size(1), dtype=torch.bool), ys_in, torch.tensor([len(tokens) + 1]))
    logp = F.log_softmax(logits[0], -1)
    return sum(logp[i, y].item() for i, y in enumerate(tokens + [sos]))


@pytest.mark.parametrize("preset", ["tiny_dense", "tiny_moe"])
def test_attention_rescoring_is_the_u2pp_combination_of_direct_scores(preset):
    model = tiny_model(preset)
    feats, lens = torch.randn(2, 90, 80), torch.tensor([90, 61])
    ctc_w, rev_w = 0.3, 0.4
    with torch.no_grad():
        memory, valid = model.encoder(feats, lens)
        nbests = [[([5, 6, 7], -3.0), ([9], -1.0), ([], -6.0)], [([4, 4, 8, 3, 2], -2.0), ([8], -2.5)]]
        best = attention_rescoring(model, memory, valid, nbests, ctc_w, rev_w)
        for b, nbest in enumerate(nbests):
            mem = memory[b:b + 1, :int(valid[b].sum())]
            direct = []
            for hyp, ctc in nbest:
                l2r = _direct_sequence_logp(model.decoder.left_decoder, mem, hyp, model.sos)
                r2l = _direct_sequence_logp(model.decoder.right_decoder, mem, hyp[::-1], model.sos)
                direct.append((1 - rev_w) * l2r + rev_w * r2l + ctc_w * ctc)
            assert best[b] == nbest[max(range(len(nbest)), key=direct.__getitem__)][0]


@pytest.mark.parametrize("preset", ["tiny_dense", "tiny_moe"])
def test_decoder_scores_equal_each_sequence_scored_alone(preset):
    """The batched scores (memory projected once per utterance, padded hypotheses of several
    utterances together) against each hypothesis run alone through each decoder."""
    model = tiny_model(preset)
    feats, lens = torch.randn(2, 90, 80), torch.tensor([90, 61])
    hyps = [[5, 6, 7], [9], [], [4, 4, 8, 3, 2], [8]]
    owner = torch.tensor([0, 0, 0, 1, 1])
    with torch.no_grad():
        memory, valid = model.encoder(feats, lens)
        got = decoder_scores(model, memory, valid, owner, hyps, reverse_weight=0.4)
        for i, hyp in enumerate(hyps):
            b = int(owner[i])
            mem = memory[b:b + 1, :int(valid[b].sum())]
            l2r = _direct_sequence_logp(model.decoder.left_decoder, mem, hyp, model.sos)
            r2l = _direct_sequence_logp(model.decoder.right_decoder, mem, hyp[::-1], model.sos)
            assert float(got[i]) == pytest.approx(0.6 * l2r + 0.4 * r2l, abs=1e-4)


def test_attention_beam_of_one_is_greedy_decoding():
    model = tiny_model("tiny_dense")
    feats, lens = torch.randn(2, 80, 80), torch.tensor([80, 50])
    with torch.no_grad():
        memory, valid = model.encoder(feats, lens)
        got = attention_beam_search(model, memory, valid, beam=1, max_len=6)
        for b in range(2):
            mem = memory[b:b + 1, :int(valid[b].sum())]
            ys = [model.sos]
            for _ in range(6):
                logits = model.decoder.left_decoder(mem, torch.ones(1, mem.size(1), dtype=torch.bool),
                                                    torch.tensor([ys]), torch.tensor([len(ys)]))
                nxt = int(logits[0, -1].argmax())
                if nxt == model.eos:
                    break
                ys.append(nxt)
            assert got[b] == ys[1:]


@pytest.mark.parametrize("preset", ["tiny_dense", "tiny_moe"])
def test_incremental_decoder_step_equals_the_full_forward_at_the_last_position(preset):
    model = tiny_model(preset)
    decoder = model.decoder.left_decoder
    g = torch.Generator().manual_seed(5)
    memory = torch.randn(3, 20, model.decoder.left_decoder.embed.embedding_dim, generator=g)
    valid = torch.arange(20)[None] < torch.tensor([[20], [13], [4]])
    ys = torch.randint(0, model.sos, (3, 6), generator=g)
    ys[:, 0] = model.sos
    with torch.no_grad():
        full = decoder(memory, valid, ys, torch.full((3,), 6))
        kv, caches = decoder.project_memory(memory), [None] * len(decoder.decoders)
        for t in range(6):
            logits, caches = decoder.forward_step(ys[:, t], t, caches, kv, valid)
            torch.testing.assert_close(logits, full[:, t], rtol=1e-5, atol=1e-5)


def _recomputing_beam_search(model, memory, valid, beam, max_len, by_sum=False):
    """Beam search that reruns the decoder over each whole prefix, one utterance at a time,
    ranking hypotheses by log-probability per unit (<eos> counted, <sos> not), or by their sum."""
    def per_unit(c):
        return c[1] if by_sum else c[1] / (len(c[0]) - 1)

    results = []
    for b in range(memory.size(0)):
        mem = memory[b:b + 1, :int(valid[b].sum())]
        limit = min(mem.size(1), max_len)
        live = [((model.sos,), 0.0)]
        ended = []
        for _ in range(limit):
            cands = []
            for hyp, score_ in live:
                logits = model.decoder.left_decoder(mem, torch.ones(1, mem.size(1), dtype=torch.bool),
                                                    torch.tensor([hyp]), torch.tensor([len(hyp)]))
                logp = F.log_softmax(logits[0, -1].float(), dim=-1)
                cands += [(hyp + (u,), score_ + float(logp[u])) for u in range(logp.numel())]
            cands.sort(key=per_unit, reverse=True)
            live = []
            for hyp, score_ in cands[:beam]:
                (ended if hyp[-1] == model.eos else live).append((hyp, score_))
            # Ended hypotheses compete with live ones for the beam at the score they ended with.
            pool = sorted(ended + live, key=per_unit, reverse=True)[:beam]
            ended = [c for c in pool if c[0][-1] == model.eos]
            live = [c for c in pool if c[0][-1] != model.eos]
            if not live:
                break
        best = max(ended + live, key=per_unit)[0][1:]
        results.append(list(best[:-1] if best and best[-1] == model.eos else best))
    return results


@pytest.mark.parametrize("preset", ["tiny_dense", "tiny_moe"])
def test_incremental_attention_beam_search_equals_a_recomputing_one(preset):
    model = tiny_model(preset)
    g = torch.Generator().manual_seed(7)
    feats, lens = torch.randn(2, 60, 80, generator=g), torch.tensor([60, 41])
    with torch.no_grad():
        memory, valid = model.encoder(feats, lens)
        got = attention_beam_search(model, memory, valid, beam=3, max_len=5)
        assert got == _recomputing_beam_search(model, memory, valid, beam=3, max_len=5)


def test_a_likely_early_end_does_not_outrank_longer_hypotheses_of_higher_probability_per_unit():
    model = tiny_model("tiny_dense")
    with torch.no_grad():
        # At every step one unit is the likeliest (about 0.5) and <eos> next (about 0.2).
        bias = model.decoder.left_decoder.output_layer.bias
        bias[5] += 6.0
        bias[model.eos] += 5.0
        g = torch.Generator().manual_seed(11)
        memory, valid = model.encoder(torch.randn(2, 80, 80, generator=g), torch.tensor([80, 64]))
        got = attention_beam_search(model, memory, valid, beam=4, max_len=8)
        by_sum = _recomputing_beam_search(model, memory, valid, beam=4, max_len=8, by_sum=True)
    assert got == _recomputing_beam_search(model, memory, valid, beam=4, max_len=8)
    # By the sum the bare <eos> wins; per unit the longer hypotheses do.
    assert by_sum == [[], []] and all(len(hyp) > 0 for hyp in got)


@pytest.mark.parametrize("preset,chunk", [("tiny_dense", -1), ("tiny_moe", -1), ("tiny_moe", 4)])
def test_every_mode_decodes_a_padded_batch_as_each_utterance_alone(preset, chunk):
    model = tiny_model(preset)
    g = torch.Generator().manual_seed(3)
    feats, lens = torch.randn(3, 70, 80, generator=g), torch.tensor([70, 52, 33])
    opts = DecodeOptions(beam=3, chunk_size=chunk)
    batched = decode_batch(model, feats, lens, list(MODES), opts)
    for b in range(3):
        alone = decode_batch(model, feats[b:b + 1, :lens[b]], lens[b:b + 1], list(MODES), opts)
        for mode in MODES:
            assert batched[mode][b] == alone[mode][0], mode


@pytest.mark.parametrize("chunk", [-1, 4])
def test_every_attention_call_has_a_bias_column_per_key(monkeypatch, chunk):
    """CUDA's memory-efficient attention (PyTorch's choice with cuDNN's turned off) refuses a
    bias whose last dimension is broadcast ("last dimension must be contiguous"); the CPU kernels
    accept it. So every call of every decoding mode must pass one bias column per key."""
    real = F.scaled_dot_product_attention
    shapes = []

    def checked(q, k, v, attn_mask=None, **kwargs):
        shapes.append((attn_mask.size(-1), attn_mask.stride(-1), k.size(-2), q.size(-2)))
        return real(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", checked)
    model = tiny_model("tiny_moe")
    feats, lens = torch.randn(2, 60, 80, generator=torch.Generator().manual_seed(5)), torch.tensor([60, 41])
    decode_batch(model, feats, lens, list(MODES), DecodeOptions(beam=3, chunk_size=chunk))
    memory, valid = model.encoder(feats, lens)
    attention_beam_search(model, memory, valid, beam=3, max_len=6)
    assert [s for s in shapes if s[0] != s[2] or s[1] != 1] == []
    assert sum(q == 1 and k > 1 for _, _, k, q in shapes) >= 10  # incremental decoder steps ran


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("chunk", [-1, 16])
def test_every_mode_decodes_on_the_gpu_in_bf16_and_fp32(chunk, monkeypatch):
    """The GPU's attention and MoE kernels refuse inputs the CPU's accept (e.g. a broadcast attention
    bias): every mode runs there, and in fp32 gives the CPU's greedy hypotheses."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # fp32 convolutions, as on the CPU
    model = tiny_model("tiny_moe")
    feats, lens = torch.randn(4, 200, 80, generator=torch.Generator().manual_seed(7)), torch.tensor([200, 160, 90, 41])
    opts = DecodeOptions(beam=4, chunk_size=chunk)
    on_cpu = decode_batch(model, feats, lens, ["ctc_greedy"], opts)
    gpu_model = model.cuda()
    for dtype in (torch.float32, torch.bfloat16):
        out = decode_batch(gpu_model.to(dtype), feats.cuda().to(dtype), lens.cuda(), list(MODES), opts)
        assert all(len(out[mode]) == 4 for mode in MODES)
        if dtype == torch.float32:
            assert out["ctc_greedy"] == on_cpu["ctc_greedy"]


def test_batch_fbank_is_each_utterance_alone_zero_padded():
    from u2moe.configs.data import DataConfig
    from u2moe.data_prep.features import compute_fbank
    from u2moe.inference.decoding.data import batch_fbank

    cfg = DataConfig()
    g = torch.Generator().manual_seed(4)
    waves = [torch.rand(n, generator=g) * 2 - 1 for n in (16000, 5000, 11999)]
    feats, lengths = batch_fbank(waves, cfg)
    assert feats.dtype == torch.float32 and lengths.tolist() == [98, 29, 73]
    for i, wave in enumerate(waves):
        torch.testing.assert_close(feats[i, :lengths[i]], compute_fbank(wave, cfg.fbank, cfg.sample_rate, 0.0))
        assert (feats[i, lengths[i]:] == 0).all()


def test_score_counts_against_hand_computed_edits():
    s = score(["A B C", "X Y"], ["A C D", ""])
    # Words: A=, B deleted, C=, D inserted -> or B->C sub, C->D sub; jiwer's alignment: 2 S.
    assert (s.wer.substitutions + s.wer.deletions + s.wer.insertions) == 4
    assert s.wer.reference_length == 5 and s.wer.rate == pytest.approx(4 / 5)
    assert s.cer.reference_length == 8 and s.utterances == 2


def test_model_file_round_trip_and_errors(tmp_path):
    cfg = load_config("tiny_moe")
    model = tiny_model("tiny_moe")
    units = units_for(cfg.model.vocab_size)
    save_model_file(tmp_path / "model.pt", model, cfg, [f"{u} {i}" for i, u in enumerate(units)])
    loaded, config, got_units = load_model_file(tmp_path / "model.pt")
    assert got_units == units and config["model"]["vocab_size"] == cfg.model.vocab_size
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    torch.save({"format": "other"}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="bad.pt: not a u2moe-model-v1"):
        load_model_file(tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="3 units"):
        save_model_file(tmp_path / "x.pt", model, cfg, units[:3])


def test_decode_command_writes_hypotheses_and_scores(tmp_path):
    cfg = load_config("tiny_dense")
    model = tiny_model("tiny_dense")
    save_model_file(tmp_path / "model.pt", model, cfg, units_for(cfg.model.vocab_size))
    data = tmp_path / "data"
    (data / "audio").mkdir(parents=True)
    keys = ["utt1", "utt2", "utt3"]
    for i, key in enumerate(keys):
        sf.write(data / "audio" / f"{key}.wav", chirp(0.6 + 0.3 * i, i).numpy(), 16000)
    (data / "wav.scp").write_text("".join(f"{k} audio/{k}.wav\n" for k in keys))
    (data / "text").write_text("".join(f"{k} HELLO WORLD\n" for k in keys))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "u2moe", "decode", "--model", str(tmp_path / "model.pt"),
                           "--data-dir", str(data), "--modes", "ctc_greedy,attention_rescoring",
                           "--beam", "3", "--batch-size", "2", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    greedy = (out / "ctc_greedy.txt").read_text().splitlines()
    assert [line.split(" ", 1)[0] for line in greedy] == keys
    # Units are joined with the word boundary as a space, as the tokenizer decodes them.
    feats_hyp = decode_batch(model, *_feats_of(data, keys), ["ctc_greedy"], DecodeOptions())["ctc_greedy"]
    units = units_for(cfg.model.vocab_size)
    for line, ids in zip(greedy, feats_hyp):
        expected = "".join(units[i] for i in ids).replace("\u2581", " ").strip()
        assert line.split(" ", 1)[1:] == ([expected] if expected else [])
    assert "ctc_greedy: CER" in proc.stdout and "utts 3" in proc.stdout
    assert "decode: 3utt [" in proc.stderr  # the progress bar's last state
    assert (out / "attention_rescoring.txt").is_file() and (out / "wer.json").is_file()


def test_decode_summary_counts_the_decoded_utterances_beside_the_skipped(tmp_path, caplog):
    from u2moe.__main__ import main

    cfg = load_config("tiny_dense")
    save_model_file(tmp_path / "model.pt", tiny_model("tiny_dense"), cfg, units_for(cfg.model.vocab_size))
    data = tmp_path / "data"
    (data / "audio").mkdir(parents=True)
    seconds = {"utt1": 0.5, "utt2": 0.7}
    for i, (key, length) in enumerate(seconds.items()):
        sf.write(data / "audio" / f"{key}.wav", chirp(length, i).numpy(), 16000)
    (data / "audio" / "bad.wav").write_bytes(b"RIFF not audio")
    keys = [*seconds, "bad"]
    (data / "wav.scp").write_text("".join(f"{k} audio/{k}.wav\n" for k in keys))
    (data / "text").write_text("".join(f"{k} HELLO\n" for k in keys))
    with caplog.at_level("INFO"), pytest.raises(SystemExit) as done:
        main(["decode", "--model", str(tmp_path / "model.pt"), "--data-dir", str(data), "--modes", "ctc_greedy",
              "--out", str(tmp_path / "out")])
    assert done.value.code == 0
    messages = [r.getMessage() for r in caplog.records]
    summary = next(m for m in messages if m.startswith("decode input:")).splitlines()
    hours = sum(seconds.values()) / 3600
    assert summary[:2] == [f"decode input: 2 utterances ({hours:.3f} h) in 1 batches; skipped 1",
                           "  skipped audio_undecodable: 1"]
    assert any(m.startswith("2 utterances, 1.2 s of audio") for m in messages)


def test_decode_data_dir_with_missing_and_partial_text(tmp_path, capsys):
    from u2moe.__main__ import main

    cfg = load_config("tiny_dense")
    save_model_file(tmp_path / "model.pt", tiny_model("tiny_dense"), cfg, units_for(cfg.model.vocab_size))
    wavs = []
    for i in range(3):
        wavs.append(tmp_path / f"utt{i}.wav")
        sf.write(wavs[-1], chirp(0.5 + 0.2 * i, i).numpy(), 16000)
    data = tmp_path / "data"
    data.mkdir()
    (data / "wav.scp").write_text("".join(f"{w.stem} {w}\n" for w in wavs))
    (data / "text").write_text("utt1 HELLO\n")

    def decode(out: str) -> str:
        with pytest.raises(SystemExit) as done:
            main(["decode", "--model", str(tmp_path / "model.pt"), "--data-dir", str(data), "--modes", "ctc_greedy",
                  "--out", str(tmp_path / out)])
        assert done.value.code == 0
        return capsys.readouterr().out

    out = decode("out")
    assert [line.split(" ")[0] for line in (tmp_path / "out" / "ctc_greedy.txt").read_text().splitlines()] == \
        ["utt0", "utt1", "utt2"]
    assert "scored 1 of 3 utterances: 2 have no reference text" in out
    assert json.loads((tmp_path / "out" / "wer.json").read_text())["ctc_greedy"]["utterances"] == 1
    (data / "text").unlink()
    assert "scored 0 of 3" in decode("out2")
    assert len((tmp_path / "out2" / "ctc_greedy.txt").read_text().splitlines()) == 3


def _feats_of(data, keys):
    from u2moe.configs.data import DataConfig
    from u2moe.inference.decoding.data import batch_fbank

    waves = [torch.from_numpy(sf.read(data / "audio" / f"{k}.wav", dtype="float32")[0]) for k in keys]
    return batch_fbank(waves, DataConfig())

"""Features: the CPU worker path against torchaudio's kaldi.fbank, the batched FeatureExtractor
against the CPU path, SpecAugment and speed perturbation."""
from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio

from test_data_support import LETTERS, make_kaldi_dir
from u2moe.data_prep import DataConfig, FeatureExtractor, Tokenizer, build_dataloader
from u2moe.data_prep.audio import speed_perturb
from u2moe.configs.data import FbankConfig, SpecAugConfig
from u2moe.data_prep.features import KaldiFbank, compute_fbank
from u2moe.data_prep.shard_writer import write_shards
from u2moe.data_prep.specaug import spec_augment


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    data_dir, utts = make_kaldi_dir(root, count=6, start=20)
    write_shards(data_dir, root / "shards", utts_per_shard=3)
    return root / "shards" / "shards.list", Tokenizer("char", LETTERS), utts


def _batches(corpus, train: bool, **cfg) -> list[dict]:
    shard_list, tok, _ = corpus
    cfg = DataConfig.from_dict({"batch": {"batch_size": 6}, **cfg})
    loader = build_dataloader(shard_list, tok, cfg, train=train, num_workers=0)
    return list(loader)


def test_worker_fbank_equals_kaldi_fbank_of_the_decoded_audio(corpus):
    _, _, utts = corpus
    (batch,) = _batches(corpus, train=False)
    assert sorted(batch["keys"]) == sorted(utts)
    for i, key in enumerate(batch["keys"]):
        samples, rate = sf.read(utts[key][2], dtype="float32")
        ref = torchaudio.compliance.kaldi.fbank(torch.from_numpy(samples)[None] * 32768, num_mel_bins=80,
                                                frame_length=25.0, frame_shift=10.0, dither=0.0,
                                                energy_floor=0.0, sample_frequency=rate)
        n = int(batch["feats_lengths"][i])
        assert n == ref.shape[0] == 1 + (len(samples) - 400) // 160
        torch.testing.assert_close(batch["feats"][i, :n], ref, atol=1e-5, rtol=1e-5)
    lengths = batch["feats_lengths"].tolist()
    assert lengths == sorted(lengths, reverse=True)


@pytest.mark.parametrize("fbank, rate", [
    (FbankConfig(), 16000),
    (FbankConfig(num_mel_bins=40, frame_length=20.0, frame_shift=12.5, dither=0.0), 16000),
    (FbankConfig(num_mel_bins=23), 8000),
])
def test_compute_fbank_equals_kaldi_fbank(corpus, fbank, rate):
    """The one production fbank against torchaudio's kaldi.fbank, the independent reference."""
    _, _, utts = corpus
    waves = [torch.from_numpy(sf.read(path, dtype="float32")[0]) for _, _, path in utts.values()]
    if rate != 16000:
        waves = [torchaudio.functional.resample(w, 16000, rate) for w in waves]
    waves += [torch.rand(401) - 0.5, torch.rand(399) - 0.5, torch.zeros(1000)]  # one window, none, silence
    for wave in waves:
        if len(wave) < int(rate * fbank.frame_length / 1000):  # kaldi.fbank refuses; we give no frame
            assert compute_fbank(wave, fbank, rate, dither=0.0).shape == (0, fbank.num_mel_bins)
            continue
        ref = torchaudio.compliance.kaldi.fbank(wave[None] * 32768, num_mel_bins=fbank.num_mel_bins,
                                                frame_length=fbank.frame_length, frame_shift=fbank.frame_shift,
                                                dither=0.0, energy_floor=0.0, sample_frequency=rate)
        out = compute_fbank(wave, fbank, rate, dither=0.0)
        assert out.shape == ref.shape and out.dtype == torch.float32
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # Batched with ragged lengths: each row equals its utterance alone, padding is zero.
    lengths = torch.tensor([len(w) for w in waves])
    padded = torch.nn.utils.rnn.pad_sequence(waves, batch_first=True)
    feats, frames = KaldiFbank(fbank, rate)(padded, lengths)
    for i, wave in enumerate(waves):
        n = int(frames[i])
        torch.testing.assert_close(feats[i, :n], compute_fbank(wave, fbank, rate, 0.0), atol=1e-5, rtol=1e-5)
        assert (feats[i, n:] == 0).all()


def test_dither_comes_from_the_given_generator(corpus):
    _, _, utts = corpus
    wave = torch.from_numpy(sf.read(next(iter(utts.values()))[2], dtype="float32")[0])
    cfg = FbankConfig()
    clean = compute_fbank(wave, cfg, 16000, 0.0)
    state = torch.get_rng_state()
    a = compute_fbank(wave, cfg, 16000, 0.1, torch.Generator().manual_seed(5))
    b = compute_fbank(wave, cfg, 16000, 0.1, torch.Generator().manual_seed(5))
    c = compute_fbank(wave, cfg, 16000, 0.1, torch.Generator().manual_seed(6))
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is not touched
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert 0 < float((a - clean).abs().mean()) < 0.05
    # kaldi.fbank with the same noise level perturbs as much.
    ref = torchaudio.compliance.kaldi.fbank(wave[None] * 32768, num_mel_bins=80, dither=0.1, energy_floor=0.0)
    assert float((a - clean).abs().mean()) == pytest.approx(float((ref - clean).abs().mean()), rel=0.2)


def test_training_features_are_reproducible_per_seed_and_epoch(corpus):
    shard_list, tok, _ = corpus
    cfg = DataConfig.from_dict({"batch": {"batch_size": 6}, "spec_aug": {"enabled": False}})

    def run(seed, epoch, workers):
        torch.manual_seed(seed * 7 + epoch + 100 * workers)  # the global RNG must not matter
        loader = build_dataloader(shard_list, tok, cfg, train=True, seed=seed, num_workers=workers)
        loader.set_epoch(epoch)
        return {k: f[:n] for b in loader for k, f, n in zip(b["keys"], b["feats"], b["feats_lengths"])}

    first = run(1, 0, 0)
    for other in (run(1, 0, 0), run(1, 0, 1)):
        assert first.keys() == other.keys() and all(torch.equal(first[k], other[k]) for k in first)
    for other in (run(2, 0, 0), run(1, 1, 0)):
        assert all(not torch.equal(first[k], other[k]) for k in first)


def test_feature_extractor_matches_the_cpu_path(corpus):
    (cpu,) = _batches(corpus, train=False)
    (dev,) = _batches(corpus, train=False, device_features=True)
    assert dev["keys"] == cpu["keys"]
    extractor = FeatureExtractor(DataConfig()).eval()
    feats, lengths = extractor(dev["wavs"], dev["wav_lengths"])
    assert torch.equal(lengths, cpu["feats_lengths"])
    assert feats.shape == cpu["feats"].shape and feats.dtype == torch.float32
    torch.testing.assert_close(feats, cpu["feats"], atol=1e-5, rtol=1e-5)  # the same code, batched
    assert not extractor.state_dict()  # nothing config-derived leaks into checkpoints


def test_feature_extractor_training_mode_masks_and_dithers(corpus):
    (dev,) = _batches(corpus, train=False, device_features=True)
    wavs, wav_lengths = dev["wavs"], dev["wav_lengths"]
    no_dither = DataConfig.from_dict({"fbank": {"dither": 0.0}})
    clean, lengths = FeatureExtractor(no_dither).eval()(wavs, wav_lengths)
    masked, _ = FeatureExtractor(no_dither).train()(wavs, wav_lengths, torch.Generator().manual_seed(0))
    zeroed = (masked == 0) & (clean != 0)
    assert torch.equal(masked[~zeroed], clean[~zeroed])  # only masking changed anything
    for i, n in enumerate(lengths.tolist()):
        z = zeroed[i, :n]
        whole_cols = z.all(dim=0)
        whole_rows = z.all(dim=1)
        # Every zeroed cell lies in a fully masked mel band or a fully masked frame span.
        assert torch.equal(z, whole_rows[:, None] | whole_cols[None, :])
        assert 1 <= int(whole_cols.sum()) <= 2 * 10 and 1 <= int(whole_rows.sum()) <= 2 * 50
    dithering = FeatureExtractor(DataConfig.from_dict({"spec_aug": {"enabled": False}})).train()
    dithered, _ = dithering(wavs, wav_lengths)
    diff = (dithered - clean).abs()
    assert 0 < float(diff.mean()) < 0.05  # dither 0.1 on a 16-bit scale perturbs, barely
    # On the CPU a given generator draws the dither: reproducible.
    again = [dithering(wavs, wav_lengths, torch.Generator().manual_seed(3))[0] for _ in range(2)]
    assert torch.equal(again[0], again[1]) and not torch.equal(again[0], dithered)


def test_spec_augment_bands_stay_inside_each_utterance():
    cfg = SpecAugConfig(num_freq_masks=3, max_freq_width=7, num_time_masks=4, max_time_width=9)
    lengths = torch.tensor([100, 37, 5])
    feats = torch.ones(3, 100, 40)
    gen = torch.Generator().manual_seed(1)
    for _ in range(50):
        out = spec_augment(feats, lengths, cfg, gen)
        for i, n in enumerate(lengths.tolist()):
            rows = (out[i] == 0).all(dim=1)
            cols = (out[i] == 0).all(dim=0)
            assert not rows[n:].any() or n == 100
            assert int(rows[:n].sum()) <= 4 * 9 and int(cols.sum()) <= 3 * 7
            assert cols.any() and rows[:n].any()


def _spec_augment_reference(feats, lengths, cfg, seed):
    """The documented draws (per batch: frequency starts and widths, then time starts and widths),
    applied row by row and band by band."""
    gen = torch.Generator().manual_seed(seed)
    batch, _, bins = feats.shape
    draws = []
    for count, width in ((cfg.num_freq_masks, cfg.max_freq_width), (cfg.num_time_masks, cfg.max_time_width)):
        draws.append((torch.rand(batch, count, generator=gen),
                      torch.randint(1, width + 1, (batch, count), generator=gen)))
    out = feats.clone()
    for i in range(batch):
        n = max(int(lengths[i]), 1)
        for (u, w), limit, axis in zip(draws, (bins, n), (2, 1)):
            for j in range(u.shape[1]):
                start = int(float(u[i, j]) * limit)
                end = min(start + int(w[i, j]), limit)
                if axis == 2:
                    out[i, :, start:end] = 0.0
                else:
                    out[i, start:end] = 0.0
    return out


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device")])])
def test_batched_spec_augment_equals_masking_each_utterance_without_host_syncs(device):
    cfg = SpecAugConfig(num_freq_masks=2, max_freq_width=10, num_time_masks=3, max_time_width=40)
    lengths = torch.tensor([300, 251, 120, 7, 0])
    feats = torch.randn(5, 300, 80, generator=torch.Generator().manual_seed(0))
    for seed in range(20):
        expected = _spec_augment_reference(feats, lengths, cfg, seed)
        x, n = feats.to(device), lengths.to(device)
        if device == "cuda":  # draws go to the device; nothing comes back
            torch.cuda.set_sync_debug_mode("error")
        try:
            out = spec_augment(x, n, cfg, torch.Generator().manual_seed(seed))
        finally:
            if device == "cuda":
                torch.cuda.set_sync_debug_mode("default")
        assert torch.equal(out.cpu(), expected)


def test_speed_perturbation_scales_tempo_and_pitch():
    rate, freq = 16000, 500.0
    wave = torch.sin(2 * torch.pi * freq * torch.arange(2 * rate) / rate)
    for speed in (0.9, 1.1):
        out = speed_perturb(wave, rate, speed)
        assert abs(len(out) - len(wave) / speed) <= 2
        spectrum = np.abs(np.fft.rfft(out.numpy()))
        peak = np.argmax(spectrum) * rate / len(out)
        assert peak == pytest.approx(freq * speed, abs=2)

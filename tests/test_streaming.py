"""Chunk-by-chunk encoding with caches equals the chunk-masked full forward; real-time API."""
import pytest
import torch

from decoding_helpers import chirp, tiny_model, units_for
from u2moe.configs.data import DataConfig
from u2moe.inference.decoding.data import batch_fbank
from u2moe.inference.decoding.search import DecodeOptions, decode_batch
from u2moe.inference.streaming import EncoderStream, StreamingRecognizer, encode_chunk_by_chunk
from u2moe.inference.streaming.fbank_stream import FbankStream


@pytest.mark.parametrize("preset", ["tiny_dense", "tiny_moe"])
@pytest.mark.parametrize("chunk,left", [(2, 0), (4, -1), (5, 1), (8, 2), (16, -1)])
def test_chunk_by_chunk_equals_full_forward_with_chunk_mask(preset, chunk, left):
    # Dynamic chunk training is what makes such a model usable in every chunk setting; the
    # equality itself is architectural, so it holds for any weights.
    model = tiny_model(preset, 0, "model.encoder.use_dynamic_chunk=true")
    g = torch.Generator().manual_seed(chunk)
    feats, lens = torch.randn(3, 131, 80, generator=g), torch.tensor([131, 102, 45])
    with torch.no_grad():
        ref, ref_valid = model.encoder(feats, lens, decoding_chunk_size=chunk, num_decoding_left_chunks=left)
        out, valid = encode_chunk_by_chunk(model.encoder, feats, lens, chunk, left)
    assert torch.equal(valid, ref_valid)
    torch.testing.assert_close(out[valid], ref[ref_valid], rtol=1e-4, atol=1e-5)


def test_cache_holds_exactly_the_left_chunks():
    model = tiny_model("tiny_dense")
    stream = EncoderStream(model.encoder, chunk_size=4, num_left_chunks=2)
    geo = stream.geometry
    sizes = []
    with torch.no_grad():
        for _ in range(4):
            stream.step(torch.randn(1, geo.window, 80))
            sizes.append(stream.att_cache.size(3))
    assert sizes == [4, 8, 8, 8]
    cfg = model.cfg.encoder
    assert stream.att_cache.shape[:3] == (cfg.num_blocks, 1, cfg.attention_heads)
    assert stream.cnn_cache.shape == (cfg.num_blocks, 1, cfg.output_size, cfg.cnn_module_kernel - 1)


def test_fbank_stream_equals_fbank_of_the_whole_waveform():
    cfg = DataConfig()
    wave = chirp(1.3, 0)
    stream = FbankStream(cfg)
    pieces = [stream.accept(p) for p in wave.split([100, 4000, 7, 9000, wave.numel() - 13107])]
    torch.testing.assert_close(torch.cat(pieces), batch_fbank([wave], cfg)[0][0])


@pytest.mark.parametrize("preset", ["tiny_dense", "tiny_moe"])
def test_recognizer_finalizes_to_the_simulated_streaming_result(preset):
    model = tiny_model(preset)
    units = units_for(model.cfg.vocab_size)
    cfg = DataConfig()
    wave = chirp(1.7, 1)
    opts = DecodeOptions(beam=4, chunk_size=4, left_chunks=2)
    feats, lens = batch_fbank([wave], cfg)
    expected = decode_batch(model, feats, lens, ["ctc_prefix_beam", "attention_rescoring"], opts)
    rec = StreamingRecognizer(model, units, cfg, chunk_size=4, num_left_chunks=2, beam=4)

    def text(ids):
        return "".join(units[i] for i in ids).replace("\u2581", " ").strip()

    partials = [rec.accept_waveform(p) for p in wave.split(2000)]
    assert partials[0] == ""  # 125 ms: not yet a whole chunk window
    final = rec.finalize()
    assert rec.search.nbest()[0][0] == expected["ctc_prefix_beam"][0]
    assert final == text(expected["attention_rescoring"][0])
    rec.reset()
    assert rec.finalize() == ""

"""Chunk-by-chunk encoding with caches equals the chunk-masked full forward; real-time API."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from decoding_helpers import chirp, tiny_model, units_for
from u2moe.configs.data import DataConfig
from u2moe.inference.decoding.data import batch_fbank
from u2moe.inference.decoding.ctc_greedy import ctc_greedy_search
from u2moe.inference.decoding.search import DecodeOptions, decode_batch
from u2moe.inference.streaming import EncoderStream, StreamingRecognizer, encode_chunk_by_chunk
from u2moe.inference.streaming.cuda_graph import StreamGraphs
from u2moe.inference.streaming.fixed_stream import FixedShapeStream, encode_with_fixed_shapes
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


def _fixed_shape_models():
    return [("tiny_dense", tiny_model("tiny_dense", 0, "model.encoder.use_dynamic_chunk=true")),
            ("tiny_moe", tiny_model("tiny_moe", 0, "model.encoder.use_dynamic_chunk=true"))]


@pytest.mark.parametrize("chunk,left", [(2, 0), (4, 2), (5, 1), (16, 4)])
def test_fixed_shape_step_equals_the_growing_cache_and_the_masked_full_forward(chunk, left):
    # 190 fbank frames give 46 encoder frames: every setting's cache fills and then slides; the
    # batch's streams end at different chunks, one inside a chunk.
    g = torch.Generator().manual_seed(chunk)
    feats, lens = torch.randn(3, 190, 80, generator=g), torch.tensor([190, 131, 45])
    for _, model in _fixed_shape_models():
        with torch.no_grad():
            full, full_valid = model.encoder(feats, lens, decoding_chunk_size=chunk, num_decoding_left_chunks=left)
            growing, growing_valid = encode_chunk_by_chunk(model.encoder, feats, lens, chunk, left)
            fixed, fixed_valid = encode_with_fixed_shapes(FixedShapeStream(model.encoder, 3, chunk, left), feats, lens)
        assert torch.equal(fixed_valid, full_valid) and torch.equal(fixed_valid, growing_valid)
        torch.testing.assert_close(fixed[fixed_valid], full[full_valid], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(fixed[fixed_valid], growing[growing_valid], rtol=1e-4, atol=1e-5)


class _OpRecorder(TorchDispatchMode):
    """Every operator a block runs, with its output shapes."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, tuple]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        shapes = tuple(tuple(t.shape) for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor))
        self.ops.append((func._opname, shapes))
        return out


def test_fixed_shape_step_runs_the_same_shapes_every_call_and_reads_nothing_back(monkeypatch):
    model = tiny_model("tiny_moe")
    for layer in model.encoder.moe_ffns:
        layer.experts.backend = "grouped_mm"  # the GPU's: group sizes stay on the device
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: pytest.fail("tolist: a host read"))
    stream = FixedShapeStream(model.encoder, 3, chunk_size=4, num_left_chunks=2)
    g = torch.Generator().manual_seed(0)
    calls = []
    # A full chunk, one stream ending inside the next, an ended stream, then a slot restarted.
    for num_valid, restart in (([4, 4, 4], None), ([4, 1, 0], None), ([2, 0, 0], [False, True, False]),
                               ([4, 4, 0], None)):
        if restart is not None:
            stream.reset(torch.tensor(restart))
        with _OpRecorder() as recorder, torch.no_grad():
            out, valid = stream.step(torch.randn(3, stream.geometry.window, 80, generator=g), torch.tensor(num_valid))
        calls.append(recorder.ops)
        assert out.shape == (3, 4, 128)
        assert torch.equal(valid, torch.arange(4).unsqueeze(0) < torch.tensor(num_valid).unsqueeze(1))
    host_reads = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "item"}
    assert not [op for op, _ in calls[0] if op in host_reads]
    assert all(c == calls[0] for c in calls[1:])
    assert any(op == "_grouped_mm" for op, _ in calls[0])


def test_restarting_one_stream_leaves_the_others_and_starts_it_afresh():
    model = tiny_model("tiny_moe")
    g = torch.Generator().manual_seed(1)
    stream = FixedShapeStream(model.encoder, 2, chunk_size=4, num_left_chunks=1)
    alone = [FixedShapeStream(model.encoder, 1, chunk_size=4, num_left_chunks=1) for _ in range(2)]
    full = torch.full((2,), 4)
    windows = [torch.randn(2, stream.geometry.window, 80, generator=g) for _ in range(5)]
    with torch.no_grad():
        for i, window in enumerate(windows):
            if i == 3:  # slot 1 takes a new stream
                stream.reset(torch.tensor([False, True]))
                alone[1].reset()
            out, _ = stream.step(window, full)
            for slot in range(2):
                expected, _ = alone[slot].step(window[slot:slot + 1], full[:1])
                torch.testing.assert_close(out[slot:slot + 1], expected, rtol=1e-4, atol=1e-5)


def test_fixed_shapes_and_their_graphs_refuse_what_they_cannot_hold():
    encoder = tiny_model("tiny_dense").encoder
    with pytest.raises(ValueError, match="bounded number of left chunks"):
        FixedShapeStream(encoder, 2, chunk_size=4, num_left_chunks=-1)
    with pytest.raises(ValueError, match="--left-chunks >= 0"):
        StreamGraphs(encoder, 16, -1)
    with pytest.raises(ValueError, match="CUDA graphs need the model on a CUDA device"):
        StreamGraphs(encoder, 16, 4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("preset,dtype", [("tiny_dense", torch.float32), ("tiny_moe", torch.bfloat16)])
def test_graphed_chunk_step_equals_eager(preset, dtype, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # fp32 convolutions, as on the CPU
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    model = tiny_model(preset).cuda().to(dtype)
    g = torch.Generator().manual_seed(2)
    feats = torch.randn(4, 300, 80, generator=g).cuda().to(dtype)
    lens = torch.tensor([300, 211, 90, 41]).cuda()
    opts = DecodeOptions(beam=4, chunk_size=4, left_chunks=2)
    graphs = StreamGraphs(model.encoder, opts.chunk_size, opts.left_chunks)
    with torch.inference_mode():
        eager, eager_valid = encode_with_fixed_shapes(FixedShapeStream(model.encoder, 4, 4, 2), feats, lens)
        growing, growing_valid = encode_chunk_by_chunk(model.encoder, feats, lens, 4, 2)
        for _ in range(2):  # the second batch replays the graph captured for the first
            graphed, graphed_valid = encode_with_fixed_shapes(graphs.stream(4), feats, lens)
            assert torch.equal(graphed_valid, eager_valid) and torch.equal(graphed_valid, growing_valid)
            # The same kernels on the same shapes; only a library's choice under capture may differ.
            torch.testing.assert_close(graphed, eager, rtol=1e-5, atol=1e-5)
        tolerance = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 0.05, "atol": 0.05}
        torch.testing.assert_close(graphed[graphed_valid].float(), growing[growing_valid].float(), **tolerance)
        # Through the decoding path, with a second batch size (a second graph).
        with_graphs = decode_batch(model, feats[:3], lens[:3], ["ctc_greedy", "attention_rescoring"], opts, graphs)
        eager3, eager3_valid = encode_with_fixed_shapes(FixedShapeStream(model.encoder, 3, 4, 2), feats[:3], lens[:3])
        assert with_graphs["ctc_greedy"] == ctc_greedy_search(model.ctc.log_softmax(eager3), eager3_valid.sum(1))
        if dtype == torch.float32:
            assert with_graphs == decode_batch(model, feats[:3], lens[:3], ["ctc_greedy", "attention_rescoring"], opts)
    assert sorted(graphs.streams) == [3, 4]

"""Runtime export (inference/export): TorchScript with WeNet's entry points and ONNX, dense and MoE,
equal to the PyTorch model on the same inputs."""
import importlib.util
import json

import numpy as np
import pytest
import torch

from decoding_helpers import tiny_model, units_for
from u2moe.inference.model_file import save_model_file
from u2moe.inference.export.torchscript import script_model, use_export_experts
from u2moe.model.moe import MoEFeedForward
from u2moe.inference.streaming import EncoderStream
from u2moe.model.targets import add_sos_eos, reverse_padded

PRESETS = ["tiny_dense", "tiny_moe"]
HAVE_ONNX = all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime", "onnxscript"))


def small(preset):
    return tiny_model(preset, 0, "model.encoder.num_blocks=2")


def windows(model, chunk, sizes, seed=0):
    """Chunk windows of `sizes` encoder frames each (the last may be shorter)."""
    g = torch.Generator().manual_seed(seed)
    rate, context = model.encoder.embed.subsampling_rate, model.encoder.embed.right_context
    return [torch.randn(1, (n - 1) * rate + context + 1, 80, generator=g) for n in sizes]


def reference_decoder(model, hyps, hyps_lens, memory):
    """log-softmax of both decoders built the training way (targets.py) from <sos> + tokens."""
    body = hyps[:, 1:].clone()
    lens = hyps_lens - 1
    body[torch.arange(body.size(1)).unsqueeze(0) >= lens.unsqueeze(1)] = -1
    ys_in, _ = add_sos_eos(body, lens, model.sos, model.eos)
    r_ys_in, _ = add_sos_eos(reverse_padded(body, lens), lens, model.sos, model.eos)
    n = hyps.size(0)
    mem = memory.expand(n, -1, -1)
    valid = torch.ones(n, mem.size(1), dtype=torch.bool)
    left, right = model.decoder(mem, valid, ys_in, hyps_lens, r_ys_in)
    return left.log_softmax(-1), right.log_softmax(-1)


HYPS = torch.tensor([[255, 3, 4, 5, 9], [255, 7, 0, 0, 0], [255, 8, 8, 2, 0]])
HYPS_LENS = torch.tensor([5, 2, 4])


def test_moe_export_path_equals_reference():
    model = tiny_model("tiny_moe")
    moe = next(m for m in model.modules() if isinstance(m, MoEFeedForward))
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 11, 128, generator=g)
    valid = torch.arange(11).unsqueeze(0) < torch.tensor([[11], [6], [1]])
    with torch.no_grad():
        ref = moe(x, valid)
        with use_export_experts(model):
            out = moe(x, valid)
    assert moe.experts.backend != "export"  # restored
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert torch.equal(out[~valid], torch.zeros_like(out[~valid]))


def test_scripted_moe_layer_runs_only_the_chosen_experts_and_equals_pytorch():
    """The exporters' MoE path (GroupedExperts.forward_sparse), scripted, against the training
    path in eval mode, with padding, without it, and with experts that get no frame."""
    model = tiny_model("tiny_moe")
    moe = next(m for m in model.modules() if isinstance(m, MoEFeedForward))
    scripted = torch.jit.script(moe)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 11, 128, generator=g)
    valid = torch.arange(11).unsqueeze(0) < torch.tensor([[11], [6], [1]])
    with torch.no_grad():
        for mask in (valid, None):
            torch.testing.assert_close(scripted(x, mask), moe(x, mask), rtol=1e-5, atol=1e-6)
        one = x[:1, :1]  # one frame: six of the eight experts get nothing
        torch.testing.assert_close(scripted(one, None), moe(one, None), rtol=1e-5, atol=1e-6)
        assert torch.equal(scripted(x, valid)[~valid], torch.zeros_like(x[~valid]))
    # Sparse: one frame costs two matrix products per chosen expert; the others multiply no rows.
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountProducts(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.name().split("::")[-1].split(".")[0]
            rows = {"mm": 0, "addmm": 1, "bmm": 0}.get(name)
            CountProducts.calls += rows is not None and args[rows].size(0) > 0
            return func(*args, **(kwargs or {}))

    chosen = set(moe.router.select(one.reshape(1, -1))[0].flatten().tolist())
    with torch.no_grad(), CountProducts():
        scripted(one, None)
    assert len(chosen) == 2 and CountProducts.calls == 1 + 2 * len(chosen)  # the router's, then the experts'


@pytest.mark.parametrize("preset", PRESETS)
def test_torchscript_entry_points_equal_pytorch(preset, tmp_path):
    model = small(preset)
    script_model(model).save(str(tmp_path / "final.zip"))
    scripted = torch.jit.load(str(tmp_path / "final.zip"))
    assert scripted.subsampling_rate() == 4 and scripted.right_context() == 6
    assert scripted.sos_symbol() == scripted.eos_symbol() == model.cfg.vocab_size - 1
    assert scripted.is_bidirectional_decoder() is True
    with torch.no_grad():
        for chunk, left in [(4, 2), (4, -1)]:
            stream = EncoderStream(model.encoder, chunk, left)
            att, cnn = torch.zeros(0, 0, 0, 0), torch.zeros(0, 0, 0, 0)
            outs, refs = [], []
            for w in windows(model, chunk, [4, 4, 4, 4, 2]):
                refs.append(stream.step(w))
                out, att, cnn = scripted.forward_encoder_chunk(w, 0, chunk * left, att, cnn)
                outs.append(out)
                assert att.shape == stream.att_cache.squeeze(1).shape
            torch.testing.assert_close(torch.cat(outs, 1), torch.cat(refs, 1), rtol=1e-4, atol=1e-5)
        memory = torch.cat(outs, 1)
        torch.testing.assert_close(scripted.ctc_activation(memory), model.ctc.log_softmax(memory))
        score, r_score = scripted.forward_attention_decoder(HYPS, HYPS_LENS, memory, 0.3)
        ref, r_ref = reference_decoder(model, HYPS, HYPS_LENS, memory)
        valid = torch.arange(HYPS.size(1)).unsqueeze(0) < HYPS_LENS.unsqueeze(1)
        torch.testing.assert_close(score[valid], ref[valid], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(r_score[valid], r_ref[valid], rtol=1e-4, atol=1e-5)
        assert scripted.forward_attention_decoder(HYPS, HYPS_LENS, memory, 0.0)[1].numel() == 1
        # forward: full-context CTC posteriors equal the full forward's.
        feats = torch.randn(1, 67, 80)
        enc, _ = model.encoder(feats, torch.tensor([67]), decoding_chunk_size=-1)
        torch.testing.assert_close(scripted(feats), model.ctc.log_softmax(enc), rtol=1e-4, atol=1e-5)


def test_export_runtime_command_torchscript(tmp_path, capsys):
    from u2moe.__main__ import main

    model = small("tiny_moe")
    cfg = {"model": json.loads(json.dumps(_model_dict(model)))}
    save_model_file(tmp_path / "model.pt", model, cfg, units_for(model.cfg.vocab_size))
    with pytest.raises(SystemExit) as code:
        main(["export-runtime", "--model", str(tmp_path / "model.pt"), "--out", str(tmp_path / "rt")])
    assert code.value.code == 0
    scripted = torch.jit.load(str(tmp_path / "rt" / "final.zip"))
    assert scripted.eos_symbol() == model.eos
    assert (tmp_path / "rt" / "units.txt").read_text().splitlines()[-1] == f"<sos/eos> {model.eos}"


def _model_dict(model):
    from dataclasses import asdict

    return asdict(model.cfg)


@pytest.mark.skipif(not HAVE_ONNX, reason="onnx, onnxruntime and onnxscript (the `export` extra) needed")
@pytest.mark.parametrize("preset", PRESETS)
def test_onnx_encoder_chunk_ctc_and_decoder_equal_pytorch(preset, tmp_path):
    import onnxruntime as ort

    from u2moe.inference.export.onnx import encoder_example, export_onnx

    model = small(preset)
    chunk, left = 4, 2
    # The optimizer pass is slow on this machine: the MoE case runs it, the dense one skips it.
    paths = export_onnx(model, tmp_path, chunk, left, optimize=preset == "tiny_moe")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    enc, ctc, dec = (ort.InferenceSession(str(paths[n]), opts) for n in ("encoder", "ctc", "decoder"))
    _, att, cnn, _ = (x.numpy() for x in encoder_example(model, chunk, left))
    cache = chunk * left
    stream = EncoderStream(model.encoder, chunk, left)
    outs, refs = [], []
    with torch.no_grad():
        for i, w in enumerate(windows(model, chunk, [4, 4, 4, 4, 2], seed=1)):
            refs.append(stream.step(w))
            frames = refs[-1].size(1)
            mask = np.zeros((1, 1, cache + frames), dtype=bool)
            mask[:, :, max(cache - chunk * i, 0):] = True  # real cached frames + this chunk
            out, att, cnn = enc.run(None, {"chunk": w.numpy(), "att_cache": att, "cnn_cache": cnn,
                                           "att_mask": mask})
            outs.append(torch.from_numpy(out))
        memory = torch.cat(refs, 1)
        torch.testing.assert_close(torch.cat(outs, 1), memory, rtol=1e-4, atol=1e-5)
        (probs,) = ctc.run(None, {"hidden": memory.numpy()})
        torch.testing.assert_close(torch.from_numpy(probs), model.ctc.log_softmax(memory), rtol=1e-4, atol=1e-5)
        score, r_score = dec.run(None, {"hyps": HYPS.numpy(), "hyps_lens": HYPS_LENS.numpy(),
                                        "encoder_out": memory.numpy()})
        ref, r_ref = reference_decoder(model, HYPS, HYPS_LENS, memory)
    valid = torch.arange(HYPS.size(1)).unsqueeze(0) < HYPS_LENS.unsqueeze(1)
    torch.testing.assert_close(torch.from_numpy(score)[valid], ref[valid], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.from_numpy(r_score)[valid], r_ref[valid], rtol=1e-4, atol=1e-5)
    meta = ort.InferenceSession(str(paths["encoder"]), opts).get_modelmeta().custom_metadata_map
    assert meta["chunk_size"] == "4" and meta["left_chunks"] == "2" and meta["sos_symbol"] == "255"


def test_onnx_refuses_unlimited_left_context(tmp_path):
    from u2moe.inference.export.onnx import export_onnx

    with pytest.raises(ValueError, match="left-chunks"):
        export_onnx(small("tiny_dense"), tmp_path, 4, -1)

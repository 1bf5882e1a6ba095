"""Shapes, masks and invariances of the encoder and decoder building blocks."""
import math

import pytest
import torch
from op_counting import OpCalls

from u2moe.configs.experiment import load_config
from u2moe.model.attention import MultiHeadedAttention, RelPositionMultiHeadedAttention
from u2moe.model.convolution import ConvolutionModule
from u2moe.model.decoder import TransformerDecoder
from u2moe.model.embedding import RelPositionalEncoding, sinusoid
from u2moe.model.encoder import ConformerEncoder
from u2moe.model.subsampling import Conv2dSubsampling


@pytest.mark.parametrize("rate,context", [(4, 6), (6, 10), (8, 14)])
def test_subsampling_lengths_and_right_context(rate, context):
    sub = Conv2dSubsampling(80, 16, rate)
    assert sub.subsampling_rate == rate and sub.right_context == context
    for t in (context + 1, 50, 101, 257):
        out = sub(torch.randn(2, t, 80))
        assert out.shape == (2, int(sub.output_lengths(torch.tensor(t))), 16)
    # One output frame needs exactly right_context + 1 input frames.
    assert int(sub.output_lengths(torch.tensor(context + 1))) == 1
    assert int(sub.output_lengths(torch.tensor(context))) == 0


def test_rel_shift_maps_distances_to_pairs():
    tq, tk = 3, 5
    p = tk + tq - 1
    scores = torch.arange(2 * 1 * tq * p, dtype=torch.float32).view(2, 1, tq, p)
    out = RelPositionMultiHeadedAttention.rel_shift(scores, tk)
    for i in range(tq):
        for j in range(tk):
            assert torch.equal(out[:, :, i, j], scores[:, :, i, tq - 1 - i + j])


def test_rel_position_attention_matches_direct_formula():
    torch.manual_seed(0)
    heads, dim, t = 2, 8, 5
    att = RelPositionMultiHeadedAttention(heads, dim, 0.0).eval()
    x = torch.randn(1, t, dim)
    _, pos_emb = RelPositionalEncoding(dim, 0.0)(x)
    mask = torch.ones(1, t, t, dtype=torch.bool)
    mask[0, :, 3:] = False  # last two keys are padding
    out, _ = att(x, x, x, mask, pos_emb)

    dk = dim // heads
    q = att.linear_q(x).view(t, heads, dk)
    k = att.linear_k(x).view(t, heads, dk)
    v = att.linear_v(x).view(t, heads, dk)
    ref = torch.zeros(t, heads, dk)
    for h in range(heads):
        for i in range(t):
            scores = []
            for j in range(t):
                rel = att.linear_pos(sinusoid(torch.tensor([i - j]), dim)).view(heads, dk)[h]
                s = (q[i, h] + att.pos_bias_u[h]) @ k[j, h] + (q[i, h] + att.pos_bias_v[h]) @ rel
                scores.append(s / math.sqrt(dk) if mask[0, i, j] else torch.tensor(-math.inf))
            w = torch.softmax(torch.stack(scores), dim=0)
            ref[i, h] = (w.unsqueeze(1) * v[:, h]).sum(0)
    ref = att.linear_out(ref.reshape(1, t, dim))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("inputs", ["self", "memory", "three"])
def test_attention_matches_direct_formula(inputs, training):
    """In training, self-attention and attention over a memory project (q,) k and v as one
    product: each must still get its own projection (also the decoder's cross-attention, its
    cached memory keys and values in inference, and distinct key and value inputs)."""
    torch.manual_seed(0)
    heads, dim, tq, tk = 2, 8, 4, 6
    att = MultiHeadedAttention(heads, dim, 0.0).train(training)
    query = torch.randn(1, tq, dim)
    key = query if inputs == "self" else torch.randn(1, tk, dim)
    value = key if inputs != "three" else torch.randn(1, tk, dim)
    keys = key.size(1)
    mask = torch.ones(1, tq, keys, dtype=torch.bool)
    mask[0, :, -1] = False
    with OpCalls("cat") as cats:
        out, new_cache = att(query, key, value, mask)
    dk = dim // heads
    q, k, v = (lin(x).view(-1, heads, dk) for lin, x in
               ((att.linear_q, query), (att.linear_k, key), (att.linear_v, value)))
    if training:  # no cache built: only the joint weights and biases are joined
        assert new_cache.numel() == 0 and cats.calls == (0 if inputs == "three" else 2)
    else:  # the keys and values, for chunk-by-chunk decoding
        torch.testing.assert_close(new_cache[0], torch.cat([k, v], dim=-1).transpose(0, 1))
    ref = torch.zeros(tq, heads, dk)
    for h in range(heads):
        for i in range(tq):
            scores = torch.stack([q[i, h] @ k[j, h] / math.sqrt(dk) if mask[0, i, j] else torch.tensor(-math.inf)
                                  for j in range(keys)])
            ref[i, h] = (torch.softmax(scores, dim=0).unsqueeze(1) * v[:, h]).sum(0)
    ref = att.linear_out(ref.reshape(1, tq, dim))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    if inputs == "memory":  # the incremental decoder's path: keys and values projected once
        torch.testing.assert_close(att.attend_projected(query, att.project_key_value(key), mask), ref,
                                   rtol=1e-5, atol=1e-5)


def test_causal_convolution_ignores_the_future():
    torch.manual_seed(0)
    conv = ConvolutionModule(8, 5, causal=True, norm="layer_norm").eval()
    x = torch.randn(1, 12, 8)
    y, cache = conv(x)
    x2 = x.clone()
    x2[:, 7:] += 10.0
    y2, _ = conv(x2)
    torch.testing.assert_close(y[:, :7], y2[:, :7])
    assert not torch.allclose(y[:, 7:], y2[:, 7:])
    assert cache.shape == (1, 8, 4)


@pytest.mark.parametrize("causal,norm", [(True, "layer_norm"), (False, "layer_norm"), (False, "batch_norm")])
def test_convolution_zeroes_padding_with_one_mask_inversion(causal, norm):
    """A padded utterance's real frames come out as if it were alone (for a centred kernel,
    whose right context reaches into the padding too), padded frames zero."""
    torch.manual_seed(0)
    conv = ConvolutionModule(8, 5, causal=causal, norm=norm).eval()
    with torch.no_grad():
        conv.pointwise_conv1.bias.uniform_(1.0, 2.0)  # a bias that would show through the padding
    x = torch.randn(2, 12, 8)
    x[1, 7:] = torch.randn(5, 8) * 100  # whatever the padding holds
    valid = torch.arange(12) < torch.tensor([[12], [7]])
    with OpCalls("bitwise_not") as inversions:
        y, _ = conv(x, valid)
    assert inversions.calls == 1
    assert not y[1, 7:].any()
    alone, _ = conv(x[1:, :7])
    torch.testing.assert_close(y[1:, :7], alone)


def _encoder(preset="tiny_moe", **overrides):
    cfg = load_config(preset, [f"model.encoder.{k}={v}" for k, v in overrides.items()]).model.encoder
    torch.manual_seed(0)
    return ConformerEncoder(cfg).eval()


@pytest.mark.parametrize("preset,overrides", [("tiny_dense", {}), ("tiny_moe", {}),
                                              ("tiny_dense", {"causal": "false", "cnn_module_norm": "batch_norm"})])
@pytest.mark.parametrize("chunk", [0, 4])
def test_encoder_output_of_a_padded_batch_equals_each_utterance_alone(preset, overrides, chunk):
    enc = _encoder(preset, **overrides)
    lengths = torch.tensor([97, 64, 23])
    feats = torch.randn(3, 97, 80)
    with torch.no_grad():
        out, valid = enc(feats, lengths, decoding_chunk_size=chunk)
        assert out.shape[:2] == valid.shape
        for b, n in enumerate(lengths.tolist()):
            alone, alone_valid = enc(feats[b:b + 1, :n], lengths[b:b + 1], decoding_chunk_size=chunk)
            frames = int(alone_valid.sum())
            assert int(valid[b].sum()) == frames
            torch.testing.assert_close(out[b, :frames], alone[0], rtol=1e-4, atol=1e-5)


def test_chunk_mask_limits_what_an_encoder_frame_sees():
    enc = _encoder("tiny_dense")
    feats = torch.randn(1, 81, 80)
    lengths = torch.tensor([81])
    with torch.no_grad():
        out, _ = enc(feats, lengths, decoding_chunk_size=4)
        changed = feats.clone()
        changed[:, 60:] += 3.0  # input frame 60 first reaches output frame 14 (4x, 7-frame window)
        out2, _ = enc(changed, lengths, decoding_chunk_size=4)
    # Frames of chunks 0..2 (output 0..11) cannot see output frames >= 12.
    torch.testing.assert_close(out[:, :12], out2[:, :12])
    assert not torch.allclose(out[:, 12:], out2[:, 12:])


def test_decoder_is_causal_and_padding_invariant():
    cfg = load_config("tiny_moe").model
    torch.manual_seed(0)
    dec = TransformerDecoder(cfg.vocab_size, cfg.encoder.output_size, 2, cfg.decoder).eval()
    memory = torch.randn(2, 10, cfg.encoder.output_size)
    memory_valid = torch.tensor([[True] * 10, [True] * 6 + [False] * 4])
    ys = torch.randint(1, cfg.vocab_size - 1, (2, 6))
    lens = torch.tensor([6, 4])
    with torch.no_grad():
        logits = dec(memory, memory_valid, ys, lens)
        assert logits.shape == (2, 6, cfg.vocab_size)
        ys2 = ys.clone()
        ys2[:, 3:] = 1
        torch.testing.assert_close(dec(memory, memory_valid, ys2, lens)[:, :3], logits[:, :3])
        alone = dec(memory[1:, :6], memory_valid[1:, :6], ys[1:, :4], lens[1:])
        torch.testing.assert_close(logits[1, :4], alone[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("precision", ["fp32", "autocast", "bf16"])
def test_decoder_makes_its_masks_additive_once_for_all_layers(precision):
    """A decoder forward turns its two masks into additive biases once (two masked_fills for
    any number of layers; before, three operators per attention call), in the dtype attention
    runs in (no cast of a mask inside attention), with the outputs of its layers run on the
    boolean masks."""
    cfg = load_config("tiny_dense").model
    torch.manual_seed(0)
    dec = TransformerDecoder(cfg.vocab_size, cfg.encoder.output_size, 3, cfg.decoder).eval()
    memory = torch.randn(2, 10, cfg.encoder.output_size)
    if precision == "bf16":  # the whole model in bf16 (ds_configs/zero0_pure_bf16.json)
        dec, memory = dec.to(torch.bfloat16), memory.to(torch.bfloat16)
    memory_valid = torch.tensor([[True] * 10, [True] * 6 + [False] * 4])
    ys = torch.randint(1, cfg.vocab_size - 1, (2, 6))
    lens = torch.tensor([6, 4])
    tgt_valid = torch.arange(6) < lens.unsqueeze(1)
    tgt_mask = tgt_valid.unsqueeze(1) & torch.ones(6, 6, dtype=torch.bool).tril()

    def on_boolean_masks():  # the layers each making their own bias
        x = dec.pos_enc(dec.embed(ys))
        for layer in dec.decoders:
            x = layer(x, tgt_mask, memory, memory_valid.unsqueeze(1), tgt_valid)
        return dec.output_layer(dec.after_norm(x))

    def counted(forward):  # each in its own autocast region: no weight casts cached from the other
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "autocast"), \
                OpCalls("masked_fill") as fills, OpCalls("_to_copy") as casts:
            out = forward()
        return out, fills.calls, casts.calls

    logits, fills, casts = counted(lambda: dec(memory, memory_valid, ys, lens))
    want, layer_fills, layer_casts = counted(on_boolean_masks)
    assert (fills, layer_fills) == (2, 2 * len(dec.decoders))
    assert casts == layer_casts
    assert torch.equal(logits, want)


@pytest.mark.parametrize("keep, expected", [(None, "False"), ("1", "True")])
def test_cli_takes_cudnn_attention_out_unless_asked(keep, expected):
    """cuDNN attention plans every new shape (docs/training.md); `u2moe` turns it off for its
    process, U2MOE_CUDNN_ATTENTION=1 keeps it. Read back from torch's own switch."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "U2MOE_CUDNN_ATTENTION"}
    if keep:
        env["U2MOE_CUDNN_ATTENTION"] = keep
    code = ("import torch\nfrom u2moe.__main__ import main\n"
            "try:\n    main(['params', '--config', 'tiny_dense'])\nexcept SystemExit:\n    pass\n"
            "print(torch.backends.cuda.cudnn_sdp_enabled())")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == expected

"""Masks against direct constructions."""
import torch

from u2moe.model.mask import (attention_mask, choose_chunk, make_pad_mask, subsequent_chunk_mask,
                              subsequent_mask)


def _direct_chunk_mask(size, chunk, left):
    ref = torch.zeros(size, size, dtype=torch.bool)
    for i in range(size):
        c = i // chunk
        first_chunk = 0 if left < 0 else max(c - left, 0)
        for j in range(size):
            ref[i, j] = first_chunk * chunk <= j < min((c + 1) * chunk, size)
    return ref


def test_pad_mask():
    mask = make_pad_mask(torch.tensor([3, 1, 0]), 4)
    expected = torch.tensor([[0, 0, 0, 1], [0, 1, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(mask, expected)
    assert torch.equal(make_pad_mask(torch.tensor([3, 1, 0])), expected[:, :3])  # T = the longest
    if torch.cuda.is_available():  # with the padded length given, no device read
        lengths = torch.tensor([3, 1, 0], device="cuda")
        torch.cuda.set_sync_debug_mode("error")
        try:
            on_gpu = make_pad_mask(lengths, 4)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert torch.equal(on_gpu.cpu(), expected)


def test_subsequent_mask():
    m = subsequent_mask(5)
    for i in range(5):
        for j in range(5):
            assert m[i, j] == (j <= i)


def test_chunk_mask_matches_direct_construction():
    for size in (1, 7, 16, 23):
        for chunk in (1, 2, 4, 5, 16, 30):
            for left in (-1, 0, 1, 3):
                assert torch.equal(subsequent_chunk_mask(size, chunk, left), _direct_chunk_mask(size, chunk, left)), (size, chunk, left)


def test_attention_mask_combines_padding_and_chunks():
    valid = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    m = attention_mask(valid, 2, 1)
    chunk = _direct_chunk_mask(6, 2, 1)
    for b in range(2):
        for i in range(6):
            for j in range(6):
                assert m[b, i, j] == (bool(valid[b, j]) and bool(chunk[i, j]))
    full = attention_mask(valid, 0, -1)
    assert torch.equal(full[1, 4], valid[1])


def test_dynamic_chunk_choice_distribution():
    g = torch.Generator().manual_seed(0)
    kw = dict(use_dynamic_chunk=True, use_dynamic_left_chunk=True, max_chunk_size=25,
              full_context_prob=0.5, static_chunk_size=0, decoding_chunk_size=0,
              num_decoding_left_chunks=-1, training=True, generator=g)
    draws = [choose_chunk(100, **kw) for _ in range(2000)]
    full = sum(c == 0 for c, _ in draws)
    assert 900 < full < 1100
    chunks = {c for c, _ in draws if c > 0}
    assert chunks == set(range(1, 26))
    for c, left in draws:
        if c > 0:
            assert 0 <= left <= (100 - 1) // c


def test_static_and_decoding_chunk_choice():
    kw = dict(use_dynamic_chunk=False, use_dynamic_left_chunk=False, max_chunk_size=25,
              full_context_prob=0.5, num_decoding_left_chunks=2)
    assert choose_chunk(50, static_chunk_size=8, decoding_chunk_size=0, training=True, **kw) == (8, -1)
    assert choose_chunk(50, static_chunk_size=0, decoding_chunk_size=16, training=False, **kw) == (16, 2)
    assert choose_chunk(50, static_chunk_size=0, decoding_chunk_size=-1, training=False, **kw) == (0, -1)
    assert choose_chunk(50, static_chunk_size=8, decoding_chunk_size=0, training=False, **kw) == (8, 2)

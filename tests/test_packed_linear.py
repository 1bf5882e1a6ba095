"""Decoding's packed-weight feed-forwards (model/packed_linear.py), dense and MoE, against a
direct float64 computation from the same weights; and when the packed copies are (re)made."""
import copy
import pickle

import pytest
import torch

from u2moe.configs.model import FeedForwardConfig
from u2moe.model.feed_forward import PositionwiseFeedForward
from u2moe.model.moe import MoEFeedForward

DIM, HIDDEN = 16, 40
BF16 = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
# (dtype, rtol, atol relative to the output's largest entry)
DTYPES = [(torch.float32, 1e-5, 1e-5),
          pytest.param(torch.bfloat16, 2e-2, 2e-2,
                       marks=pytest.mark.skipif(not BF16, reason="oneDNN runs no bf16 on this CPU"))]


def moe_layer(num_experts: int, top_k: int) -> MoEFeedForward:
    torch.manual_seed(num_experts * 10 + top_k)
    cfg = FeedForwardConfig(type="moe", hidden_units=HIDDEN, activation="swish", dropout_rate=0.1,
                            num_experts=num_experts, top_k=top_k)
    return MoEFeedForward(DIM, cfg).eval()


@torch.no_grad()
def moe_direct(moe: MoEFeedForward, x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Each real frame through its top-k experts (fp32 logits, as the router makes them), in
    float64; padded frames zero."""
    ex = moe.experts
    flat = x.reshape(-1, DIM)
    out = torch.zeros(flat.shape, dtype=torch.float64)
    logits = flat.float() @ moe.router.weight.float().t()
    for n in range(flat.size(0)):
        if valid is not None and not valid.reshape(-1)[n]:
            continue
        top, ids = logits[n].topk(moe.top_k)
        for w, e in zip(top.double().softmax(0), ids.tolist()):
            h = ex.activation(flat[n].double() @ ex.w1[e].double() + ex.b1[e].double())
            out[n] += w * (h @ ex.w2[e].double() + ex.b2[e].double())
    return out.view(x.shape)


@torch.no_grad()
def dense_direct(ffn: PositionwiseFeedForward, x: torch.Tensor) -> torch.Tensor:
    h = ffn.activation(x.double() @ ffn.w_1.weight.double().t() + ffn.w_1.bias.double())
    return h @ ffn.w_2.weight.double().t() + ffn.w_2.bias.double()


def assert_close(y: torch.Tensor, ref: torch.Tensor, rtol: float, atol: float) -> None:
    torch.testing.assert_close(y.double(), ref, rtol=rtol, atol=atol * float(ref.abs().max().clamp_min(1.0)))


@pytest.mark.parametrize("dtype,rtol,atol", DTYPES)
@pytest.mark.parametrize("num_experts,top_k", [(1, 1), (4, 2), (8, 2), (3, 3)])
@pytest.mark.parametrize("padded,static_shapes", [(False, False), (True, False), (True, True)])
def test_moe_decoding_matches_direct_computation(dtype, rtol, atol, num_experts, top_k, padded, static_shapes):
    moe = moe_layer(num_experts, top_k).to(dtype)
    moe.use_static_shapes(static_shapes)
    x = torch.randn(3, 7, DIM).to(dtype)
    valid = torch.arange(7)[None] < torch.tensor([[7], [4], [0]]) if padded else None
    with torch.inference_mode():
        y = moe(x, valid)
    assert moe.experts.packed.source is not None, "decoding took the packed path"
    assert y.dtype == dtype
    assert_close(y, moe_direct(moe, x, valid), rtol, atol)
    if padded:
        assert torch.all(y[~valid] == 0)


def test_experts_without_frames_are_skipped():
    moe = moe_layer(8, 1)
    with torch.no_grad():  # every frame to expert 3: the other seven get no rows
        moe.router.weight.zero_()
        moe.router.weight[3] = 1.0
    x = torch.rand(2, 5, DIM) + 0.1
    with torch.inference_mode():
        y = moe(x)
        empty = moe(x, torch.zeros(2, 5, dtype=torch.bool))
    assert_close(y, moe_direct(moe, x, None), 1e-5, 1e-5)
    assert torch.all(empty == 0)


@pytest.mark.parametrize("dtype,rtol,atol", DTYPES)
def test_dense_decoding_matches_direct_computation(dtype, rtol, atol):
    torch.manual_seed(0)
    ffn = PositionwiseFeedForward(DIM, HIDDEN, "relu", 0.1).eval().to(dtype)
    x = torch.randn(2, 9, DIM).to(dtype)
    with torch.inference_mode():
        y = ffn(x)
    assert ffn.packed.source is not None, "decoding took the packed path"
    assert y.shape == x.shape and y.dtype == dtype
    assert_close(y, dense_direct(ffn, x), rtol, atol)


def test_packed_weights_follow_the_parameters():
    """An in-place change (an optimizer step) or a new dtype packs again."""
    moe = moe_layer(4, 2)
    x = torch.randn(1, 6, DIM)
    with torch.inference_mode():
        moe(x)
    with torch.no_grad():
        moe.experts.w1.mul_(-2.0)
        moe.experts.w2.add_(0.5)
    with torch.inference_mode():
        y = moe(x)
    assert_close(y, moe_direct(moe, x, None), 1e-5, 1e-5)
    moe.double()  # no packing in float64: the reference backend's products (fp32 routing weights)
    with torch.inference_mode():
        assert_close(moe(x.double()), moe_direct(moe, x.double(), None), 1e-6, 1e-6)


def test_packing_only_when_decoding_and_copies_carry_none():
    moe = moe_layer(4, 2)
    ffn = PositionwiseFeedForward(DIM, HIDDEN, "swish", 0.0).eval()
    x = torch.randn(1, 5, DIM)
    with torch.no_grad():  # gradient-free but not inference mode: a training run's evaluation
        moe(x)
        ffn(x)
    moe.train()
    with torch.inference_mode():
        moe(x)
    assert moe.experts.packed.source is None and ffn.packed.source is None
    moe.eval()
    keys = set(moe.state_dict()) | set(ffn.state_dict())
    with torch.inference_mode():
        y_moe, y_ffn = moe(x), ffn(x)
    assert moe.experts.packed.source is not None and ffn.packed.source is not None
    assert set(moe.state_dict()) | set(ffn.state_dict()) == keys
    for clone in (copy.deepcopy(moe), pickle.loads(pickle.dumps(moe))):
        assert clone.experts.packed.source is None
        with torch.inference_mode():
            torch.testing.assert_close(clone(x), y_moe)
    with torch.inference_mode():
        torch.testing.assert_close(copy.deepcopy(ffn)(x), y_ffn)

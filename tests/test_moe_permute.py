"""The token dispatcher's gathers and weighted sums: the PyTorch ops and Triton's single-pass
kernels (compiled on a GPU, in Triton's interpreter on CPU; tests/conftest.py) against a direct
loop over rows, and the whole MoE layer run with either."""
import pytest
import torch
from test_moe_backends import gpu, needs_triton_interpreter

from u2moe.configs.model import FeedForwardConfig
from u2moe.model.moe import MoEFeedForward, dispatcher
from u2moe.model.moe.backends import GEMMS, ReferenceGemm
from u2moe.model.moe.dispatcher import TorchPermuteOps


def triton_ops():
    from u2moe.model.moe.triton_permute import TritonPermuteOps

    return TritonPermuteOps


CPU_OPS = [pytest.param(lambda: TorchPermuteOps, id="torch"),
           pytest.param(triton_ops, id="triton", marks=needs_triton_interpreter)]


def loop_gather_sum(src, rows, weights):
    out = torch.zeros(rows.size(0), src.size(1), dtype=torch.float64)
    for n in range(rows.size(0)):
        for j in range(rows.size(1)):
            out[n] += (1.0 if weights is None else float(weights[n, j])) * src[rows[n, j]].double()
    return out


@pytest.mark.parametrize("make_ops", CPU_OPS)
@pytest.mark.parametrize("dim", [24, 40, 1100])  # 1100: more than one 1024-column block a row
@pytest.mark.parametrize("top_k", [1, 2, 3])
@pytest.mark.parametrize("weighted", [True, False])
def test_gather_sum_and_scale_rows_match_a_loop_over_rows(make_ops, dim, top_k, weighted):
    ops = make_ops()
    torch.manual_seed(dim + top_k)
    frames = 7
    rows = torch.randperm(frames * top_k).view(frames, top_k)
    src = torch.randn(frames * top_k, dim)
    weights = torch.rand(frames, top_k) if weighted else None
    got = ops.gather_sum(src, rows, weights)
    torch.testing.assert_close(got.double(), loop_gather_sum(src, rows, weights), rtol=1e-5, atol=1e-5)

    grad = torch.randn(frames, dim)
    row_frames = torch.randint(0, frames, (frames * top_k,))
    row_weights = torch.rand(frames * top_k)
    y = torch.randn(frames * top_k, dim)
    out, dot = ops.scale_rows(grad, row_frames, row_weights, y if weighted else None)
    for r in range(frames * top_k):
        g = grad[row_frames[r]].double()
        torch.testing.assert_close(out[r].double(), row_weights[r].double() * g, rtol=1e-5, atol=1e-5)
        if weighted:
            torch.testing.assert_close(dot[r].double(), (y[r].double() * g).sum(), rtol=1e-5, atol=1e-4)
    assert dot is None or dot.dtype == torch.float32


@pytest.mark.parametrize("make_ops", CPU_OPS)
@pytest.mark.parametrize("top_k", [1, 2])
def test_rows_from_the_limit_on_count_as_zero_whatever_they_hold(make_ops, top_k):
    """Unrouted rows (skipped padding) hold whatever the grouped products left there: NaN here."""
    ops = make_ops()
    torch.manual_seed(top_k)
    frames, dim, limit = 7, 40, 5
    rows = torch.randperm(frames * top_k).view(frames, top_k)
    past = (torch.arange(frames * top_k) >= limit).unsqueeze(1)
    src = torch.randn(frames * top_k, dim).masked_fill(past, float("nan"))
    weights = torch.rand(frames, top_k)
    limit_t = torch.tensor([limit], dtype=torch.int32)
    got = ops.gather_sum(src, rows, weights, limit_t)
    torch.testing.assert_close(got.double(), loop_gather_sum(src.masked_fill(past, 0), rows, weights),
                               rtol=1e-5, atol=1e-5)
    grad = torch.randn(frames, dim)
    row_frames = torch.randint(0, frames, (frames * top_k,))
    row_weights = torch.rand(frames * top_k)
    out, dot = ops.scale_rows(grad, row_frames, row_weights, src, limit_t)
    torch.testing.assert_close(out, row_weights.unsqueeze(1) * grad[row_frames])
    want = (src.masked_fill(past, 0).double() * grad[row_frames].double()).sum(dim=1)
    torch.testing.assert_close(dot.double(), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("make_ops", CPU_OPS)
def test_no_rows(make_ops):
    ops = make_ops()
    src = torch.randn(0, 16)
    assert ops.gather_sum(src, torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2)).shape == (0, 16)
    out, dot = ops.scale_rows(src, torch.zeros(0, dtype=torch.long), torch.zeros(0), src)
    assert out.shape == (0, 16) and dot.shape == (0,)


def layer_outputs(device, dtype, num_experts, top_k, dim, frames, static_shapes=False, backend=None):
    """The layer's output and every gradient on a padded batch, from seed 0."""
    torch.manual_seed(0)
    cfg = FeedForwardConfig(type="moe", hidden_units=2 * dim, dropout_rate=0.0,
                            num_experts=num_experts, top_k=top_k)
    moe = MoEFeedForward(dim, cfg).to(device, dtype)
    moe.use_static_shapes(static_shapes)
    if backend is not None:
        moe.experts.backend = backend
    x = torch.randn(3, frames, dim, device=device, dtype=dtype, requires_grad=True)
    valid = torch.arange(frames, device=device)[None] < torch.tensor(
        [[frames], [frames // 2], [1]], device=device)
    y = moe(x, valid)
    y.backward(torch.randn_like(y))
    return [y, x.grad, *(p.grad for p in moe.parameters())]


@needs_triton_interpreter
@pytest.mark.parametrize("num_experts,top_k", [(4, 1), (8, 2)])
def test_layer_with_triton_permute_equals_torch_permute_on_cpu(num_experts, top_k, monkeypatch):
    monkeypatch.setattr(dispatcher, "permute_ops", lambda x: TorchPermuteOps)
    ref = layer_outputs("cpu", torch.float32, num_experts, top_k, 16, 21)
    monkeypatch.setattr(dispatcher, "permute_ops", lambda x: triton_ops())
    got = layer_outputs("cpu", torch.float32, num_experts, top_k, 16, 21)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


class NaNTailGemm(ReferenceGemm):
    """The reference products, unrouted rows' outputs NaN: torch._grouped_mm leaves them as it
    found the memory, which may be anything."""

    @staticmethod
    def linear(x, w, b, groups):
        y, saved = ReferenceGemm.linear(x, w, b, groups)
        return y.index_fill(0, torch.arange(groups.num_routed, y.size(0)), float("nan")), saved

    @staticmethod
    def input_grad(grad, w, groups):
        out = ReferenceGemm.input_grad(grad, w, groups)
        return out.index_fill(0, torch.arange(groups.num_routed, out.size(0)), float("nan"))


@pytest.mark.parametrize("make_ops", CPU_OPS)
@pytest.mark.parametrize("num_experts,top_k", [(4, 1), (8, 2)])
def test_skipped_padding_equals_removed_padding(make_ops, num_experts, top_k, monkeypatch):
    """Static shapes (padding kept in place, skipped) give the outputs and gradients of padding
    removed first, though the experts leave NaN in the unrouted rows."""
    monkeypatch.setattr(dispatcher, "permute_ops", lambda x: make_ops())
    monkeypatch.setitem(GEMMS, "nan_tail", NaNTailGemm)
    ref = layer_outputs("cpu", torch.float32, num_experts, top_k, 16, 21)
    got = layer_outputs("cpu", torch.float32, num_experts, top_k, 16, 21, static_shapes=True,
                        backend="nan_tail")
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("num_experts,top_k", [(4, 1), (8, 2)])
def test_gpu_layer_with_triton_permute_equals_torch_permute_bf16(num_experts, top_k, monkeypatch):
    monkeypatch.setattr(dispatcher, "permute_ops", lambda x: TorchPermuteOps)
    ref = layer_outputs("cuda", torch.bfloat16, num_experts, top_k, 256, 300)
    monkeypatch.setattr(dispatcher, "permute_ops", lambda x: triton_ops())
    got = layer_outputs("cuda", torch.bfloat16, num_experts, top_k, 256, 300)
    for g, r in zip(got, ref):
        scale = r.float().abs().max().clamp_min(1e-6)
        assert ((g.float() - r.float()).abs().max() / scale) < 2e-2

"""The router's top-k softmax and the `grouped_mm` backend's bias ops: the Triton kernels
(compiled on a GPU, in Triton's interpreter on CPU; tests/conftest.py) against the PyTorch ops and
direct computations, alone and inside the whole MoE layer."""
import pytest
import torch
from test_moe_backends import compare_backends, gpu, needs_triton_interpreter
from test_moe_permute import layer_outputs

from u2moe.model.moe import backends, router
from u2moe.model.moe.backends import TorchBiasOps
from u2moe.model.moe.router import torch_top_k_softmax

DEVICES = [pytest.param("cpu", marks=needs_triton_interpreter),
           pytest.param("cuda", marks=[pytest.mark.gpu, gpu])]


def triton_top_k_softmax(logits, top_k):
    from u2moe.model.moe.triton_router import TritonTopKSoftmax

    return TritonTopKSoftmax.apply(logits, top_k)


def triton_bias():
    from u2moe.model.moe.triton_bias import TritonBiasOps

    return TritonBiasOps


@pytest.mark.parametrize("device", DEVICES)
# 6 experts: not a power of two (masked columns); 150 frames: a partial last block of frames.
@pytest.mark.parametrize("num_experts,top_k", [(8, 2), (4, 1), (6, 3), (16, 2)])
def test_top_k_softmax_matches_topk_and_softmax(device, num_experts, top_k):
    torch.manual_seed(num_experts + top_k)
    logits = torch.randn(150, num_experts, device=device, requires_grad=True)
    ids, weights = triton_top_k_softmax(logits, top_k)
    ref_logits = logits.detach().clone().requires_grad_(True)
    ref_ids, ref_weights = torch_top_k_softmax(ref_logits, top_k)
    assert ids.dtype == torch.int64 and torch.equal(ids, ref_ids)  # descending, as topk
    torch.testing.assert_close(weights, ref_weights, rtol=1e-6, atol=1e-6)
    grad = torch.randn_like(weights)
    weights.backward(grad)
    ref_weights.backward(grad)
    torch.testing.assert_close(logits.grad, ref_logits.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_top_k_softmax_ties_go_to_the_lower_expert_and_no_frames_run(device):
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0]], device=device)
    ids, weights = triton_top_k_softmax(logits, 2)
    assert ids.tolist() == [[1, 2], [0, 1]]
    torch.testing.assert_close(weights, torch.full((2, 2), 0.5, device=device))
    ids, weights = triton_top_k_softmax(torch.zeros(0, 8, device=device), 2)
    assert ids.shape == (0, 2) and weights.shape == (0, 2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k,n", [(24, 64), (1100, 40)])  # 1100: more than one 1024-column block
def test_bias_kernels_equal_the_pytorch_ops(device, k, n):
    torch.manual_seed(k)
    x, w, b = (torch.randn(shape, device=device) for shape in ((37, k), (3, k, n), (3, n)))
    wide = triton_bias().widen_rows(x, 8)
    assert torch.equal(wide, TorchBiasOps.widen_rows(x, 8))
    assert torch.equal(wide[:, :k], x) and torch.all(wide[:, k:] == 1)
    wide_w = triton_bias().widen_weight(w, b, 8)
    assert torch.equal(wide_w, TorchBiasOps.widen_weight(w, b, 8))
    assert torch.equal(wide_w[:, :k], w) and torch.equal(wide_w[:, k], b)
    assert torch.all(wide_w[:, k + 1:] == 0)
    assert triton_bias().widen_rows(x[:0], 8).shape == (0, k + 8)
    # Expert 3 of 3: unrouted rows (skipped padding), which get no bias.
    y, row_expert = torch.randn(37, n, device=device), torch.randint(0, 4, (37,), device=device)
    got = triton_bias().add_group_bias_(y.clone(), b, row_expert)
    assert torch.equal(got, TorchBiasOps.add_group_bias_(y.clone(), b, row_expert))
    assert torch.equal(got, y + torch.stack([b[e] if e < 3 else 0 * b[0] for e in row_expert.tolist()]))


@needs_triton_interpreter
@pytest.mark.parametrize("num_experts,top_k", [(4, 1), (8, 2)])
@pytest.mark.parametrize("hidden", [24, 64])  # 64: the second layer's bias added, not folded
def test_grouped_mm_layer_with_triton_bias_on_cpu(num_experts, top_k, hidden, monkeypatch):
    monkeypatch.setattr(backends, "bias_ops", lambda x: triton_bias())
    compare_backends("grouped_mm", num_experts, top_k, True, "cpu", torch.float32, 1e-5, 1e-5, hidden)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_experts,top_k", [(4, 1), (8, 2)])
def test_layer_with_triton_top_k_equals_torch_top_k(device, num_experts, top_k, monkeypatch):
    monkeypatch.setattr(router, "top_k_softmax", torch_top_k_softmax)
    ref = layer_outputs(device, torch.float32, num_experts, top_k, 16, 21)
    monkeypatch.setattr(router, "top_k_softmax", triton_top_k_softmax)
    got = layer_outputs(device, torch.float32, num_experts, top_k, 16, 21)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)

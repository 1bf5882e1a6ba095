"""Each expert compute backend against the reference backend: forward and all gradients.

On CPU, `reference` is the production path (its equality with the per-frame loop is
tests/test_moe.py) and `grouped_mm` also runs, in fp32. The Triton kernels run only on a GPU
(marker `gpu`, every backend in bf16): Triton 3.6's CPU interpreter fails on loops with runtime
bounds under numpy 2.x ("only 0-dimensional arrays can be converted to Python scalars").
"""
import pytest
import torch

from u2moe.model.config import FeedForwardConfig
from u2moe.model.moe import MoEFeedForward

CASES = [(1, 1), (2, 1), (4, 2), (8, 1), (8, 2)]


def make_layer(num_experts: int, top_k: int, dim: int = 16, hidden: int = 24) -> MoEFeedForward:
    torch.manual_seed(num_experts * 10 + top_k)
    cfg = FeedForwardConfig(type="moe", hidden_units=hidden, activation="swish", dropout_rate=0.0,
                            num_experts=num_experts, top_k=top_k)
    return MoEFeedForward(dim, cfg)


def run_backend(moe: MoEFeedForward, backend: str, x: torch.Tensor, valid, grad_out):
    moe.experts.backend = backend
    moe.zero_grad(set_to_none=True)
    xi = x.detach().clone().requires_grad_(True)
    y = moe(xi, valid)
    y.backward(grad_out)
    return [y.detach(), xi.grad, *(p.grad for p in moe.parameters())]


def compare_backends(backend: str, num_experts: int, top_k: int, padded: bool,
                     device: str, dtype: torch.dtype, rtol: float, atol: float) -> None:
    moe = make_layer(num_experts, top_k).to(device, dtype)
    x = torch.randn(3, 21, 16, device=device, dtype=dtype)
    valid = None
    if padded:
        valid = torch.arange(21, device=device)[None] < torch.tensor([[21], [9], [0]], device=device)
    grad_out = torch.randn_like(x)
    ref = run_backend(moe, "reference", x, valid, grad_out)
    got = run_backend(moe, backend, x, valid, grad_out)
    names = ["y", "x.grad", *(n for n, _ in moe.named_parameters())]
    for name, g, r in zip(names, got, ref):
        # atol scales with the tensor: in bf16 the backends round the pre-activation at
        # different points (fused bias epilogue or not), one ulp of a large entry.
        torch.testing.assert_close(g.float(), r.float(), rtol=rtol,
                                   atol=atol * float(r.float().abs().max().clamp_min(1.0)),
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("num_experts,top_k", CASES)
@pytest.mark.parametrize("padded", [False, True])
def test_grouped_mm_backend_on_cpu(num_experts, top_k, padded):
    compare_backends("grouped_mm", num_experts, top_k, padded, "cpu", torch.float32, 1e-5, 1e-5)


def test_empty_expert_groups_and_no_frames():
    moe = make_layer(8, 1)
    with torch.no_grad():  # route every frame to expert 3: seven experts get no rows
        moe.router.weight.zero_()
        moe.router.weight[3] = 1.0
    x = torch.rand(2, 5, 16) + 0.1
    valid = torch.zeros(2, 5, dtype=torch.bool)
    valid[0, :3] = True
    for backend in ("reference", "grouped_mm"):
        moe.experts.backend = backend
        y = moe(x, valid)
        assert moe.last_tokens_per_expert.tolist() == [0, 0, 0, 3, 0, 0, 0, 0]
        y.sum().backward()
        assert moe.experts.w1.grad[3].abs().sum() > 0
        assert moe.experts.w1.grad[[0, 1, 2, 4, 5, 6, 7]].abs().sum() == 0
        moe.zero_grad(set_to_none=True)
        # A batch with no real frame at all still runs, backward included.
        y = moe(x, torch.zeros_like(valid))
        assert torch.all(y == 0)
        y.sum().backward()
        assert moe.experts.w1.grad.abs().sum() == 0
        moe.zero_grad(set_to_none=True)


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("backend", ["grouped_mm", "triton"])
@pytest.mark.parametrize("num_experts,top_k", CASES)
@pytest.mark.parametrize("padded", [False, True])
def test_gpu_backend_matches_reference_bf16(backend, num_experts, top_k, padded):
    compare_backends(backend, num_experts, top_k, padded, "cuda", torch.bfloat16, 2e-2, 2e-2)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("backend", ["grouped_mm", "triton"])
def test_gpu_backend_large_groups_bf16(backend):
    """Shapes of the benchmark scale: many tiles per group, uneven groups, K and N multi-tile."""
    torch.manual_seed(0)
    cfg = FeedForwardConfig(type="moe", hidden_units=512, dropout_rate=0.0, num_experts=8, top_k=2)
    moe = MoEFeedForward(256, cfg).to("cuda", torch.bfloat16)
    x = torch.randn(4, 700, 256, device="cuda", dtype=torch.bfloat16)
    valid = torch.arange(700, device="cuda")[None] < torch.tensor([[700], [513], [77], [1]], device="cuda")
    grad_out = torch.randn_like(x)
    ref = run_backend(moe, "reference", x, valid, grad_out)
    got = run_backend(moe, backend, x, valid, grad_out)
    for g, r in zip(got, ref):
        # Relative to the tensor's scale: bf16 rounding of long reductions.
        scale = r.float().abs().max().clamp_min(1e-6)
        assert ((g.float() - r.float()).abs().max() / scale) < 2e-2

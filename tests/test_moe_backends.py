"""Each expert compute backend against the reference backend: forward and all gradients.

On CPU, `reference` is the production path (its equality with the per-frame loop is
tests/test_moe.py); `grouped_mm` also runs there, and the Triton kernels run in Triton's
interpreter (tests/conftest.py), all in fp32. On a GPU (marker `gpu`) every backend runs
compiled, in bf16: the interpreter has no bf16 arithmetic.
"""
import os

import pytest
import torch

from u2moe.configs.model import FeedForwardConfig
from u2moe.model.moe import MoEFeedForward

CASES = [(1, 1), (2, 1), (4, 2), (8, 1), (8, 2)]
# Triton takes CPU tensors only in its interpreter, which tests/conftest.py turns on where there
# is no GPU; on a GPU machine the Triton kernels are tested on the GPU instead.
TRITON_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
needs_triton_interpreter = pytest.mark.skipif(not TRITON_INTERPRETED,
                                              reason="Triton on CPU tensors needs its interpreter")
CPU_BACKENDS = ["grouped_mm", pytest.param("triton", marks=needs_triton_interpreter)]


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
                     device: str, dtype: torch.dtype, rtol: float, atol: float, hidden: int = 24) -> None:
    moe = make_layer(num_experts, top_k, hidden=hidden).to(device, dtype)
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


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("num_experts,top_k", CASES)
@pytest.mark.parametrize("padded", [False, True])
# 24 and 64 hidden units at dim 16: grouped_mm multiplies both layers' biases in, or the
# second layer's (K = 64 >= 2 N) by a gather.
@pytest.mark.parametrize("hidden", [24, 64])
def test_backend_matches_reference_on_cpu(backend, num_experts, top_k, padded, hidden):
    compare_backends(backend, num_experts, top_k, padded, "cpu", torch.float32, 1e-5, 1e-5, hidden)


def test_empty_expert_groups_and_no_frames():
    moe = make_layer(8, 1)
    with torch.no_grad():  # route every frame to expert 3: seven experts get no rows
        moe.router.weight.zero_()
        moe.router.weight[3] = 1.0
    x = torch.rand(2, 5, 16) + 0.1
    valid = torch.zeros(2, 5, dtype=torch.bool)
    valid[0, :3] = True
    for backend in ("reference", "grouped_mm") + (("triton",) if TRITON_INTERPRETED else ()):
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


def compare_large_groups(backend: str, device: str, dtype: torch.dtype, dim: int, hidden: int,
                         frames: int, tol: float) -> None:
    """Many row tiles per group, uneven groups, K and N over several tiles, partial edge tiles."""
    torch.manual_seed(0)
    cfg = FeedForwardConfig(type="moe", hidden_units=hidden, dropout_rate=0.0, num_experts=8, top_k=2)
    moe = MoEFeedForward(dim, cfg).to(device, dtype)
    x = torch.randn(4, frames, dim, device=device, dtype=dtype)
    lengths = torch.tensor([[frames], [frames * 3 // 4], [frames // 9], [1]], device=device)
    valid = torch.arange(frames, device=device)[None] < lengths
    grad_out = torch.randn_like(x)
    ref = run_backend(moe, "reference", x, valid, grad_out)
    got = run_backend(moe, backend, x, valid, grad_out)
    assert int(moe.last_tokens_per_expert.min()) > 128  # more than one 128-row tile per group
    for g, r in zip(got, ref):
        # Relative to the tensor's scale: rounding of long reductions.
        scale = r.float().abs().max().clamp_min(1e-6)
        assert ((g.float() - r.float()).abs().max() / scale) < tol


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_backend_large_groups_on_cpu(backend):
    compare_large_groups(backend, "cpu", torch.float32, dim=48, hidden=160, frames=360, tol=1e-5)


@needs_triton_interpreter
@pytest.mark.parametrize("index", range(8))
def test_every_triton_tile_shape_on_cpu(index, monkeypatch):
    """Each tile shape the autotuner may pick on a GPU (the interpreter runs only the first)."""
    from u2moe.model.moe import triton_grouped_gemm as tgg

    assert len(tgg._ROWS_CONFIGS) == len(tgg._WGRAD_CONFIGS) == 8
    monkeypatch.setattr(tgg._grouped_rows_kernel, "configs", [tgg._ROWS_CONFIGS[index]])
    monkeypatch.setattr(tgg._grouped_weight_grad_kernel, "configs", [tgg._WGRAD_CONFIGS[index]])
    compare_large_groups("triton", "cpu", torch.float32, dim=48, hidden=160, frames=360, tol=1e-5)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("backend", ["grouped_mm", "triton"])
def test_gpu_backend_large_groups_bf16(backend):
    compare_large_groups(backend, "cuda", torch.bfloat16, dim=256, hidden=512, frames=700, tol=2e-2)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("backend", ["grouped_mm", "triton"])
def test_graphed_bench_step_gives_the_eager_gradients(backend):
    """`u2moe bench moe --cuda-graphs` times replays of one captured step: each replay must do
    the eager step's work (padded batch: the graph skips padding in place, eager removes it first), and
    write the gradients afresh rather than add to them, also while an older graph of the input
    is alive."""
    import copy

    from u2moe.bench.moe_layer import graphed_train_step

    torch.manual_seed(0)
    cfg = FeedForwardConfig(type="moe", hidden_units=512, dropout_rate=0.0, num_experts=8, top_k=2)
    eager = MoEFeedForward(256, cfg).to("cuda", torch.bfloat16)
    eager.experts.backend = backend
    graphed = copy.deepcopy(eager)
    graphed.use_static_shapes(True)
    x = torch.randn(4, 300, 256, device="cuda", dtype=torch.bfloat16)
    valid = torch.arange(300, device="cuda")[None] < torch.tensor([[300], [200], [50], [1]], device="cuda")
    grad = torch.randn_like(x)
    x_ref = x.clone().requires_grad_()
    eager(x_ref, valid).backward(grad)
    reference = [x_ref.grad] + [p.grad for p in eager.parameters()]
    x_graph = x.clone().requires_grad_()
    # A graph of the input made on the default stream and still held, as DeepSpeed's MoE keeps
    # its aux loss when the bench times it first: the capture must not depend on it.
    held = (x_graph * 2).sum()
    replay = graphed_train_step(graphed, x_graph, lambda t: graphed(t, valid), grad)
    del held
    for _ in range(2):
        replay()
        torch.cuda.synchronize()
        for got, ref in zip([x_graph.grad] + [p.grad for p in graphed.parameters()], reference):
            scale = ref.float().abs().max().clamp_min(1e-6)
            assert ((got.float() - ref.float()).abs().max() / scale) < 2e-2

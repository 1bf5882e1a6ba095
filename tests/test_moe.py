"""The MoE feed-forward against a slow per-frame loop, forward and gradients."""
import pytest
import torch

from u2moe.configs.model import FeedForwardConfig
from u2moe.model.moe import MoEFeedForward


def _reference(moe: MoEFeedForward, x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Each real frame through its top-k experts one at a time, weighted by the softmax over
    the chosen logits; padded frames stay zero."""
    ex = moe.experts
    out = torch.zeros_like(x)
    for b in range(x.size(0)):
        for t in range(x.size(1)):
            if valid is not None and not valid[b, t]:
                continue
            frame = x[b, t]
            logits = moe.router.weight.double() @ frame.double()
            top, ids = torch.topk(logits, moe.top_k)
            weights = torch.exp(top - top.max())
            weights = weights / weights.sum()
            acc = torch.zeros_like(frame)
            for w, e in zip(weights, ids.tolist()):
                h = ex.activation(frame @ ex.w1[e] + ex.b1[e])
                acc = acc + w.to(frame.dtype) * (h @ ex.w2[e] + ex.b2[e])
            out[b, t] = acc
    return out


def _layer(num_experts, top_k, dim=12, hidden=20):
    torch.manual_seed(num_experts * 10 + top_k)
    cfg = FeedForwardConfig(type="moe", hidden_units=hidden, activation="swish", dropout_rate=0.0,
                            num_experts=num_experts, top_k=top_k)
    return MoEFeedForward(dim, cfg).double()


@pytest.mark.parametrize("num_experts,top_k", [(1, 1), (2, 1), (4, 2), (8, 1), (8, 2), (3, 3)])
@pytest.mark.parametrize("padded,static_shapes", [(False, False), (True, False), (True, True)])
def test_moe_matches_per_frame_loop(num_experts, top_k, padded, static_shapes):
    """Also with padded frames kept in place and skipped (CUDA graphs' static shapes): the same
    outputs and gradients."""
    moe = _layer(num_experts, top_k)
    moe.use_static_shapes(static_shapes)
    x = torch.randn(3, 7, 12, dtype=torch.float64, requires_grad=True)
    valid = None
    if padded:
        valid = torch.arange(7).unsqueeze(0) < torch.tensor([[7], [4], [1]])
    y = moe(x, valid)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = _reference(moe, x_ref, valid)
    torch.testing.assert_close(y, y_ref)

    grad_out = torch.randn_like(y)
    params = [x, *moe.parameters()]
    grads = torch.autograd.grad((y * grad_out).sum(), params, allow_unused=True)
    ref_params = [x_ref, *moe.parameters()]
    ref_grads = torch.autograd.grad((y_ref * grad_out).sum(), ref_params, allow_unused=True)
    # The router computes in fp32 by design, so gradients through the routing weights carry
    # fp32 rounding even though the rest of this test runs in float64.
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


def test_padded_frames_get_no_expert_and_zero_output():
    moe = _layer(8, 2)
    x = torch.randn(2, 6, 12, dtype=torch.float64)
    valid = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    y = moe(x, valid)
    assert torch.all(y[~valid] == 0)
    # Every routed pair comes from a real frame: top_k per real frame, none for padding.
    assert int(moe.last_tokens_per_expert.sum()) == 2 * int(valid.sum())
    # Changing what sits in the padding changes nothing in the real frames.
    x2 = x.clone()
    x2[~valid] = 1e3
    torch.testing.assert_close(moe(x2, valid)[valid], y[valid])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")])])
def test_autocast_output_dtype_does_not_depend_on_padding(device):
    """fp32 frames under bf16 autocast: the layer answers in autocast's dtype with a padding mask
    as without one (a mask made the output fp32 on CPU, and failed on CUDA: index_copy of the
    real frames' bf16 rows into fp32 zeros)."""
    moe = _layer(4, 2).float().to(device)
    x = torch.randn(2, 6, 12, device=device)
    valid = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        masked, full = moe(x, valid), moe(x, None)
    assert masked.dtype == full.dtype == torch.bfloat16
    assert torch.all(masked[~valid] == 0)
    torch.testing.assert_close(masked[valid], full[valid], rtol=2e-2, atol=2e-2)


def test_router_is_bias_free_and_softmax_over_selected_logits():
    moe = _layer(8, 2)
    assert [n for n, _ in moe.router.named_parameters()] == ["weight"]
    x = torch.randn(5, 12, dtype=torch.float64)
    routing = moe.router(x)
    logits = x.float() @ moe.router.weight.float().T
    top = logits.topk(2, dim=-1).values
    torch.testing.assert_close(routing.weights, torch.softmax(top, dim=-1))
    assert routing.weights.dtype == torch.float32
    assert routing.aux_loss is None


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")])])
def test_bf16_router_logits_are_the_fp32_logits(device):
    """bf16 frames and weight (ZeRO bf16): fp32 logits equal to the product of fp64 copies up to
    fp32 rounding, and bf16 gradients within bf16 rounding of the fp64 ones."""
    from u2moe.model.moe.router import router_logits

    torch.manual_seed(0)
    x = torch.randn(300, 256, device=device).bfloat16().requires_grad_(True)
    weight = torch.randn(8, 256, device=device).bfloat16().requires_grad_(True)
    logits = router_logits(x, weight)
    assert logits.dtype == torch.float32 and logits.shape == (300, 8)
    x64, w64 = x.detach().double().requires_grad_(True), weight.detach().double().requires_grad_(True)
    ref = x64 @ w64.t()
    torch.testing.assert_close(logits.double(), ref, rtol=1e-6, atol=1e-5)
    grad = torch.randn_like(logits)
    logits.backward(grad)
    ref.backward(grad.double())
    for got, want in ((x.grad, x64.grad), (weight.grad, w64.grad)):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.double(), want, rtol=1e-2, atol=1e-2 * float(want.abs().max()))


def test_balancing_loss_is_one_for_uniform_routing():
    from u2moe.model.moe.router import TopKRouter

    router = TopKRouter(4, 4, 1, aux_loss_weight=1.0)
    with torch.no_grad():
        router.weight.copy_(torch.eye(4))
    x = torch.eye(4) * 5  # frame i goes to expert i
    routing = router(x)
    assert routing.expert_ids.squeeze(1).tolist() == [0, 1, 2, 3]
    torch.testing.assert_close(routing.aux_loss, torch.tensor(1.0))


def test_skipped_frames_route_nowhere_and_stay_out_of_the_balancing_loss():
    """Padding kept in place (static shapes): expert id E, and the loss of the kept frames alone."""
    from u2moe.model.moe.router import TopKRouter

    torch.manual_seed(0)
    router = TopKRouter(12, 8, 2, aux_loss_weight=1.0)
    x = torch.randn(20, 12)
    skip = torch.arange(20) % 3 == 0
    routing = router(x, skip)
    kept = router(x[~skip])
    assert torch.all(routing.expert_ids[skip] == 8)
    assert torch.equal(routing.expert_ids[~skip], kept.expert_ids)
    torch.testing.assert_close(routing.aux_loss, kept.aux_loss)


def test_expert_counts_match_bincount_without_host_reads():
    from u2moe.model.moe.router import count_per_expert

    ids = torch.tensor([3, 0, 3, 5, 0, 3], dtype=torch.int64)
    torch.testing.assert_close(count_per_expert(ids, 8), torch.bincount(ids, minlength=8))
    empty = torch.zeros(0, dtype=torch.int64)
    torch.testing.assert_close(count_per_expert(empty, 4), torch.zeros(4, dtype=torch.int64))
    if torch.cuda.is_available():
        on_gpu = ids.cuda()
        torch.cuda.set_sync_debug_mode("error")
        try:
            count_per_expert(on_gpu, 8)
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_expert_groups_from_sorted_ids_match_bincount_without_host_reads():
    from u2moe.model.moe.backends import ExpertGroups

    ids = torch.tensor([3, 0, 3, 5, 0, 3, 7], dtype=torch.int64).sort().values
    groups = ExpertGroups.from_sorted(ids, 8)
    torch.testing.assert_close(groups.counts, torch.bincount(ids, minlength=8))
    assert groups.offsets.dtype == torch.int32
    assert groups.offsets.tolist() == torch.bincount(ids, minlength=8).cumsum(0).tolist()
    assert ExpertGroups.from_sorted(torch.zeros(0, dtype=torch.int64), 4).counts.tolist() == [0] * 4
    if torch.cuda.is_available():
        torch.cuda.set_sync_debug_mode("error")
        try:
            ExpertGroups.from_sorted(ids.cuda(), 8).counts
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("activation", ["swish", "relu", "gelu"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_expert_ffn_matches_direct_composition_and_numerical_gradients(activation, dropout):
    """The experts' fused forward and hand-written backward (ExpertFFN), float64: the forward
    against nn's own layers row by row, the backward against finite differences; dropout
    included (the generator is reseeded before each evaluation, so the mask repeats)."""
    import torch.nn.functional as F

    from u2moe.model.activation import ACTIVATIONS
    from u2moe.model.moe.backends import ExpertGroups, ReferenceGemm
    from u2moe.model.moe.experts import ExpertFFN

    torch.manual_seed(0)
    # Expert 2 gets no rows; inputs shifted off relu's kink keep finite differences valid.
    groups = ExpertGroups.from_sorted(torch.tensor([0, 0, 1, 1, 1, 3, 3]), 4)
    x = (torch.randn(7, 5, dtype=torch.float64) + 0.05).requires_grad_(True)
    w1, b1 = torch.randn(4, 5, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    w2, b2 = torch.randn(4, 6, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    weights = [t.requires_grad_(True) for t in (w1, b1, w2, b2)]

    def run(*inputs):
        torch.manual_seed(1)
        return ExpertFFN.apply(*inputs, groups, ReferenceGemm, activation, dropout, torch.float64)

    rows = groups.row_expert
    torch.manual_seed(1)
    h = torch.einsum("mk,mkn->mn", x, w1[rows]) + b1[rows]
    direct = F.dropout(ACTIVATIONS[activation]()(h), dropout, training=True)
    direct = torch.einsum("mk,mkn->mn", direct, w2[rows]) + b2[rows]
    torch.testing.assert_close(run(x, *weights), direct)
    assert torch.autograd.gradcheck(run, (x, *weights), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_compiled_conformer_layer_with_moe_equals_eager():
    """train.compile compiles each layer; its MoE runs eagerly inside (data-dependent shapes).
    Outputs and gradients equal the eager layer's, at two lengths (dynamic shapes)."""
    import copy

    from u2moe.configs.experiment import load_config
    from u2moe.model import U2Model

    torch.manual_seed(0)
    cfg = load_config("tiny_moe", [f"model.encoder.{k}=0.0" for k in
                                   ("dropout_rate", "attention_dropout_rate", "ffn.dropout_rate")])
    model = U2Model(cfg.model).train()
    eager = model.encoder.encoders[0]
    compiled = copy.deepcopy(eager)
    compiled.compile(dynamic=True)
    dim = cfg.model.encoder.output_size
    for t in (23, 17):
        x = torch.randn(2, t, dim)
        valid = torch.arange(t)[None] < torch.tensor([t, t - 5])[:, None]
        pos = model.encoder.pos_enc.eval()(x)[1]
        outs, grads = [], []
        for layer in (eager, compiled):
            layer.zero_grad(set_to_none=True)
            y = layer(x, valid.unsqueeze(1), pos, valid)[0]
            y.square().sum().backward()
            outs.append(y.detach())
            grads.append(layer.feed_forward.experts.w1.grad.clone())
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-5)


def test_moe_layers_of_one_forward_share_the_padding_removal(monkeypatch):
    """Every MoE layer of one encoder (or decoder) forward gets the same padding mask: they find
    its real frames once, in the stack that runs them (`nonzero` reads a count to the host, a
    synchronisation on a GPU), and
    each forward's new mask is found anew. Loss and gradients equal a model whose layers each
    find their own."""
    from op_counting import OpCalls
    from u2moe.configs.experiment import load_config
    from u2moe.model import U2Model
    from u2moe.model import decoder as decoder_module
    from u2moe.model import encoder as encoder_module

    cfg = load_config("tiny_moe").model
    torch.manual_seed(0)
    model = U2Model(cfg).train()
    moe_calls = len(model.moe_layers())  # each runs once per forward

    def batch(seed):
        g = torch.Generator().manual_seed(seed)
        lens = torch.tensor([100, 83, 61])
        target = torch.randint(1, cfg.vocab_size - 1, (3, 6), generator=g)
        target[1, 4:] = target[2, 2:] = -1
        return torch.randn(3, 100, 80, generator=g), lens, target, torch.tensor([6, 4, 2])

    def loss_and_grads(seed):
        torch.manual_seed(1)  # the same dropout and dynamic-chunk draws in both runs
        loss = model(*batch(seed))["loss"]
        return loss.detach(), torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad],
                                                  allow_unused=True)

    for seed in (0, 1):  # a second forward, with new masks, finds them anew
        with OpCalls("nonzero") as nonzero:
            shared = loss_and_grads(seed)
        assert nonzero.calls <= 3 < moe_calls  # encoder, left and right decoder masks
        with monkeypatch.context() as patch:  # no stack-wide positions: every layer finds its own
            for stack in (encoder_module, decoder_module):
                patch.setattr(stack, "stack_real_frames", lambda layers, valid: None)
            with OpCalls("nonzero") as nonzero:
                alone = loss_and_grads(seed)
        assert nonzero.calls == moe_calls
        torch.testing.assert_close(shared[0], alone[0], rtol=0, atol=0)
        for a, b in zip(shared[1], alone[1]):
            assert (a is None) == (b is None) and (a is None or torch.equal(a, b))

"""bf16 compute weights: autocast's arithmetic, bit for bit on the CPU, without its per-step weight casts."""
from __future__ import annotations

import copy

import pytest
import torch
from op_counting import OpCalls
from test_trainer import NO_DROPOUT
from u2moe.configs.experiment import load_config
from u2moe.model import U2Model
from u2moe.trainer.compute_weights import Bf16ComputeWeights


def _batch(device):
    g = torch.Generator().manual_seed(1)
    batch = (torch.randn(3, 120, 80, generator=g), torch.tensor([120, 97, 60]),
             torch.randint(1, 200, (3, 9), generator=g), torch.tensor([9, 7, 4]))
    return tuple(t.to(device) for t in batch)


def _autocast_step(model, batch, compute_weights=None):
    """One forward (seeded: dynamic chunk training draws a chunk size) and backward; returns
    the loss and the number of dtype casts dispatched."""
    counter = OpCalls("_to_copy")
    device = batch[0].device.type
    torch.manual_seed(0)
    with counter:
        if compute_weights is None:
            with torch.autocast(device, dtype=torch.bfloat16):
                loss = model(*batch)["loss"]
            loss.backward()
        else:
            compute_weights.refresh()
            with compute_weights.swapped_in(), torch.autocast(device, dtype=torch.bfloat16):
                loss = model(*batch)["loss"]
            loss.backward()
            compute_weights.move_grads()
    return loss.detach(), counter.calls


def _same(got, want, device):
    """Bit for bit on the CPU; on CUDA, whose CTC and scatter backwards add with atomics in any
    order, within what that order can move through bf16 rounding."""
    if device == "cpu":
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, rtol=2e-2, atol=1e-3 * float(want.abs().max()))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])])
@pytest.mark.parametrize("preset", ["tiny_dense", "tiny_moe"])
def test_compute_weights_give_autocasts_gradients_bit_for_bit_with_fewer_casts(preset, device):
    torch.manual_seed(0)
    reference = U2Model(load_config(preset, NO_DROPOUT).model).to(device)
    model = copy.deepcopy(reference)
    weights = Bf16ComputeWeights(model)
    batch = _batch(device)
    for step in range(2):  # the second after an update: the copies follow the parameters
        want, reference_casts = _autocast_step(reference, batch)
        got, casts = _autocast_step(model, batch, weights)
        _same(got, want, device)
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            assert p.grad.dtype == torch.float32, name
            _same(p.grad, q.grad, device)
        assert all(c.grad is None for c in weights.copies)
        # A lowered weight's forward cast and its gradient's cast back are gone (two per weight,
        # fewer where training attention casts q, k, v weights once, concatenated); the copies'
        # refresh and the gradients' move are one multi-tensor launch each.
        assert casts <= reference_casts - len(weights.params)
        with torch.no_grad():
            for m in (model, reference):
                for p in m.parameters():
                    p.sub_(0.01 * p.grad)
                m.zero_grad(set_to_none=True)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    # The router's gate runs in fp32 by design: it keeps its own fp32 weight.
    assert not any(p is router.weight for m in model.modules() if hasattr(m, "router")
                   for router in [m.router] for p in weights.params)


def _bf16_reference(model):
    """The model as DeepSpeed's bf16 engine holds it, but with the trainer's fp32 exceptions:
    every weight in bf16 except the routers' gates and batch norms."""
    from u2moe.model.moe.router import TopKRouter

    reference = copy.deepcopy(model)
    for module in reference.modules():
        if not isinstance(module, (TopKRouter, torch.nn.modules.batchnorm._BatchNorm)):
            for name, param in module.named_parameters(recurse=False):
                setattr(module, name, torch.nn.Parameter(param.detach().to(torch.bfloat16)))
    return reference


def _bf16_backward(model, batch, compute_weights=None):
    torch.manual_seed(0)
    feats, *rest = batch
    if compute_weights is None:
        loss = model(feats.to(torch.bfloat16), *rest)["loss"]
        loss.backward()
    else:
        compute_weights.refresh()
        with compute_weights.swapped_in():
            loss = model(feats.to(torch.bfloat16), *rest)["loss"]
        loss.backward()
        compute_weights.move_grads()
    return loss.detach()


@pytest.mark.parametrize("preset,sets", [("tiny_dense", ["model.encoder.causal=false", "model.encoder.cnn_module_norm=batch_norm"]),
                                         ("tiny_moe", [])])
def test_whole_model_weights_run_the_bf16_model_on_fp32_parameters(preset, sets):
    """whole_model=True (bf16 without ZeRO, run by the trainer): the losses and gradients of
    the model held in bf16 (as DeepSpeed's bf16 engine holds it), bit for bit, on fp32 parameters;
    two micro-batches accumulate in fp32; the router's gate and batch norms stay fp32."""
    torch.manual_seed(0)
    model = U2Model(load_config(preset, [*NO_DROPOUT, *sets]).model)
    weights = Bf16ComputeWeights(model, whole_model=True)
    kept = {id(p) for m in model.modules() if type(m).__name__ in ("TopKRouter", "BatchNorm1d")
            for p in m.parameters()}
    assert kept and all(id(p) not in kept for p in weights.params)
    assert len(weights.params) + len(kept) == len(list(model.parameters()))
    batch, second = _batch("cpu"), tuple(t.flip(0) for t in _batch("cpu"))
    for step in range(2):  # the second after an update: the copies follow the parameters
        reference = _bf16_reference(model)
        want = [_bf16_backward(reference, batch)]
        want_grads = {n: p.grad.float() for n, p in reference.named_parameters()}
        reference.zero_grad(set_to_none=True)
        want.append(_bf16_backward(reference, second))
        for n, p in reference.named_parameters():
            want_grads[n] += p.grad.float()  # a second micro-batch, summed in fp32
        got = [_bf16_backward(model, batch, weights), _bf16_backward(model, second, weights)]
        assert all(torch.equal(g, w) for g, w in zip(got, want))
        for name, param in model.named_parameters():
            assert param.dtype == param.grad.dtype == torch.float32, name
            assert torch.equal(param.grad, want_grads[name]), name
        with torch.no_grad():
            for p in model.parameters():
                p.sub_(0.01 * p.grad)
        model.zero_grad(set_to_none=True)

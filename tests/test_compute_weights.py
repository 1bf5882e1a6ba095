"""bf16 compute weights: autocast's arithmetic, bit for bit on the CPU, without its per-step weight casts."""
from __future__ import annotations

import copy

import pytest
import torch
from op_counting import OpCalls
from test_trainer import NO_DROPOUT
from u2moe.config import load_config
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

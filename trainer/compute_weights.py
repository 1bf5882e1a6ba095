"""bf16 copies of the weights that autocast would cast in every step, kept from step to step.

Under `torch.autocast`, each Linear, convolution and expert weight is cast to bf16 in every
forward and its gradient cast back to fp32 in every backward: two launches per weight and step,
a fifth of a small model's operators, all paid by a host-bound step (docs/RESULTS.md, issue 10).
Here the training forward runs on bf16 copies of those weights instead. After the backward their
gradients move to the fp32 parameters in one multi-tensor copy, before clipping and the optimizer;
before the next forward the copies are refreshed from the updated parameters in another. The
arithmetic is autocast's: the same bf16 weights go in, the same bf16 gradients come out and are
widened to fp32. Parameters, optimizer, checkpoints and exports stay fp32.

Only for one process without ZeRO and without gradient accumulation: with several processes
DeepSpeed reduces the parameters' gradients inside its backward, before they are moved here, and
accumulating micro-batches in the bf16 copies would round where autocast's fp32 gradients do not.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from u2moe.model.moe.experts import GroupedExperts

# Modules whose weights autocast runs in bf16 (the router's gate is a bare parameter, in fp32).
_LOWERED = (nn.Linear, nn.Conv1d, nn.Conv2d, GroupedExperts)


class Bf16ComputeWeights:
    def __init__(self, model: nn.Module):
        self.slots = [(module, name, param) for module in model.modules() if isinstance(module, _LOWERED)
                      for name, param in module.named_parameters(recurse=False) if param.requires_grad]
        self.params = [param for _, _, param in self.slots]
        self.copies = [nn.Parameter(param.detach().to(torch.bfloat16)) for param in self.params]
        # The parameters' gradients live in one buffer, handed out again every step (the optimizer's
        # zero_grad drops them): no allocation per parameter and step.
        buffer = torch.empty(sum(p.numel() for p in self.params), dtype=torch.float32,
                             device=self.params[0].device if self.params else None)
        self.grads = [view.view_as(p) for view, p in
                      zip(buffer.split([p.numel() for p in self.params]), self.params)]

    def refresh(self) -> None:
        """Copies from the parameters (after an optimizer step, a resume or a warm start)."""
        with torch.no_grad():
            torch._foreach_copy_(self.copies, self.params)

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Modules hold the bf16 copies for the forward (no launches: dictionary entries)."""
        for (module, name, _), copy in zip(self.slots, self.copies):
            module._parameters[name] = copy
        try:
            yield
        finally:
            for module, name, param in self.slots:
                module._parameters[name] = param

    def move_grads(self) -> None:
        """The copies' gradients, widened, become the parameters' (fresh, as after zero_grad)."""
        moved, widened = [], []
        for param, copy, grad in zip(self.params, self.copies, self.grads):
            if copy.grad is not None:
                param.grad = grad
                moved.append(copy.grad)
                widened.append(grad)
                copy.grad = None
        if moved:
            torch._foreach_copy_(widened, moved)

"""bf16 copies of the weights, kept from step to step, for the two one-process bf16 modes.

Under `torch.autocast`, each Linear, convolution and expert weight is cast to bf16 in every
forward and its gradient cast back to fp32 in every backward: two launches per weight and step,
a large share of a small model's operators, all paid by a host-bound step.
Here the training forward runs on bf16 copies of those weights instead. After the backward their
gradients move to the fp32 parameters in one multi-tensor copy (or add, while micro-batches
accumulate), before clipping and the optimizer; before the next forward the copies are refreshed
from the updated parameters in another. The arithmetic is autocast's: the same bf16 weights go
in, the same bf16 gradients come out and are widened to fp32.

`whole_model=True` is DeepSpeed's bf16 mode (`"bf16": {"enabled": true}`) without ZeRO, run by
the trainer: every weight has a bf16 copy and the model runs in bf16 without autocast (bf16
activations, as DeepSpeed's bf16 engine and WeNet's DeepSpeed recipes run), on fp32 master
weights and AdamW states. That drops autocast's casts of activations as well, around every layer
norm and softmax it keeps in fp32. Kept fp32: the router's gate (routing is decided in fp32,
model/moe/router.py) and batch norms (their running statistics are fp32 buffers).

Parameters, optimizer, checkpoints and exports stay fp32. Only for one process without ZeRO:
with several processes DeepSpeed reduces the parameters' gradients inside its backward, before
they are moved here.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..model.moe.experts import GroupedExperts
from ..model.moe.router import TopKRouter

# Modules whose weights autocast runs in bf16 (the router's gate is a bare parameter, in fp32).
_LOWERED = (nn.Linear, nn.Conv1d, nn.Conv2d, GroupedExperts)
# Modules whose weights stay fp32 in a whole-model bf16 forward.
_KEPT_FP32 = (TopKRouter, nn.modules.batchnorm._BatchNorm)


class Bf16ComputeWeights:
    def __init__(self, model: nn.Module, whole_model: bool = False):
        def copied(module: nn.Module) -> bool:
            return not isinstance(module, _KEPT_FP32) if whole_model else isinstance(module, _LOWERED)

        self.slots = [(module, name, param) for module in model.modules() if copied(module)
                      for name, param in module.named_parameters(recurse=False)
                      if param.requires_grad and param.is_floating_point()]
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
        """The copies' gradients, widened, become the parameters' (fresh, as after zero_grad),
        or are added to them while micro-batches accumulate (in fp32, as autocast's are)."""
        moved, widened, added, summed = [], [], [], []
        for param, copy, grad in zip(self.params, self.copies, self.grads):
            if copy.grad is None:
                continue
            if param.grad is None:
                param.grad = grad
                moved.append(copy.grad)
                widened.append(grad)
            else:
                added.append(copy.grad)
                summed.append(param.grad)
            copy.grad = None
        if moved:
            torch._foreach_copy_(widened, moved)
        if added:
            torch._foreach_add_(summed, added)

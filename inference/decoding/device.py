"""Placing a model for inference: device and weight dtype."""
from __future__ import annotations

import torch

from ...model.asr_model import U2Model

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def prepare_model(model: U2Model, device: str, dtype: str) -> U2Model:
    """The model in eval mode on `device`, every weight and buffer in `dtype`; inputs must be
    cast to the same dtype (`model_dtype`)."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r} (choose from {', '.join(DTYPES)})")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine")
    return model.to(device=device, dtype=DTYPES[dtype]).eval()


def model_dtype(model: U2Model) -> torch.dtype:
    return model.ctc.ctc_lo.weight.dtype

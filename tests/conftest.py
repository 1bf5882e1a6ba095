"""Session-wide test set-up."""
import os

import torch

# Without a GPU, Triton kernels run in Triton's CPU interpreter (numpy; fp32 only), so that the
# tests of our Triton grouped GEMM (tests/test_moe_backends.py) run in CPU-only CI as well. It
# must be set before `triton.jit` wraps the kernels, i.e. before their module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

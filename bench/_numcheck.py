"""Gradients of a preset on the GPU (bf16, default SDPA kernels; fp32 default kernels) against fp32
with SDPA's math kernel: cosine per parameter, worst encoder ones."""
import copy, sys
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
sys.path.insert(0, sys.argv[1])
from test_trainer import NO_DROPOUT
from test_cuda_graphs import _batch
from u2moe.config import load_config
from u2moe.model import U2Model
from u2moe.model.attention import avoid_per_shape_attention_plans

avoid_per_shape_attention_plans()
for preset, heads in [("small_dense", None), ("big_dense", None), ("big_dense", 6), ("big_dense", 16)]:
    sets = list(NO_DROPOUT) + ([f"model.encoder.attention_heads={heads}", f"model.decoder.attention_heads={heads}"] if heads else [])
    cfg = load_config(preset, sets + ["model.vocab_size=256"])
    torch.manual_seed(0)
    ref = U2Model(cfg.model).cuda()
    runs = {}
    for name, dtype, kernel in (("fp32-math", torch.float32, SDPBackend.MATH), ("fp32-default", torch.float32, None),
                                ("bf16-default", torch.bfloat16, None), ("bf16-math", torch.bfloat16, SDPBackend.MATH)):
        m = copy.deepcopy(ref).to(dtype)
        batch = _batch(16, 600, 30, 256, 1, dtype)
        torch.manual_seed(5)
        if kernel is None:
            out = m(*batch)
        else:
            with sdpa_kernel([kernel]):
                out = m(*batch)
        out["loss"].backward()
        runs[name] = (float(out["loss_ctc"]), {n: p.grad.float() for n, p in m.named_parameters() if p.grad is not None})
    base = runs["fp32-math"][1]
    for name, (ctc, grads) in runs.items():
        cos = {n: float(torch.nn.functional.cosine_similarity(g.flatten(), base[n].flatten(), dim=0)) for n, g in grads.items()}
        worst = sorted((c, n) for n, c in cos.items() if n.startswith("encoder"))[:3]
        print(f"{preset} heads={heads or 'preset'} {name}: loss_ctc {ctc:.3f} worst encoder grad cosines "
              + ", ".join(f"{n} {c:.4f}" for c, n in worst), flush=True)

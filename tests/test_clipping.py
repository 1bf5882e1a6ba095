"""The trainer's own gradient clipping (no ZeRO): norm and clipped gradients against torch's."""
import torch

from u2moe.trainer.clipping import GradClipper


def _model_with_grads(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    model[2].weight.allreduce = False  # an "expert" parameter, as enable_expert_parallel marks them
    model(torch.randn(4, 6)).square().sum().backward()
    return model


def test_norm_and_clipping_match_torch():
    for max_norm in (0.1, 1e6):
        ours, ref = _model_with_grads(0), _model_with_grads(0)
        norm = GradClipper(ours, max_norm, expert_group=None)()
        expected = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm)
        assert expected > 0.1  # the small max_norm clips
        torch.testing.assert_close(norm, expected)
        for a, b in zip(ours.parameters(), ref.parameters()):
            torch.testing.assert_close(a.grad, b.grad)

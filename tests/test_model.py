"""The joint U2++ loss, its helpers, training behaviour, presets and config loading."""
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from u2moe.configs.experiment import load_config, preset_names
from u2moe.configs.loading import ConfigError
from u2moe.model import U2Model
from u2moe.model.label_smoothing import LabelSmoothingLoss
from u2moe.model.params import count_config_parameters
from u2moe.model.targets import add_sos_eos, reverse_padded


def test_add_sos_eos_and_reverse():
    ys = torch.tensor([[5, 6, 7], [8, -1, -1]])
    lens = torch.tensor([3, 1])
    ys_in, ys_out = add_sos_eos(ys, lens, sos=9, eos=9)
    assert ys_in.tolist() == [[9, 5, 6, 7], [9, 8, 9, 9]]
    assert ys_out.tolist() == [[5, 6, 7, 9], [8, 9, -1, -1]]
    assert reverse_padded(ys, lens).tolist() == [[7, 6, 5], [8, -1, -1]]


@pytest.mark.parametrize("normalize_length", [False, True])
def test_label_smoothing_against_direct_sum(normalize_length):
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 6)
    target = torch.tensor([[1, 2, -1], [3, -1, -1]])
    loss = LabelSmoothingLoss(6, 0.1, normalize_length)(logits, target)
    total, tokens = 0.0, 0
    for b in range(2):
        for t in range(3):
            if target[b, t] < 0:
                continue
            q = torch.full((6,), 0.1 / 5)
            q[target[b, t]] = 0.9
            logp = F.log_softmax(logits[b, t], dim=0)
            total += float((q * (q.log() - logp)).sum())
            tokens += 1
    assert loss.item() == pytest.approx(total / (tokens if normalize_length else 2), rel=1e-5)


def _batch(vocab, b=3, t=120, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(b, t, 80, generator=g)
    lens = torch.tensor([t] + [t - 17 * i for i in range(1, b)])
    tl = torch.tensor([8] + [8 - 2 * i for i in range(1, b)])
    target = torch.randint(1, vocab - 1, (b, 8), generator=g)
    target[torch.arange(8).unsqueeze(0) >= tl.unsqueeze(1)] = -1
    return feats, lens, target, tl


def test_joint_loss_is_the_u2pp_combination_of_its_terms():
    cfg = load_config("tiny_moe", ["model.ctc_weight=0.3", "model.reverse_weight=0.4"]).model
    torch.manual_seed(0)
    model = U2Model(cfg).eval()
    feats, lens, target, tl = _batch(cfg.vocab_size)
    with torch.no_grad():
        out = model(feats, lens, target, tl)
        # Independent recomputation of each term from the model's pieces.
        memory, valid = model.encoder(feats, lens)
        ctc = F.ctc_loss(model.ctc.log_softmax(memory).transpose(0, 1), target.clamp(min=0),
                         valid.sum(1), tl, reduction="sum", zero_infinity=True) / 3
        sos = cfg.vocab_size - 1
        ys_in, ys_out = add_sos_eos(target, tl, sos, sos)
        rys_in, rys_out = add_sos_eos(reverse_padded(target, tl), tl, sos, sos)
        l2r = model.criterion_att(model.decoder.left_decoder(memory, valid, ys_in, tl + 1), ys_out)
        r2l = model.criterion_att(model.decoder.right_decoder(memory, valid, rys_in, tl + 1), rys_out)
    torch.testing.assert_close(out["loss_ctc"], ctc)
    torch.testing.assert_close(out["loss_l2r"], l2r)
    torch.testing.assert_close(out["loss_r2l"], r2l)
    expected = 0.3 * ctc + 0.7 * (0.6 * l2r + 0.4 * r2l)
    torch.testing.assert_close(out["loss"], expected)


def test_balancing_loss_is_added_only_when_enabled():
    overrides = ["model.encoder.ffn.aux_loss_weight=0.01", "model.decoder.ffn.aux_loss_weight=0.01"]
    cfg = load_config("tiny_moe", overrides).model
    torch.manual_seed(0)
    model = U2Model(cfg).train()
    out = model(*_batch(cfg.vocab_size))
    n_layers = len(model.moe_layers())
    assert n_layers == 2 * cfg.encoder.num_blocks + cfg.decoder.num_blocks + cfg.decoder.r_num_blocks
    # Each layer's Switch loss is >= 1 (1 when perfectly balanced).
    assert out["loss_moe_aux"].item() >= 0.01 * n_layers - 1e-6
    assert "loss_moe_aux" not in U2Model(load_config("tiny_moe").model)(*_batch(cfg.vocab_size))


@pytest.mark.parametrize("preset", ["tiny_dense", "tiny_moe"])
def test_tiny_model_overfits_a_handful_of_utterances(preset):
    cfg = load_config(preset, ["model.encoder.use_dynamic_chunk=false"]).model
    torch.manual_seed(0)
    model = U2Model(cfg).train()
    batch = _batch(cfg.vocab_size, b=4, t=100, seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    first = None
    for _ in range(80):
        loss = model(*batch)["loss"]
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        final = model(*batch)["loss"].item()
    assert final < first / 10, (first, final)


def test_gradient_checkpointing_keeps_loss_and_gradients_and_saves_memory():
    """Recomputed layers (dropout, dynamic chunks, router all active) give the same loss and
    gradients, while keeping fewer tensors for the backward pass."""
    results = []
    for recompute in (False, True):
        flag = str(recompute).lower()
        cfg = load_config("tiny_moe", [f"model.encoder.gradient_checkpointing={flag}",
                                       f"model.decoder.gradient_checkpointing={flag}"]).model
        torch.manual_seed(0)
        model = U2Model(cfg).train()
        batch = _batch(cfg.vocab_size, b=3, t=120, seed=2)
        saved = []

        def keep(t):
            saved.append(t.numel() * t.element_size())
            return t

        torch.manual_seed(1)
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            loss = model(*batch)["loss"]
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads, sum(saved)))
    (loss_a, grads_a, bytes_a), (loss_b, grads_b, bytes_b) = results
    torch.testing.assert_close(loss_b, loss_a)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], msg=name)
    assert bytes_b < bytes_a / 2, (bytes_a, bytes_b)


def test_preset_parameter_counts():
    dense = count_config_parameters(load_config("dense_225m").model)
    moe = count_config_parameters(load_config("moe_1b").model)
    big = count_config_parameters(load_config("dense_1b").model)
    assert abs(dense["total"] - 225e6) <= 0.03 * 225e6
    assert 1.0e9 <= moe["total"] <= 1.1e9
    assert moe["total"] / dense["total"] == pytest.approx(4.7, abs=0.1)
    assert abs(big["total"] - 1e9) <= 0.05 * 1e9
    # Only the FFNs changed: everything but experts and routers is the dense model's.
    assert moe["total"] - moe["experts"] - moe["routers"] == dense["total"] - _ffn_params(dense, "dense_225m")
    # A frame passes 2 of 8 experts: active = non-expert + experts / 4.
    assert moe["active_per_frame"] == moe["total"] - moe["experts"] + moe["experts"] // 4
    # The small-scale experiment: big_dense has about small_moe's total parameters.
    small_moe, big_dense = (count_config_parameters(load_config(n).model)["total"] for n in ("small_moe", "big_dense"))
    assert big_dense == pytest.approx(small_moe, rel=0.02)
    for name in ("tiny_dense", "tiny_moe"):
        assert count_config_parameters(load_config(name).model)["total"] < 20e6


def _ffn_params(counts, preset):
    from u2moe.model.feed_forward import PositionwiseFeedForward

    with torch.device("meta"):
        model = U2Model(load_config(preset).model)
    return sum(p.numel() for m in model.modules() if isinstance(m, PositionwiseFeedForward)
               for p in m.parameters())


def test_every_preset_loads_and_is_complete():
    import yaml

    from u2moe.configs.experiment import PRESET_DIR
    from u2moe.configs.loading import to_dict

    assert {"dense_225m", "moe_1b", "dense_1b", "tiny_dense", "tiny_moe"} <= set(preset_names())
    for name in preset_names():
        raw = yaml.safe_load((PRESET_DIR / f"{name}.yaml").read_text())
        assert raw == to_dict(load_config(name)), f"{name}.yaml does not list every key"


def test_unknown_or_mistyped_keys_are_refused_with_their_name_and_file(tmp_path):
    path = tmp_path / "conf.yaml"
    path.write_text("model:\n  encoder:\n    num_blokcs: 6\n")
    with pytest.raises(ConfigError, match=r"conf\.yaml: unknown key 'model\.encoder\.num_blokcs'"):
        load_config(path)
    path.write_text("model:\n  encoder:\n    num_blocks: six\n")
    with pytest.raises(ConfigError, match=r"conf\.yaml: 'model\.encoder\.num_blocks' must be an integer"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"unknown key 'model\.encoder\.nope'"):
        load_config("tiny_moe", ["model.encoder.nope=1"])
    with pytest.raises(ConfigError, match=r"top_k"):
        load_config("tiny_moe", ["model.encoder.ffn.top_k=9"])
    with pytest.raises(ConfigError, match=r"unknown preset 'tiny_mo'"):
        load_config("tiny_mo")
    with pytest.raises(ConfigError, match=r"'optim\.lr' must be a number, got 'fast'"):
        load_config("tiny_moe", ["optim.lr=fast"])
    # YAML 1.1 reads 5e-4 as a string; a float field takes it as the number it means.
    assert load_config("tiny_moe", ["optim.lr=5e-4"]).optim.lr == 5e-4


def test_params_command_prints_one_json_line():
    out = subprocess.run([sys.executable, "-m", "u2moe", "params", "--config", "tiny_moe",
                          "--set", "model.encoder.num_blocks=2"], capture_output=True, text=True, check=True)
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1
    counts = json.loads(lines[0])
    expected = count_config_parameters(load_config("tiny_moe", ["model.encoder.num_blocks=2"]).model)
    assert counts == expected
    assert {"total", "active_per_frame", "encoder", "decoder", "experts"} <= counts.keys()

"""`u2moe train` takes the vocabulary size from the units directory unless the user set one."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from u2moe.configs.experiment import load_config
from u2moe.data_prep.tokenizer import Tokenizer
from u2moe.data_prep.units import train_units
from u2moe.configs.loading import ConfigError
from u2moe.trainer.vocab_size import fit_vocab_size, set_by_user

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def units(tmp_path) -> tuple[Path, int]:
    text = tmp_path / "text"
    text.write_text("u1 abc\nu2 cabd\nu3 xyz\n", encoding="utf-8")
    train_units(text, tmp_path / "units", "char")
    # The table by hand: <blank>, <unk>, the 7 distinct letters, <sos/eos>.
    assert Tokenizer.load(tmp_path / "units").vocab_size == 10
    return tmp_path / "units", 10


def test_preset_takes_the_units_size(units):
    units_dir, size = units
    cfg = load_config("tiny_moe")
    assert cfg.model.vocab_size != size
    assert not set_by_user("tiny_moe", ["optim.lr=1e-3"])
    fit_vocab_size(cfg, size, str(units_dir), set_by_user("tiny_moe", []))
    assert cfg.model.vocab_size == size


def test_a_size_the_user_set_must_agree(units, tmp_path):
    units_dir, size = units
    overrides = ["model.vocab_size=300"]
    assert set_by_user("tiny_moe", overrides)
    cfg = load_config("tiny_moe", overrides)
    with pytest.raises(ConfigError, match=r"model.vocab_size is 300, but .* has 10 units"):
        fit_vocab_size(cfg, size, str(units_dir), True)
    agreeing = load_config("tiny_moe", [f"model.vocab_size={size}"])
    fit_vocab_size(agreeing, size, str(units_dir), True)
    assert agreeing.model.vocab_size == size
    # A config file of the user's own that names a size has set it; one that does not has not.
    own = tmp_path / "own.yaml"
    own.write_text("model:\n  vocab_size: 300\n")
    assert set_by_user(own, [])
    own.write_text("optim:\n  lr: 0.001\n")
    assert not set_by_user(own, [])


def test_train_refuses_a_conflict_in_one_line_naming_both(units, tmp_path):
    units_dir, _ = units
    present = tmp_path / "x"  # input paths are checked first: the others only need to exist
    present.touch()
    proc = subprocess.run([sys.executable, "-m", "u2moe", "train", "--config", "tiny_moe", "--ds-config",
                           str(REPO / "ds_configs" / "zero0_bf16.json"), "--train-shards", str(present),
                           "--dev-shards", str(present), "--units", str(units_dir), "--cmvn", str(present),
                           "--exp-dir", str(tmp_path / "exp"),
                           "--set", "model.vocab_size=300"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("u2moe train: error: model.vocab_size is 300, but ")
    assert "has 10 units" in proc.stderr and "Traceback" not in proc.stderr

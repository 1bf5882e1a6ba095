"""bench/plot_dev_loss.py: the dev curve it reads from metrics.jsonl, and the PNG."""
import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "plot_dev_loss.py"
spec = importlib.util.spec_from_file_location("plot_dev_loss", SCRIPT)
plot = importlib.util.module_from_spec(spec)
spec.loader.exec_module(plot)


def _metrics(path: Path) -> None:
    records = [{"split": "train", "step": 10, "loss": 9.0},
               {"split": "dev", "step": 20, "loss": 5.0, "wer": 80.0},
               {"split": "dev", "step": 10, "loss": 7.0, "wer": 90.0},
               {"split": "dev", "step": 20, "loss": 4.5, "wer": 75.0}]  # step 20 again: a resumed run
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_dev_curve_keeps_the_last_record_of_each_step_in_step_order(tmp_path):
    _metrics(tmp_path / "metrics.jsonl")
    assert plot.dev_curve(tmp_path, "loss") == ([10, 20], [7.0, 4.5])
    assert plot.dev_curve(tmp_path / "metrics.jsonl", "wer") == ([10, 20], [90.0, 75.0])
    with pytest.raises(SystemExit, match="no dev records with 'cer'"):
        plot.dev_curve(tmp_path, "cer")


def test_png_is_written(tmp_path):
    pytest.importorskip("matplotlib")
    _metrics(tmp_path / "metrics.jsonl")
    out = tmp_path / "dev.png"
    plot.main([f"a={tmp_path}", f"b={tmp_path / 'metrics.jsonl'}", "--out", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

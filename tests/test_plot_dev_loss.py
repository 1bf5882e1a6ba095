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


def test_a_trainer_log_gives_the_curve_of_its_metrics_jsonl(tmp_path):
    """A run whose metrics.jsonl was lost: its log's dev lines, as the trainer writes them, give
    the same curve to the logged precision, and training lines are not taken for dev records."""
    from u2moe.trainer.progress import dev_line

    _metrics(tmp_path / "metrics.jsonl")
    lines = ["2026-11-27 08:31:14,025 [rank 0] epoch 0 step 10 loss 9.000 lr 1e-4"]
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["split"] == "dev":
            metrics = {k: v + 1e-4 for k, v in record.items() if k not in ("split", "step")}
            lines.append("2026-11-27 08:31:15,000 [rank 0] " + dev_line(record["step"], 300, metrics))
    log = tmp_path / "run.train.log"
    log.write_text("\n".join(lines) + "\n")
    for metric in ("loss", "wer"):
        steps, values = plot.dev_curve(log, metric)
        reference = plot.dev_curve(tmp_path, metric)
        assert steps == reference[0] and values == pytest.approx(reference[1], abs=1e-3)
    with pytest.raises(SystemExit, match="no dev records with 'cer'"):
        plot.dev_curve(log, "cer")


def test_png_is_written(tmp_path):
    pytest.importorskip("matplotlib")
    _metrics(tmp_path / "metrics.jsonl")
    out = tmp_path / "dev.png"
    plot.main([f"a={tmp_path}", f"b={tmp_path / 'metrics.jsonl'}", "--out", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

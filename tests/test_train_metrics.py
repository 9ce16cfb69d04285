"""Interval averages, health alarms, metrics.jsonl truncation on resume, and `speechssl plot`."""

import json

import pytest

from speechssl.cli import main
from speechssl.train.metrics import HealthMonitor, IntervalMeter, format_record, read_metrics, truncate_metrics


def test_interval_meter_weights_by_sample_size_and_sums_counts():
    m = IntervalMeter()
    m.add({"loss": 1.0, "accuracy": 0.5, "sample_size": 10, "num_masked": 10, "audio_samples": 16000, "lr": 1e-3,
           "grad_norm": 2.0, "skipped": False}, seconds=0.5)
    m.add({"loss": 4.0, "accuracy": 0.0, "sample_size": 30, "num_masked": 30, "audio_samples": 16000, "lr": 2e-3,
           "grad_norm": 4.0, "skipped": False}, seconds=0.5)
    m.add({"loss": float("nan"), "sample_size": 5, "audio_samples": 16000, "skipped": True}, seconds=1.0)
    s = m.summary(sample_rate=16000)
    assert s["loss"] == pytest.approx((10 + 120) / 40) and s["accuracy"] == pytest.approx(5 / 40)
    assert s["num_masked"] == 40 and s["lr"] == 2e-3 and s["grad_norm"] == 3.0
    assert s["skipped_updates"] == 1
    assert s["audio_sec_per_sec"] == pytest.approx(3 / 2.0) and s["updates_per_sec"] == pytest.approx(1.0)


def test_health_alarms():
    h = HealthMonitor(codebook_size=640, chance_accuracy=1 / 101, start_update=500)
    assert h.check({"update": 200, "loss": 4.6, "accuracy": 0.01, "code_perplexity": 500}) == []
    alarms = h.check({"update": 600, "loss": 4.5, "accuracy": 0.011, "code_perplexity": 30})
    assert any("codebook collapse" in a for a in alarms) and any("chance" in a for a in alarms)
    assert not any("diverging" in a for a in alarms)
    for _ in range(5):
        alarms = h.check({"update": 700, "loss": 9.0, "accuracy": 0.3, "code_perplexity": 400})
    assert alarms == [next(a for a in alarms if "loss diverging" in a)]
    line = format_record({"split": "train", "update": 700, "epoch": 2, "loss": 9.0, "alarms": alarms})
    assert "ALARM: loss diverging" in line and "update    700" in line


def test_truncate_metrics_drops_records_after_the_checkpoint(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text("".join(json.dumps({"split": "train", "update": u}) + "\n" for u in (2, 4, 6)) + '{"split": "tr')
    truncate_metrics(p, 4)
    assert [r["update"] for r in read_metrics(p)] == [2, 4]


def test_plot_writes_pngs(tmp_path, capsys):
    recs = [{"split": "train", "update": u, "loss": 5 - u / 50, "contrastive": 4 - u / 60, "diversity": 0.5,
             "feature_pen": 0.01, "accuracy": u / 200, "code_perplexity": 300.0, "prob_perplexity": 320.0,
             "lr": 1e-4 * u, "grad_norm": 1.0, "audio_sec_per_sec": 300.0, "temp": 2.0} for u in range(10, 110, 10)]
    recs += [{"split": "valid", "update": 50, "loss": 4.1, "accuracy": 0.2}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert main(["plot", str(tmp_path)]) == 0
    pngs = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert pngs == sorted(["overview.png", "loss.png", "loss_terms.png", "accuracy.png", "perplexity.png", "lr.png",
                           "grad_norm.png", "throughput.png", "temperature.png"])
    assert (tmp_path / "plots" / "overview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = tmp_path / "elsewhere"
    assert main(["plot", str(tmp_path), "--out", str(out)]) == 0
    assert main(["plot", str(tmp_path), "--out", str(out)]) == 2  # no silent overwrite of --out
    assert main(["plot", str(tmp_path), "--out", str(out), "--force"]) == 0
    assert main(["plot", str(tmp_path / "nope")]) == 1
    assert "metrics.jsonl not found" in capsys.readouterr().out

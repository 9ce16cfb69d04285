"""tools/gpu_check.sh: the dry run (the same code paths on the CPU, tiny sizes) keeps working between the
rare GPU runs; the report's target evaluation and test summary."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import gpu_check  # noqa: E402


def test_dry_run_runs_every_section_and_writes_the_report(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(["bash", "tools/gpu_check.sh", "--dry-run", "--out", str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_check.log", "gpu_report.json", "gpu_report.md",
                                                         "tests_junit.xml"]
    report = json.loads((tmp_path / "gpu_report.json").read_text())
    sections = report["sections"]
    assert list(sections) == list(gpu_check.SECTIONS) and all(s["status"] == "ok" for s in sections.values())
    tests = sections["tests"]["results"]
    assert tests["passed"] >= 3 and tests["failed"] == 0
    rows = gpu_check.step_rows(sections)
    assert {(r["model"], r["impl"], r["compile"]) for r in rows} == {
        ("wav2vec2", "speechssl", False), ("wav2vec2", "transformers", False), ("hubert", "speechssl", False),
        ("hubert", "torchaudio", False), ("wav2vec2", "speechssl", True), ("hubert", "speechssl", True),
        ("data2vec2", "speechssl", False)}
    for r in rows:
        assert r["step_s"] > 0 and r["audio_s_per_s"] > 0 and r["tflop_per_step"] > 0 and "error" not in r
        if r["impl"] == "speechssl" and not r["compile"]:  # the update's stats and gradient norm, and the
            # mask counts' copy (data2vec 2.0's masks have the same count in every row: no copy)
            assert r["host_reads"] == 2 and r["host_copies"] == (0 if r["model"] == "data2vec2" else 1)
    assert any(t["target"].startswith("data2vec 2.0 BASE step time") for t in report["targets"])
    fp16 = sections["fp16"]["results"]
    assert fp16["all_finite"] and fp16["updates"] == 5
    data = sections["data"]["results"]
    assert data["updates"] == 6 and 0 <= data["wait_share"] < 1
    km = sections["kmeans"]["results"]
    assert km["speedup"] > 0 and abs(km["inertia_diff"]) < 0.5
    assert all(t["met"] is None for t in report["targets"])  # a dry run measures nothing
    text = (tmp_path / "gpu_report.md").read_text()
    assert "## Targets" in text and "## Training steps" in text and "| hubert | torchaudio |" in text
    assert "GPU check (dry run" in proc.stdout


def _rows():
    common = {"batch": [5, 250000], "frames": 3900}
    return [
        dict(common, model="wav2vec2", impl="speechssl", max_tokens=1400000, compile=False, step_s=0.1,
             audio_s_per_s=780.0, tflop_per_step=40.0, mfu=0.5, peak_gib=10.0),
        dict(common, model="wav2vec2", impl="transformers", max_tokens=1400000, compile=False, step_s=0.2,
             audio_s_per_s=390.0, tflop_per_step=40.0, mfu=0.25, peak_gib=12.0),
        dict(common, model="hubert", impl="speechssl", max_tokens=1400000, compile=False, step_s=0.1,
             audio_s_per_s=780.0, tflop_per_step=40.0, mfu=0.3, peak_gib=10.0),
        dict(common, model="hubert", impl="torchaudio", max_tokens=1400000, compile=False, step_s=0.09,
             audio_s_per_s=866.0, tflop_per_step=40.0, mfu=0.4, peak_gib=9.0),
    ]


def test_targets_compare_the_right_rows():
    compiled = dict(_rows()[2], compile=True, step_s=0.08, audio_s_per_s=975.0)
    for key in ("tflop_per_step", "mfu", "peak_gib"):
        del compiled[key]
    sections = {
        "steps": {"results": {"peak_bf16_tflops": 800.0, "rows": _rows()}},
        "compile": {"results": {"peak_bf16_tflops": 800.0, "rows": [compiled]}},
        "fp16": {"results": {"updates": 50, "all_finite": True, "skipped": 1, "overflows": 1, "loss_scaler": True,
                             "scale_first": 128.0, "scale_min": 64.0, "scale_last": 64.0, "amp_dtype": "float16"}},
        "data": {"results": {"wait_share": 0.08, "num_workers": 6, "updates": 40}},
        "kmeans": {"results": {"speedup": 30.0, "inertia_diff": 0.001, "n": 100000, "dim": 768, "k": 500}},
    }
    got = {t["target"]: t for t in gpu_check.targets(sections, dry_run=False)}
    w2v = got["wav2vec2 step throughput >= 1.5x transformers'"]
    assert w2v["value"] == 2.0 and w2v["met"]
    hub = got["hubert step throughput >= 1.0x torchaudio's"]  # the compiled row is the faster one
    assert abs(hub["value"] - 975.0 / 866.0) < 1e-9 and hub["met"] and "compiled" in hub["how"]
    assert got["hubert model FLOP utilisation >= 40%"]["met"]  # compiled: 40 TFLOP / 0.08 s / 800 = 62.5%
    assert abs(got["hubert model FLOP utilisation >= 40%"]["value"] - 0.625) < 1e-9
    assert got["wav2vec2 peak memory <= transformers'"]["met"] and not got["hubert peak memory <= torchaudio's"]["met"]
    assert got["fp16 + loss scaler: every loss finite, the scale stable"]["met"]
    assert got["data pipeline keeps the GPU fed (wait < 5% of the time)"]["met"] is False
    assert got["k-means >= 25x scikit-learn at no worse inertia"]["met"] is False  # 0.1% worse inertia


def test_junit_summary_lists_failures(tmp_path):
    xml = tmp_path / "j.xml"
    xml.write_text('<testsuites><testsuite><testcase classname="t" name="a"/>'
                   '<testcase classname="t" name="b"><failure message="AssertionError: boom&#10;more"/></testcase>'
                   '<testcase classname="t" name="c"><skipped message="no CUDA"/></testcase></testsuite></testsuites>')
    s = gpu_check.junit_summary(xml)
    assert (s["passed"], s["failed"], s["skipped"]) == (1, 1, 1)
    assert s["failures"] == [{"test": "t::b", "message": "AssertionError: boom"}]
    assert "error" in gpu_check.junit_summary(tmp_path / "missing.xml")

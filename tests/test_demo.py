"""`bevctl demo --quick` end to end (slow): report fields, PNGs, and resume skips finished phases."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_quick_demo_end_to_end_and_resume(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("BEVCTL_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "bevctl.cli", "demo", "--quick", "--out", str(out), "--labeler", "synth-gt"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    names = [m["name"] for m in report["models"]]
    assert len(names) == 3
    for m in report["models"]:
        assert set(m) == {"name", "bev_label_fraction", "pretrained", "miou", "iou_per_class", "wall_seconds"}
        assert set(m["iou_per_class"]) == {"boundary", "ped_crossing", "divider"}
        assert m["wall_seconds"]["total"] == pytest.approx(sum(v for k, v in m["wall_seconds"].items() if k != "total"))
    baseline = next(m for m in report["models"] if not m["pretrained"])
    assert baseline["bev_label_fraction"] == 1.0 and baseline["miou"] > 0.2  # learned something real
    assert all((out / p).is_file() for p in report["images"]) and len(report["images"]) >= 6
    assert "| model |" in (out / "report.md").read_text()
    phases = json.loads((out / "phases.json").read_text())
    # rerunning resumes: every phase is skipped, the report is rewritten identically
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0
    assert json.loads((out / "phases.json").read_text()) == phases
    assert json.loads((out / "report.json").read_text())["models"] == report["models"]
